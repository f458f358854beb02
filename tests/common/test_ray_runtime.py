"""The cluster path for real: a `ray start --head` on loopback, the register stage joins it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import REPO
from pipeline.common import ray_runtime
from pipeline.common.ray_runtime import (
    configure_data_context,
    map_groups,
    ray_options,
    resolve_address,
    run_serially,
    task_count,
    task_groups,
)
from pipeline.data.demo import generate_demo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_address_resolution(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert resolve_address(None) == "127.0.0.1:1" and resolve_address("auto") == "auto"
    assert ray_options({"ray": {"address": None, "num_cpus": 2}}) == {"address": None, "num_cpus": 2}


def test_task_count_scales_with_cpus_and_caps_items_per_task(monkeypatch):
    monkeypatch.setattr(ray_runtime, "TASKS_PER_CPU", 4)
    monkeypatch.setattr(ray_runtime, "MAX_ITEMS_PER_TASK", 64)
    assert task_count(0, cpus=2) == 0
    assert task_count(3, cpus=2) == 3  # never more tasks than items
    assert task_count(28, cpus=2) == 8 and task_count(28, cpus=1) == 4 and task_count(28, cpus=16) == 28
    assert task_count(1000, cpus=2) == 16  # at most 64 items per task
    assert task_count(442, cpus=2) == 8 and task_count(442, cpus=3) == 12  # a multiple of the CPUs


@pytest.mark.parametrize("n,k", [(28, 8), (5, 8), (442, 8), (1, 1), (9, 3)])
def test_task_groups_deal_every_item_once_round_robin(n, k):
    items = [f"part-{i:05d}" for i in range(n)]
    groups = task_groups(items, k)
    assert sorted(x for g in groups for x in g) == items  # a partition
    assert len(groups) == min(n, k) and all(groups)
    assert max(map(len, groups)) - min(map(len, groups)) <= 1  # balanced
    assert groups[0][:2] == items[0 : 2 * k : k]  # item i -> group i % k
    with pytest.raises(ValueError):
        task_groups(items, 0)


def test_map_groups_is_one_task_per_group_in_order_like_run_serially(ray_local):
    def _describe_group(group: list[int], offset: int) -> dict:  # local: Ray pickles it by value
        if offset < 0:
            raise ValueError(f"bad group {group}")
        import pyarrow as pa

        return {"total": sum(group) + offset, "first": group[0], "pid": os.getpid(),
                "arrow_pool": pa.default_memory_pool().backend_name}

    configure_data_context()
    groups = task_groups(list(range(50)), 7)
    arrived = []
    on_ray = map_groups("test", _describe_group, groups, {"offset": 1000},
                        on_result=lambda index, result: arrived.append((index, result["total"])))
    assert sorted(arrived) == [(k, r["total"]) for k, r in enumerate(on_ray)]  # each result once, as it came
    serial = run_serially("test", _describe_group, groups, {"offset": 1000})
    assert [{k: r[k] for k in ("total", "first")} for r in on_ray] == [{k: r[k] for k in ("total", "first")} for r in serial]
    assert [r["first"] for r in on_ray] == list(range(7))  # group order, whatever the task order
    assert {r["pid"] for r in on_ray} != {os.getpid()}  # ran in Ray workers
    # every runner runs a group with pyarrow on malloc (memory flat in the number of groups)
    assert {r["arrow_pool"] for r in on_ray + serial} == {"system"}
    assert map_groups("test", _describe_group, [], {"offset": 0}) == []
    with pytest.raises(ValueError, match="bad group"):  # the task's own exception, not a wrapper
        map_groups("test", _describe_group, groups, {"offset": -1})


def test_register_stage_on_an_existing_cluster(tmp_path, ray_fresh):
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        pytest.skip("ray CLI not installed next to this Python")
    port = _free_port()
    temp = Path("/tmp") / f"mda-ray-{os.getpid()}-{port}"  # short: Ray's socket paths are length-limited
    # Token authentication off for this throw-away loopback cluster (head, probe and driver alike),
    # so the test does not depend on a token file in the user's home.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    # Our own head in its own process group (--block keeps it in the foreground): we stop exactly
    # this cluster by signalling the group; `ray stop` would kill every cluster on the machine.
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env,
    )
    try:
        generate_demo(tmp_path / "raw", num_pairs=3, height=64, width=80, seed=4)
        params = tmp_path / "params.yaml"
        params.write_text(f"ray:\n  address: null\nregister:\n  raw_dir: {tmp_path / 'raw'}\n")
        env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:  # wait until the head answers
            probe = subprocess.run([str(ray_bin), "status", f"--address=127.0.0.1:{port}"],
                                   capture_output=True, text=True, env=env)
            if probe.returncode == 0:
                break
            if head.poll() is not None or time.time() > deadline:
                pytest.fail(f"ray head did not start: {probe.stdout}{probe.stderr}")
            time.sleep(1)
        run = subprocess.run(
            [sys.executable, "stages/register.py", "--params", str(params), "--out", str(tmp_path / "out"),
             "--no-progress"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "3 pairs found, 3 accepted" in run.stdout
        assert "starting a local Ray" not in run.stderr  # it joined our cluster
        table = pq.read_table(tmp_path / "out/manifest.parquet")
        assert table.num_rows == 3 and set(table.column("status").to_pylist()) == {"ok"}
        assert len(list((tmp_path / "out/vi").glob("*.png"))) == 3
        # the cluster really ran the job: its session logs hold our driver
        assert any(temp.glob("session_*/logs/*worker*")), "no worker logs in the cluster's temp dir"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_ctrl_c_during_ray_shutdown_is_acted_on_after_it():
    # ray.shutdown() interrupted halfway left Ray's core worker half torn down, and the process then
    # ended with status 1 instead of the stage's 130: the session holds Ctrl-C back until it is done,
    # then hands it to the handler that was there before (the stage's)
    calls: list[str] = []
    stage_handler = lambda signum, frame: calls.append("handler")  # noqa: E731
    original = signal.signal(signal.SIGINT, stage_handler)  # other tests' Ray may have changed it
    try:
        with ray_runtime._sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # the signal has arrived: held back
            calls.append("body done")
        assert calls == ["body done", "handler"]
        assert signal.getsignal(signal.SIGINT) is stage_handler  # the handler is back
    finally:
        signal.signal(signal.SIGINT, original)


def test_unreachable_ray_address_fails_fast(monkeypatch):
    """Nothing listening at RAY_ADDRESS: one line naming it within seconds, not Ray's minutes of
    GCS retries (issue 22)."""
    import socket
    import time

    from pipeline.common.ray_runtime import probe_address, ray_session

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free again when closed: nothing listens there
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"Ray cluster at 127.0.0.1:{port} is not reachable"):
        with ray_session():
            pass
    assert time.monotonic() - t0 < 30
    probe_address("auto")  # left to Ray
