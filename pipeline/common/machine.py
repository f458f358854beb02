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
