"""How much memory this process may still use, and sizes written the way people write them.

``available_bytes`` is the smallest of: the kernel's ``MemAvailable`` (``/proc/meminfo``), the
room left under a cgroup v2 / v1 memory limit (containers, Slurm, Kubernetes), and the room left
under this process's address-space limit (``ulimit -v``, ``RLIMIT_AS``). Anything unknown is
ignored, so the answer is the tightest limit this machine states.
"""

from __future__ import annotations

import re
import resource
from pathlib import Path

#: Units of ``parse_size`` (powers of 1024).
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"512M"``, ``"2G"``, ``"1.5GiB"``, ``"1000000"`` -> bytes (powers of 1024).

    Raises:
        ValueError: not a size.
    """
    match = _SIZE_RE.fullmatch(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (expected e.g. 512M, 2G, 1.5GiB or a number of bytes)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def format_size(n: float) -> str:
    """Bytes as ``"1.5 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(Path(limit_file)), _read_int(Path(usage_file))
        if limit is not None and usage is not None and limit < (1 << 60):
            return max(0, limit - usage)
    return None


def _address_space_room() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return max(0, soft - int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_bytes() -> int | None:
    """Bytes this process may still allocate (the tightest known limit), or ``None`` if unknown."""
    known = [v for v in (_meminfo_available(), _cgroup_room(), _address_space_room()) if v is not None]
    return min(known) if known else None
