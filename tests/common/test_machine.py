"""Machine description, the huge-pages switch of the inference processes, the data tasks' allocator."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO
from pipeline.common.machine import available_cores, describe_machine, provenance


def _child(code: str, env_extra: dict[str, str] | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env.update(env_extra or {})
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_describe_machine_names_the_cores():
    assert describe_machine().startswith(f"{os.cpu_count()} CPU cores (")


def test_provenance_records_machine_versions_and_load():
    import numpy

    record = provenance([7.0, 6.0, 5.0], threads=3)
    assert record["description"] == describe_machine() and record["cores_available"] == available_cores() >= 1
    assert record["versions"]["numpy"] == numpy.__version__  # loaded libraries only, with their versions
    assert record["load_average_before"] == [7.0, 6.0, 5.0] and len(record["load_average_after"]) == 3
    assert record["threads"] == 3 and "load_average_before" not in provenance()


def test_use_huge_pages_before_and_after_torch():
    before = "from pipeline.common.machine import use_huge_pages as u; import os; print(u(), os.environ['THP_MEM_ALLOC_ENABLE'])"
    assert _child(before) == "True 1"
    after = "import torch; " + before
    assert _child(after) == "False 1"  # torch came first: it may be too late, and the caller is told
    assert _child(before, {"THP_MEM_ALLOC_ENABLE": "0"}) == "True 0"  # an explicit setting wins


def test_use_system_allocator_switches_pyarrow_once_and_respects_the_environment():
    code = ("import pyarrow as pa; from pipeline.common.machine import use_system_allocator as u; "
            "a = pa.default_memory_pool().backend_name; u(); u(); print(a, pa.default_memory_pool().backend_name)")
    default, switched = _child(code).split()
    assert default != "system" and switched == "system"  # pyarrow's bundled allocator, then malloc
    assert _child(code, {"ARROW_DEFAULT_MEMORY_POOL": "jemalloc"}).split() in (["jemalloc", "jemalloc"],
                                                                              ["mimalloc", "mimalloc"])


def test_release_free_memory_hands_fragmented_heap_back():
    # 200 MB of malloc'd blocks, every 64th kept so that the free space is holes, not the heap's top
    code = ("import psutil; from pipeline.common.machine import release_free_memory as r; p = psutil.Process(); "
            "b = [bytearray(4000) for _ in range(50_000)]; keep = b[::64]; del b; "
            "x = p.memory_info().rss; r(); print(x // 2**20, p.memory_info().rss // 2**20)")
    before, after = map(int, _child(code).split())
    assert before > 150 and after < before - 100, (before, after)
