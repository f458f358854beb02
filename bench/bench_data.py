"""Crop + stats throughput and peak memory: Ray Data (the stages' code) vs a plain single-process loop.

Both do the same work on the same registered pairs (RoadScene by default, copied once into the
registered layout, untimed): crop every pair into patches -> Parquet shards + split.json; whole-image
statistics; pass 1 (patch statistics, staged), the data-derived scales, pass 2 (weights) ->
Parquet; weight metrics. The loop calls the same per-batch functions as the Ray Data maps.

Each (mode, pair count) runs in a fresh child process. Peak memory = the largest sum of PSS
(proportional set size: shared pages split between processes, so the Ray object store is not
counted twice) over the child's whole process tree (driver + raylet + GCS + workers for Ray),
sampled every 0.2 s during the timed work. Ray start-up (``ray.init``) and a warm-up run on the
first 6 pairs (Ray's worker processes start and import their libraries on the first task) are
reported apart as fixed start-up costs, not counted in the (steady-state) throughput.

Usage: ``python bench/bench_data.py [--dataset ../shared/data/RoadScene] [--pairs 55 221]
[--num-cpus 2]``; prints the figures and their ratio, writes ``bench/results/data.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # registered_fixtures: the registered layout from a raw dataset


class TreeMemory:
    """Sample the summed PSS (or RSS where PSS is unavailable) of this process and its descendants."""

    def __init__(self, interval: float = 0.2) -> None:
        import psutil

        self.root = psutil.Process(os.getpid())
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> int:
        import psutil

        total = 0
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
                total += getattr(info, "pss", info.rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self.peak = max(self.peak, total)
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemory":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


WARMUP_PAIRS = 6


def subset(registered: Path, dst: Path, count: int) -> Path:
    """A registered folder holding the first ``count`` accepted pairs of ``registered`` (symlinks)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(registered / "manifest.parquet")
    table = table.filter(pc.equal(table["status"], "ok")).slice(0, count)
    for sub in ("ir", "vi"):
        (dst / sub).mkdir(parents=True)
    for pid in table.column("pair_id").to_pylist():
        for sub in ("ir", "vi"):
            (dst / sub / f"{pid}.png").symlink_to(registered / sub / f"{pid}.png")
    pq.write_table(table, dst / "manifest.parquet")
    return dst


def run_loop(reg: Path, out: Path, crop_cfg, stats_cfg) -> dict:
    """The same crop + stats work as the stages, in one process: the same shard functions in a loop."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data import stats_stage as C
    from pipeline.common.atomic_io import write_json
    from pipeline.data.contracts import SPLITS
    from pipeline.data.crop import crop_shard, plan_crop, plan_shards

    items, record = plan_crop(reg, crop_cfg)
    patches = out / "patches"
    patches.mkdir(parents=True)
    counts = {s: 0 for s in SPLITS}
    for shard in plan_shards(items, crop_cfg.pairs_per_shard):
        row = crop_shard(shard, str(reg), str(patches), crop_cfg.patch_size, crop_cfg.stride, crop_cfg.drop_flat)
        for s in SPLITS:
            counts[s] += row[s]
    record["counts"] = counts
    write_json(patches / "split.json", record)

    stats = out / "stats"
    (stats / ".pass1").mkdir(parents=True)
    (stats / "patches").mkdir()
    image_table = C.image_stats_batch({"pair_id": [r["pair_id"] for r in items], "split": [r["split"] for r in items]},
                                      str(reg), stats_cfg.log_sigma)
    cols = {c: image_table.column(c).to_numpy() for c in image_table.column_names}
    img_scales, _ = C._level_scales(cols, stats_cfg)
    img_w = C.adaptive_weights({s: cols[f"ir_{s}"] for s in C.STAT_NAMES}, {s: cols[f"vi_{s}"] for s in C.STAT_NAMES},
                               stats_cfg.normalisation(img_scales))
    for name in C.WEIGHT_NAMES:
        image_table = image_table.append_column(f"w_{name}", pa.array(np.atleast_1d(img_w[name]), pa.float64()))
    pq.write_table(image_table, stats / "images.parquet")
    image_weights = {pid: tuple(float(img_w[n][i]) for n in C.WEIGHT_NAMES) for i, pid in enumerate(cols["pair_id"])}
    shards = [{"file": p.name} for p in sorted(patches.glob("part-*.parquet"))]
    only = None if stats_cfg.scale_split == "all" else stats_cfg.scale_split
    rows = [C.stats_shard(sh, str(patches), str(stats / ".pass1"), stats_cfg.log_sigma, stats_cfg.terms, only) for sh in shards]
    norm = stats_cfg.normalisation(C.accumulate_scales(rows, stats_cfg.terms, only)[0])
    norm_arg = {"scales": dict(norm.scales), "temperature": norm.temperature,
                "intensity_terms": list(norm.intensity_terms), "detail_terms": list(norm.detail_terms)}
    watched = ["w_int_ir", "w_det_ir"]
    rows = [C.weights_shard(sh, str(stats / ".pass1"), str(stats / "patches"), norm_arg, image_weights, watched)
            for sh in shards]
    metrics, _ = C.accumulate_weight_metrics(rows, watched)
    return {"patches": sum(counts.values()), "w_int_ir": metrics["w_int_ir"]}


def run_ray(reg: Path, out: Path, crop_cfg, stats_cfg) -> dict:
    """The stages' code: ``crop_dataset`` then ``compute_stats`` on the running Ray."""
    from pipeline.data.stats_stage import compute_stats
    from pipeline.data.crop import crop_dataset

    record = crop_dataset(reg, out / "patches", crop_cfg)
    metrics = compute_stats(out / "patches", reg, out / "stats", stats_cfg)
    return {"patches": sum(record["counts"].values()), "w_int_ir": metrics["patch"]["w_int_ir"]}


def child(args: argparse.Namespace) -> int:
    """One timed run (``--child MODE``); prints a JSON line."""
    import logging

    from pipeline.data.stats_stage import StatsConfig
    from pipeline.common.config import load_params, section
    from pipeline.data.crop import CropConfig

    logging.disable(logging.WARNING)
    params = load_params(args.params)
    crop_cfg = CropConfig.from_params(section(params, "crop"))
    stats_cfg = StatsConfig.from_params(section(params, "stats"))
    result: dict = {"mode": args.child, "pairs": args.count}
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        out = Path(tmp)
        if args.child == "ray":
            import ray

            t0 = time.perf_counter()
            ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            result["ray_init_s"] = round(time.perf_counter() - t0, 2)
            import ray.data

            ray.data.DataContext.get_current().enable_progress_bars = False
        # Warm-up on the first few pairs, timed apart: Ray's worker processes start and import
        # numpy/OpenCV/pyarrow on their first task (the loop pays its imports here too). The
        # throughput below is the steady state; the warm-up is the fixed start-up cost.
        t0 = time.perf_counter()
        warm = out / "warmup"
        (run_ray if args.child == "ray" else run_loop)(subset(args.registered, warm / "reg", WARMUP_PAIRS),
                                                       warm, crop_cfg, stats_cfg)
        result["warmup_s"] = round(time.perf_counter() - t0, 2)
        with TreeMemory() as mem:
            baseline = mem.sample()
            t0, c0 = time.perf_counter(), time.process_time()
            work = (run_ray if args.child == "ray" else run_loop)(args.registered, out, crop_cfg, stats_cfg)
            wall = time.perf_counter() - t0
            driver_cpu = time.process_time() - c0
        if args.child == "ray":
            import ray

            ray.shutdown()
    result.update(work)
    result.update(
        wall_s=round(wall, 2),
        driver_cpu_s=round(driver_cpu, 2),
        patches_per_s=round(work["patches"] / wall, 1),
        peak_mem_mib=round(mem.peak / 2**20, 1),
        mem_at_start_mib=round(baseline / 2**20, 1),
    )
    print("RESULT " + json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "data" / "RoadScene")
    parser.add_argument("--pairs", type=int, nargs="+", default=[55, 221], help="pair counts to measure")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="crop/stats sections used")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data.json")
    parser.add_argument("--child", choices=["ray", "loop"], help=argparse.SUPPRESS)
    parser.add_argument("--registered", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    if not (args.dataset / "ir").is_dir():
        print(f"bench_data: dataset not found: {args.dataset} (needs ir/ and vi/)", file=sys.stderr)
        return 1

    from registered_fixtures import registered_from_dataset

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_reg_") as tmp:
        for count in args.pairs:
            reg = Path(tmp) / f"reg{count}"
            stems = registered_from_dataset(args.dataset, reg, count)
            for mode in ("loop", "ray"):
                cmd = [sys.executable, __file__, "--child", mode, "--registered", str(reg), "--count", str(len(stems)),
                       "--num-cpus", str(args.num_cpus), "--params", str(args.params)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                    return 1
                run = json.loads(line[0][len("RESULT "):])
                runs.append(run)
                print(f"{mode:5s} {run['pairs']:4d} pairs: {run['patches']} patches in {run['wall_s']:.1f} s = "
                      f"{run['patches_per_s']:.0f} patches/s, peak memory {run['peak_mem_mib']:.0f} MiB"
                      + f" (start-up not counted: warm-up {run['warmup_s']:.1f} s"
                      + (f", ray.init {run['ray_init_s']:.1f} s)" if mode == "ray" else ")"))
    by = {(r["mode"], r["pairs"]): r for r in runs}
    ratios = {}
    for count in sorted({r["pairs"] for r in runs}):
        loop, ray_run = by[("loop", count)], by[("ray", count)]
        ratios[count] = {
            "throughput_ratio": round(ray_run["patches_per_s"] / loop["patches_per_s"], 2),
            "memory_ratio": round(ray_run["peak_mem_mib"] / loop["peak_mem_mib"], 2),
        }
        print(f"{count} pairs: Ray/loop throughput {ratios[count]['throughput_ratio']:.2f}x, "
              f"memory {ratios[count]['memory_ratio']:.2f}x")
    counts = sorted({r["pairs"] for r in runs})
    if len(counts) > 1:
        for mode in ("loop", "ray"):
            growth = by[(mode, counts[-1])]["peak_mem_mib"] / by[(mode, counts[0])]["peak_mem_mib"]
            print(f"{mode}: peak memory {counts[-1]} vs {counts[0]} pairs: {growth:.2f}x")
    import torch

    load = os.getloadavg()
    report = {
        "benchmark": "crop + stats (Ray Data vs single-process loop)",
        "dataset": str(args.dataset),
        "runs": runs,
        "ratios": ratios,
        "machine": {
            "cores": os.cpu_count(),
            "ray_num_cpus": args.num_cpus,
            "torch_threads": torch.get_num_threads(),
            "device": "cpu",
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_after": [round(x, 2) for x in load],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"load average after the runs: {load[0]:.1f} (other processes distort the figures when high)")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
