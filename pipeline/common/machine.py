"""What machine a result came from: the one description used by model cards, reports and benchmarks."""

from __future__ import annotations

import functools
import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

#: Libraries whose versions :func:`provenance` records, when the process has loaded them.
_LIBRARIES = ("torch", "numpy", "cv2", "pyarrow", "ray", "mlflow")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the architecture (``x86_64``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> str:
    """``"<cores> CPU cores (<model>), <OS> <release>"``, for provenance lines."""
    return f"{os.cpu_count()} CPU cores ({cpu_model()}), {platform.system()} {platform.release()}"


def available_cores() -> int:
    """CPU cores this process may run on (respects affinity masks / container CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def provenance(load_before: Sequence[float] | None = None, **extra: Any) -> dict[str, Any]:
    """The ``machine`` record of every ``bench/`` result: the machine, the library versions loaded,
    and the load average before the measurement (``load_before``, from ``os.getloadavg()``) and now,
    since other processes distort the figures. ``extra`` adds the script's own settings (threads...)."""
    record: dict[str, Any] = {
        "description": describe_machine(),
        "cpu": cpu_model(),
        "cores_available": available_cores(),
        "os_cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: str(getattr(sys.modules[name], "__version__", "?")) for name in _LIBRARIES if name in sys.modules},
    }
    if load_before is not None:
        record["load_average_before"] = [round(x, 2) for x in load_before]
    record["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return {**record, **extra}


def use_huge_pages() -> bool:
    """Ask PyTorch to put large CPU tensors on 2 MB transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``):
    far fewer page faults for the network's feature maps (1.0x -> ~1.5x of the matmul ceiling at
    945x709, ``bench/bench_inference.py``). PyTorch reads the variable once, at its first allocation,
    so call this before torch allocates anything; processes started afterwards (a local Ray's
    workers) inherit it. Returns False when torch was already imported (then it may come too late).
    An explicit ``THP_MEM_ALLOC_ENABLE`` in the environment wins."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return "torch" not in sys.modules


def use_system_allocator() -> None:
    """Make pyarrow allocate through the C library's ``malloc`` instead of its bundled mimalloc.

    mimalloc keeps the pages it frees for reuse, per thread: in the data stages, whose tasks read and
    write a Parquet shard after another, a worker's resident memory then grew with the number of
    shards it had handled (crop + stats of RoadScene at 4x the pairs: +60 MiB in the single-process
    loop, +40 MiB over Ray's two workers; ``bench/bench_data.py``); with ``malloc`` and
    ``release_free_memory`` after each task group, +14 MiB and +20 MiB (Ray's whole tree 1.03x).
    Idempotent; an explicit ``ARROW_DEFAULT_MEMORY_POOL`` in the environment wins.
    """
    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        return
    import pyarrow as pa

    if pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``; a no-op elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or ``None`` where the C library has none."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
