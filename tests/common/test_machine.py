"""Machine description and the huge-pages switch of the inference processes."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO
from pipeline.common.machine import describe_machine


def _child(code: str, env_extra: dict[str, str] | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env.update(env_extra or {})
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_describe_machine_names_the_cores():
    assert describe_machine().startswith(f"{os.cpu_count()} CPU cores (")


def test_use_huge_pages_before_and_after_torch():
    before = "from pipeline.common.machine import use_huge_pages as u; import os; print(u(), os.environ['THP_MEM_ALLOC_ENABLE'])"
    assert _child(before) == "True 1"
    after = "import torch; " + before
    assert _child(after) == "False 1"  # torch came first: it may be too late, and the caller is told
    assert _child(before, {"THP_MEM_ALLOC_ENABLE": "0"}) == "True 0"  # an explicit setting wins
