"""Smoke runs of the benchmark scripts on a few real pairs: they run, agree across modes and write
what the README quotes. No figure is asserted: speed belongs in ``bench/``, not in tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, shared_dataset


def _bench(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_bench_data_runs_every_mode_on_real_pairs(tmp_path):
    roadscene = shared_dataset("RoadScene")
    out = tmp_path / "data.json"
    proc = _bench("bench_data.py", "--dataset", str(roadscene), "--pairs", "24", "--scales", "1", "2",
                  "--repeat", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = {(r["mode"], r["scale"]): r for r in report["runs"]}
    assert set(runs) == {(m, s) for m in ("loop", "pool", "ray") for s in (1, 2)}
    for scale in (1, 2):  # the same work whatever runs it: patch count and a statistic agree
        assert len({runs[(m, scale)]["patches"] for m in ("loop", "pool", "ray")}) == 1
        assert len({round(runs[(m, scale)]["w_int_ir"]["mean"], 9) for m in ("loop", "pool", "ray")}) == 1
    assert runs[("loop", 2)]["patches"] == 2 * runs[("loop", 1)]["patches"]  # 2x: the pairs twice
    ray_run = runs[("ray", 1)]
    assert [p["name"] for p in ray_run["phases"]] == ["crop", "stats pass 1", "stats pass 2"]
    assert set(ray_run["peak_mem_by_kind_mib"]) == {"driver", "workers", "ray_daemons"}
    assert ray_run["peak_mem_by_kind_mib"]["ray_daemons"] > 0 and ray_run["peak_mem_by_kind_mib"]["workers"] > 0
    assert {"ray_over_loop", "ray_over_pool"} <= set(report["ratios"][0]) and report["memory_growth"]
    assert "Ray/loop" in proc.stdout and "peak memory growth" in proc.stdout


@pytest.mark.slow
def test_bench_train_plain_side_with_the_two_process_ceiling(tmp_path):
    out = tmp_path / "train.json"
    proc = _bench("bench_train.py", "--only", "plain", "--steps", "2", "--warmup", "1", "--repeats", "1",
                  "--patches", str(tmp_path / "none"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert "plain_1thread" in res and res["plain_1thread"]["patches_per_s"] > 0
    if (os.cpu_count() or 1) < 2:
        return
    two = res["plain_2processes"]  # two 1-thread loops side by side: the ceiling of 2 workers
    assert len(two["each_patches_per_s"]) == 2 and two["patches_per_s"] == pytest.approx(sum(two["each_patches_per_s"]))
    assert "2 plain loops at once" in proc.stdout


def test_tno25_rank_reproduces_the_published_ranking(tmp_path):
    """bench/tno25_rank.py on the first shipped model's means: 5th of 13 at mean rank 5.12, behind
    SeAFusion 3.50, the pixel maximum 4.12, IFCNN 4.25 and PIAFusion 4.62 (the figures of issue 20)."""
    means = {"EN": 6.785, "SD": 38.42, "SF": 8.29, "MI": 3.053, "SCD": 1.576, "VIF": 0.883, "Qabf": 0.462, "SSIM": 1.004}
    (tmp_path / "means.json").write_text(json.dumps({"ours": means}))
    out = _bench("tno25_rank.py", str(tmp_path / "means.json")).stdout.splitlines()
    assert out[0].split()[1:5] == ["SeAFusion", "mean", "rank", "3.50"]
    assert out[4].split()[:5] == ["5.", "ours", "mean", "rank", "5.12"] and len(out) == 13
