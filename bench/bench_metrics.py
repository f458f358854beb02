"""Time the eleven fusion metrics on one 640x480 image, on one core.

Prints the wall-clock and CPU time of each metric (medians over ``--repeats`` runs; CPU time is the
fairer figure on a shared, overloaded machine) and of ``compute_all``, and writes
them with the machine description to ``bench/results/metrics.json``.

Usage: ``python bench/bench_metrics.py [--repeats 7] [--pair PATH_IR PATH_VI PATH_FUSED]``
(default: a synthetic 640x480 scene, so the script runs without ../shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from pipeline.common.machine import provenance  # noqa: E402
from pipeline.evaluate.metrics import METRIC_FUNCTIONS, METRICS, compute_all  # noqa: E402


def synthetic_triplet(h: int = 480, w: int = 640, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IR, visible and fused 0-255 float images with structure and noise (not flat)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    ir = 60 + 40 * np.sin(xx / 37.0) + 30 * np.cos(yy / 23.0) + rng.normal(0, 6, (h, w))
    ir[h // 3 : h // 2, w // 4 : w // 3] += 120  # a hot object
    vi = 100 + 0.2 * xx - 0.1 * yy + 25 * np.sign(np.sin(xx / 9.0) * np.sin(yy / 11.0)) + rng.normal(0, 4, (h, w))
    ir, vi = (np.clip(np.round(x), 0, 255) for x in (ir, vi))
    fused = np.clip(np.round(np.maximum(ir, vi) * 0.5 + (ir + vi) * 0.25), 0, 255)
    return ir, vi, fused


def time_call(fn, repeats: int) -> tuple[float, float]:
    """Median wall-clock and CPU (process) seconds of ``fn()`` after one warm-up call."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--pair", nargs=3, metavar=("IR", "VI", "FUSED"), help="score these files instead")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "metrics.json")
    args = parser.parse_args(argv)

    cv2.setNumThreads(1)  # one core, as the requirement says
    load_before = os.getloadavg()
    if args.pair:
        from pipeline.data.images import read_gray

        a, b, f = (read_gray(p).astype(np.float64) for p in args.pair)
        source = "files: " + ", ".join(args.pair)
    else:
        a, b, f = synthetic_triplet()
        source = "synthetic 640x480"
    per_metric = {name: time_call(lambda fn=METRIC_FUNCTIONS[name]: fn(a, b, f), args.repeats) for name in METRICS}
    total = time_call(lambda: compute_all(a, b, f), args.repeats)

    print(f"image: {source}, shape {a.shape}, median of {args.repeats} runs, 1 OpenCV thread")
    print(f"machine: {os.cpu_count()} cores, load average {load_before[0]:.1f} (timings inflate when it exceeds the cores)")
    print(f"  {'':11s} {'wall ms':>8s} {'CPU ms':>8s}")
    for name in METRICS:
        print(f"  {name:11s} {per_metric[name][0] * 1e3:8.1f} {per_metric[name][1] * 1e3:8.1f}")
    print(f"  {'sum':11s} {sum(w for w, _ in per_metric.values()) * 1e3:8.1f} {sum(c for _, c in per_metric.values()) * 1e3:8.1f}")
    print(f"  {'compute_all':11s} {total[0] * 1e3:8.1f} {total[1] * 1e3:8.1f}  ({1.0 / total[0]:.1f} images/s wall)")

    result = {
        "benchmark": "metrics",
        "image": source,
        "shape": list(a.shape),
        "repeats": args.repeats,
        "seconds_per_metric": {k: w for k, (w, _) in per_metric.items()},
        "cpu_seconds_per_metric": {k: c for k, (_, c) in per_metric.items()},
        "seconds_compute_all": total[0],
        "cpu_seconds_compute_all": total[1],
        "machine": provenance(load_before, opencv_threads=cv2.getNumThreads(), device="cpu"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
