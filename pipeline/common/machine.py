"""What machine a result came from: the one description used by model cards, reports and benchmarks."""

from __future__ import annotations

import os
import platform
from pathlib import Path


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


def use_huge_pages() -> bool:
    """Ask PyTorch to put large CPU tensors on 2 MB transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``):
    far fewer page faults for the network's feature maps (1.0x -> ~1.5x of the matmul ceiling at
    945x709, ``bench/bench_inference.py``). PyTorch reads the variable once, at its first allocation,
    so call this before torch allocates anything; processes started afterwards (a local Ray's
    workers) inherit it. Returns False when torch was already imported (then it may come too late).
    An explicit ``THP_MEM_ALLOC_ENABLE`` in the environment wins."""
    import sys

    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return "torch" not in sys.modules
