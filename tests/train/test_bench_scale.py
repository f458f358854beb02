"""bench/: the scale projection's all-reduce model and the GPU check's refusal on a CPU machine."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ring_allreduce_model_and_projection():
    sp = _module("scale_projection")
    assert sp.ring_allreduce_s(1, 4e6, 10.0, 50.0) == 0.0
    # 2 workers: each sends and receives bytes/2 twice -> bytes / bandwidth, plus 2 latencies
    assert sp.ring_allreduce_s(2, 4e6, 10.0, 50.0) == pytest.approx(4e6 / 10e9 + 2 * 50e-6)
    # many workers: the bandwidth term tends to 2 x bytes / bandwidth
    assert sp.ring_allreduce_s(1000, 4e6, 10.0, 0.0) == pytest.approx(2 * 4e6 / 10e9, rel=1e-2)
    proj = sp.project(compute_s=0.5, batch=8, nbytes=2e6, workers=[1, 2, 8])
    for rows in proj.values():
        assert rows[1]["patches_per_s"] == pytest.approx(16.0) and rows[1]["efficiency"] == 1.0
        assert rows[8]["efficiency"] < rows[2]["efficiency"] <= 1.0
        assert rows[8]["patches_per_s"] > rows[2]["patches_per_s"]
    slow, fast = proj["10 GbE (TCP)"][8], proj["NVLink 4 (H100 SXM, one node)"][8]
    assert slow["allreduce_ms"] > fast["allreduce_ms"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the check itself")
def test_gpu_check_refuses_a_machine_without_cuda_at_once():
    out = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "no CUDA device" in out.stderr
