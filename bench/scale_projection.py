"""Training at scale, on paper: measured 1- and 2-worker throughput and a projection for N workers.

Reads what the benchmarks measured on this machine:

- ``bench/results/train.json`` (``bench/bench_train.py``): patches/s and step time of Ray Train
  with 1 and 2 CPU workers, the parameter count, the gloo all-reduce of the gradients timed alone;
- ``bench/results/step.json`` (``bench/bench_step.py``): FLOPs of one training step;
- ``bench/results/gpu_check.json`` (``bench/gpu_check.sh``, only on a CUDA machine): the measured
  GPU step, which then replaces the assumed GPU speed below.

Model of one data-parallel (DDP) step on N workers, each with ``B`` patches::

    step(N) = compute(B) + allreduce(N)          (no overlap of the all-reduce with backward: a bound)
    allreduce(N) = 2 (N - 1) / N * bytes / bandwidth + 2 (N - 1) * latency      (ring all-reduce)
    bytes = parameters x 4                       (fp32 gradients; DDP reduces fp32 even under bf16 autocast)
    throughput(N) = N * B / step(N),  scaling efficiency = throughput(N) / (N * throughput(1))

``compute(B)`` on a CPU worker is the measured 1-worker step; on a GPU it is
``FLOPs(B) / (peak x utilisation) + launch overhead`` with the stated assumptions (FLOPs scale
linearly with ``B``; ``--gpu-peak-tflops``, ``--gpu-utilisation``, ``--gpu-launch-ms``), or the
measured GPU step of ``gpu_check.json`` when there is one. The input pipeline is assumed to keep
up (its cost per patch, measured, is printed: the CPU cores each GPU needs to feed it).
Prints the table and writes ``bench/results/scale.json``.

Usage: ``python bench/scale_projection.py [--workers 1 2 4 8 16 32 64] [--gpu-batch 256]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

#: Interconnects: (effective all-reduce bandwidth in GB/s, per-hop latency in microseconds).
#: Effective = what NCCL/gloo reach in practice, below the line rate (stated, not measured here).
LINKS: dict[str, tuple[float, float]] = {
    "NVLink 4 (H100 SXM, one node)": (350.0, 5.0),
    "PCIe 4.0 x16": (20.0, 10.0),
    "100 GbE (RDMA)": (11.0, 20.0),
    "10 GbE (TCP)": (1.1, 60.0),
}


def ring_allreduce_s(n: int, nbytes: float, bandwidth_gbs: float, latency_us: float) -> float:
    """Seconds of a ring all-reduce of ``nbytes`` over ``n`` workers (0 for one worker)."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / (bandwidth_gbs * 1e9) + 2 * (n - 1) * latency_us * 1e-6


def project(compute_s: float, batch: int, nbytes: float, workers: list[int]) -> dict[str, dict[int, dict[str, float]]]:
    """Throughput and efficiency for each link and worker count (model in the module docstring)."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for link, (bw, lat) in LINKS.items():
        out[link] = {}
        for n in workers:
            ar = ring_allreduce_s(n, nbytes, bw, lat)
            step = compute_s + ar
            out[link][n] = {"allreduce_ms": ar * 1e3, "step_ms": step * 1e3, "patches_per_s": n * batch / step,
                            "efficiency": compute_s / step}
    return out


def _two_worker_gap(ray1: dict[str, Any], ray2: dict[str, Any], nbytes: float, batch: int) -> dict[str, float]:
    """What the model misses at 2 workers on this 2-core host, from bench_train's breakdown."""
    b1, b2 = ray1["breakdown"]["step"], ray2["breakdown"]["step"]
    background = sum(v for k, v in ray2.get("cpu_s_per_step_by_process", {}).items() if "RayTrainWorker" not in k)
    ar = ray2.get("allreduce_s") or ring_allreduce_s(2, nbytes, 1.0, 50.0)
    return {"model_patches_per_s": 2 * batch / (ray1["step_s_median"] + ar),
            "corun_cpu_ms": (b2["cpu_s"] - b1["cpu_s"]) * 1e3, "wait_ms": (b2["wall_s"] - b2["cpu_s"]) * 1e3,
            "background_cpu_ms": background * 1e3}


def _load(name: str) -> dict[str, Any] | None:
    from pipeline.common.atomic_io import read_json_object

    path = RESULTS / name
    return read_json_object(path, "benchmark result") if path.is_file() else None


def _table(title: str, proj: dict[str, dict[int, dict[str, float]]], workers: list[int]) -> None:
    print(f"\n{title}")
    print(f"  {'link':32s}" + "".join(f"{f'N={n}':>16s}" for n in workers))
    for link, rows in proj.items():
        cells = "".join(f"{rows[n]['patches_per_s']:9.0f} ({rows[n]['efficiency'] * 100:3.0f}%)" for n in workers)
        print(f"  {link:32s}{cells}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--gpu-batch", type=int, default=256, help="patches per GPU per step (assumed)")
    parser.add_argument("--gpu-peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM: 989)")
    parser.add_argument("--gpu-utilisation", type=float, default=0.15,
                        help="fraction of the peak a step of this small network reaches (assumed)")
    parser.add_argument("--gpu-launch-ms", type=float, default=3.0,
                        help="fixed per-step cost: ~300 kernel launches + optimiser (assumed)")
    parser.add_argument("--out", default=str(RESULTS / "scale.json"))
    args = parser.parse_args()

    train, step, gpu = _load("train.json"), _load("step.json"), _load("gpu_check.json")
    if train is None or step is None:
        print("bench/results/train.json and step.json are needed: run bench/bench_train.py and bench/bench_step.py first",
              file=sys.stderr)
        return 2
    res = train["results"]
    ray1, ray2 = res["ray1"], res["ray2"]
    n_params = int(ray2.get("n_params") or ray1["n_params"])
    nbytes = 4.0 * n_params
    batch = int(train["batch_size_per_worker"])
    size_key = next(k for k in step["results"] if k.startswith("64px_params"))
    stage_step = step["results"][size_key]["stage"]
    gflop_per_patch = stage_step["gflop"] / stage_step["batch"]
    decode_s_per_patch = stage_step["parts_s"].get("decode", 0.0) / stage_step["batch"]

    print("measured on this machine (Ray Train, CPU workers of 1 thread, gloo):")
    base = ray1["patches_per_s"]
    for k, r in (("1 worker", ray1), ("2 workers", ray2)):
        print(f"  {k:10s}: {r['patches_per_s']:6.2f} patches/s, step {r['step_s_median'] * 1e3:6.1f} ms "
              f"({r['patches_per_s'] / base:.2f}x 1 worker)")
    ar = ray2.get("allreduce_s")
    print(f"  DDP all-reduce: {n_params} parameters x 4 B = {nbytes / 1e6:.2f} MB per step"
          + (f"; gloo on this host, timed alone: {ar * 1e3:.1f} ms "
             f"({nbytes / ar / 1e9:.2f} GB/s effective, ring formula at N=2: 2(N-1)/N x bytes)" if ar else ""))
    print(f"  step FLOPs: {gflop_per_patch:.2f} GFLOP per 64x64 patch (forward + loss + backward); data decode "
          f"{decode_s_per_patch * 1e6:.0f} us CPU per patch")

    cpu_compute = ray1["step_s_median"]
    cpu_proj = project(cpu_compute, batch, nbytes, args.workers)
    gap = _two_worker_gap(ray1, ray2, nbytes, batch)
    print(f"  model at N=2 on this host: {gap['model_patches_per_s']:.2f} patches/s; measured {ray2['patches_per_s']:.2f} "
          f"({ray2['patches_per_s'] / gap['model_patches_per_s']:.2f}): per step, the training thread's CPU "
          f"+{gap['corun_cpu_ms']:.0f} ms (2 workers on 2 cores share caches and memory bandwidth), "
          f"waiting {gap['wait_ms']:.0f} ms (all-reduce, and the CPU of Ray's other processes, "
          f"{gap['background_cpu_ms']:.0f} ms per step, on the cores the workers use); "
          "the projection assumes a core or GPU per worker")
    _table(f"projection, CPU workers like this one (compute {cpu_compute * 1e3:.0f} ms per step of {batch}), "
           "patches/s (scaling efficiency)", cpu_proj, args.workers)

    if gpu is not None:
        gpu_compute = gpu["step_s_median"]
        gpu_batch = int(gpu["batch_size_per_worker"])
        source = f"measured by bench/gpu_check.sh on {gpu.get('device', 'a GPU')}"
    else:
        gpu_batch = args.gpu_batch
        gpu_compute = gflop_per_patch * gpu_batch / (args.gpu_peak_tflops * 1e3 * args.gpu_utilisation) + args.gpu_launch_ms / 1e3
        source = (f"assumed: {args.gpu_peak_tflops:.0f} TFLOP/s bf16 peak x {args.gpu_utilisation:.2f} utilisation "
                  f"+ {args.gpu_launch_ms:.1f} ms launch overhead; no GPU measured")
    gpu_proj = project(gpu_compute, gpu_batch, nbytes, args.workers)
    _table(f"projection, GPU workers (compute {gpu_compute * 1e3:.1f} ms per step of {gpu_batch}; {source}), "
           "patches/s (scaling efficiency)", gpu_proj, args.workers)
    per_gpu = gpu_batch / gpu_compute
    print(f"\n  one GPU at {per_gpu:.0f} patches/s needs {per_gpu * decode_s_per_patch:.2f} CPU cores of patch decode "
          f"and {per_gpu * 64 * 64 * 2 * 4 / 1e9:.3f} GB/s host-to-device copies (fp32 IR + visible)")
    print("  assumptions: equal workers, no overlap of the all-reduce with backward (a lower bound on efficiency),"
          " per-worker batch fixed (weak scaling), links' effective bandwidth and latency as in LINKS")
    report = {"measured": {"ray1": {k: ray1[k] for k in ("patches_per_s", "step_s_median")},
                           "ray2": {k: ray2[k] for k in ("patches_per_s", "step_s_median")},
                           "allreduce_s_gloo_local": ar, "n_params": n_params, "allreduce_bytes": nbytes,
                           "two_worker_gap": gap,
                           "gflop_per_patch": gflop_per_patch, "decode_s_per_patch": decode_s_per_patch},
              "links_gbs_latency_us": LINKS,
              "cpu": {"compute_s": cpu_compute, "batch": batch, "projection": cpu_proj},
              "gpu": {"compute_s": gpu_compute, "batch": gpu_batch, "source": source, "projection": gpu_proj},
              "model": "step(N) = compute(B) + 2(N-1)/N * bytes/bandwidth + 2(N-1) * latency"}
    from pipeline.common.atomic_io import write_json

    out = write_json(args.out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
