"""Training throughput: a plain PyTorch loop vs Ray Train with 1 and 2 workers, same Parquet data.

Measures steady-state patches/s (after warm-up steps, start-up excluded; from the median step time,
which a busy shared machine disturbs less than the mean, both are recorded) for

- ``plain``: one process, batches decoded from the Parquet patch table with
  ``pipeline.train.data.decode_patches``, with 1 torch thread (measured before and after the Ray
  runs, best taken) and with all cores as threads;
- ``ray1``: Ray Train, 1 worker, 1 torch thread, data through Ray Data (``get_dataset_shard`` +
  ``iter_torch_batches`` + ``PatchCollate``): its ratio to the 1-thread plain loop is the Ray
  Train overhead (same threads: a fair comparison even on a shared machine);
- ``ray2``: Ray Train, 2 workers of 1 thread (DDP over gloo);

with the same model (``model:`` of params.yaml), loss, optimiser and ``train_step`` as the
``train`` stage; plus the fixed start-up time of a Ray Train run (``fit()`` called -> first step).
Prints the figures and the ratios to the plain loop, writes ``bench/results/train.json``.

Usage: ``python bench/bench_train.py [--patches data/stats/patches] [--steps 10] [--warmup 3]``
(without the patch table it generates a synthetic one of 64x64 patches in a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def synthetic_patches(folder: Path, n: int = 512, size: int = 64, seed: int = 0) -> Path:
    """Write a patch table with the stats stage's columns (smooth random textures)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    rows = {k: [] for k in ("pair_id", "split", "y", "x", "size", "ir", "vi", "w_int_ir", "w_int_vi", "w_det_ir", "w_det_vi")}
    for i in range(n):
        f1, f2 = rng.uniform(2, 9, 2)
        vi = 120 + 80 * np.sin(xx / f1) * np.cos(yy / f2) + rng.normal(0, 8, (size, size))
        ir = 50 + 150 * np.exp(-((xx - rng.uniform(0, size)) ** 2 + (yy - rng.uniform(0, size)) ** 2) / 80)
        a, b = rng.uniform(0.2, 0.8, 2)
        for k, v in (("pair_id", f"s{i // 16:03d}"), ("split", "train"), ("y", 0), ("x", 0), ("size", size),
                     ("ir", np.clip(ir, 0, 255).astype(np.uint8).tobytes()),
                     ("vi", np.clip(vi, 0, 255).astype(np.uint8).tobytes()),
                     ("w_int_ir", a), ("w_int_vi", 1 - a), ("w_det_ir", b), ("w_det_vi", 1 - b)):
            rows[k].append(v)
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table(rows).cast(pa.schema([
        ("pair_id", pa.string()), ("split", pa.string()), ("y", pa.int32()), ("x", pa.int32()), ("size", pa.int32()),
        ("ir", pa.binary()), ("vi", pa.binary()), ("w_int_ir", pa.float64()), ("w_int_vi", pa.float64()),
        ("w_det_ir", pa.float64()), ("w_det_vi", pa.float64())]))
    pq.write_table(table, folder / "part-0000.parquet")
    return folder


def _setup(cfg: dict):
    import torch

    from pipeline.train.losses import FusionLoss
    from pipeline.model.network import build_model
    from pipeline.train.settings import TrainSettings
    from pipeline.train.step import build_optimizer

    torch.manual_seed(0)
    model = build_model(cfg["model_name"], **cfg["model_args"])
    loss_fn = FusionLoss.from_params(cfg["loss"])
    settings = TrainSettings(batch_size=cfg["batch_size"], warmup_steps=0)
    return model, loss_fn, build_optimizer(model, settings)


def plain(cfg: dict) -> dict:
    """Single-process loop over batches decoded from the Parquet table."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import torch

    from pipeline.train.data import decode_patches, patch_columns
    from pipeline.train.step import train_step

    torch.set_num_threads(cfg["threads"])
    t_start = time.perf_counter()
    table = pq.read_table(cfg["patches"], columns=list(patch_columns()) + ["split"])
    table = table.filter(pc.equal(table["split"], "train")).select(list(patch_columns()))
    model, loss_fn, opt = _setup(cfg)
    b, total = cfg["batch_size"], cfg["warmup"] + cfg["steps"]
    startup = time.perf_counter() - t_start
    times = []
    for i in range(total):
        t = time.perf_counter()
        lo = (i * b) % max(1, table.num_rows - b)
        batch = decode_patches(table.slice(lo, b).to_pydict())  # decoded per step, as on the workers
        train_step(model, {k: torch.from_numpy(v) for k, v in batch.items()}, loss_fn, opt, grad_clip=1.0)
        times.append(time.perf_counter() - t)
    return dict(_rates(times[cfg["warmup"]:], b), startup_s=startup)


def _rates(step_times: list[float], patches_per_step: int) -> dict:
    """Throughput from per-step wall times: the median step (robust to a busy shared machine) and the mean."""
    med, mean = float(np.median(step_times)), float(np.mean(step_times))
    return {"patches_per_s": patches_per_step / med, "patches_per_s_mean": patches_per_step / mean,
            "step_s_median": med, "step_s_mean": mean, "steps": len(step_times)}


def _ray_loop(cfg: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from pipeline.train.data import PatchCollate
    from pipeline.train.step import train_step

    ctx = ray.train.get_context()
    world = ctx.get_world_size()
    t_first = time.time()
    torch.set_num_threads(cfg["threads"])
    model, loss_fn, opt = _setup(cfg)
    model = ray.train.torch.prepare_model(model)
    shard = ray.train.get_dataset_shard("train")
    total = cfg["warmup"] + cfg["steps"]
    times: list[float] = []
    t = time.perf_counter()
    while len(times) < total:  # step time includes waiting for the next batch from Ray Data
        for batch in shard.iter_torch_batches(batch_size=cfg["batch_size"], collate_fn=PatchCollate("cpu"),
                                              drop_last=True):
            if not times:
                t_first = time.time()
            train_step(model, batch, loss_fn, opt, grad_clip=1.0)
            now = time.perf_counter()
            times.append(now - t)
            t = now
            if len(times) >= total:
                break
    if ctx.get_world_rank() == 0:  # Result.metrics only holds metrics reported with a checkpoint
        out = dict(_rates(times[cfg["warmup"]:], cfg["batch_size"] * world), first_step_at=t_first)
        Path(cfg["result_file"]).write_text(json.dumps(out))
    ray.train.report({"done": 1})


def ray_train(cfg: dict, workers: int, cpus: float, threads: int) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train.data import train_dataset

    ds = train_dataset(cfg["patches"]).materialize()
    storage = tempfile.mkdtemp(prefix="bench_train_")
    result_file = Path(storage) / "result.json"
    trainer = TorchTrainer(
        _ray_loop, train_loop_config=dict(cfg, threads=threads, result_file=str(result_file)), datasets={"train": ds},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=f"bench{workers}", storage_path=storage),
    )
    t_fit = time.time()
    result = trainer.fit()
    fit_s = time.time() - t_fit
    if result.error:
        raise result.error
    m = json.loads(result_file.read_text())
    m["startup_s"] = m.pop("first_step_at") - t_fit
    return dict(m, fit_s=fit_s, workers=workers, cpus_per_worker=cpus, threads_per_worker=threads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", default=str(REPO / "data" / "stats" / "patches"))
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--steps", type=int, default=12, help="measured steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="patches per worker per step")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "train.json"))
    args = parser.parse_args()

    import ray
    import torch

    from pipeline.common.config import load_params, section
    from pipeline.model.network import model_config

    params = load_params(args.params)
    patches = Path(args.patches)
    source = str(patches)
    if not list(patches.glob("*.parquet")):
        patches = synthetic_patches(Path(tempfile.mkdtemp(prefix="bench_patches_")))
        source = "synthetic 64x64 (no data/stats/patches: run `dvc repro stats` for the real table)"
    name, margs = model_config(section(params, "model"))
    cores = os.cpu_count() or 1
    cfg = {"patches": str(patches), "model_name": name, "model_args": margs, "loss": section(params, "loss"),
           "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "threads": cores}
    load_before = os.getloadavg()
    # Same thread count for the overhead figure: on a shared 2-core machine a 2-thread OpenMP loop
    # swings 5x with the neighbours' load, one thread per process does not.
    res = {"plain_1thread": plain(dict(cfg, threads=1))}
    print(f"plain loop, 1 thread      : {res['plain_1thread']['patches_per_s']:7.2f} patches/s", flush=True)
    res[f"plain_{cores}threads"] = plain(dict(cfg, threads=cores))
    print(f"plain loop, {cores} threads     : {res[f'plain_{cores}threads']['patches_per_s']:7.2f} patches/s", flush=True)
    ray.init(num_cpus=cores, include_dashboard=False, logging_level="WARNING")
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        res["ray1"] = ray_train(cfg, 1, 1.0, 1)
        print(f"Ray Train x1 (1 thread)   : {res['ray1']['patches_per_s']:7.2f} patches/s, start-up {res['ray1']['startup_s']:.1f} s", flush=True)
        res["ray2"] = ray_train(cfg, 2, max(0.25, (cores - 1) / 2), 1)
        print(f"Ray Train x2 (1 thread ea): {res['ray2']['patches_per_s']:7.2f} patches/s, start-up {res['ray2']['startup_s']:.1f} s", flush=True)
    finally:
        ray.shutdown()
    again = plain(dict(cfg, threads=1))  # measured again after the Ray runs: best of the two
    res["plain_1thread_repeat"] = again
    base = max(res["plain_1thread"]["patches_per_s"], again["patches_per_s"])
    ratios = {"ray1_vs_plain_1thread": res["ray1"]["patches_per_s"] / base,
              "ray2_vs_plain_1thread": res["ray2"]["patches_per_s"] / base,
              f"ray2_vs_plain_{cores}threads": res["ray2"]["patches_per_s"] / res[f"plain_{cores}threads"]["patches_per_s"]}
    overhead = 1.0 - ratios["ray1_vs_plain_1thread"]
    print(f"plain 1 thread (best of 2): {base:7.2f} patches/s")
    for k, v in ratios.items():
        print(f"ratio {k}: {v:.3f}")
    print(f"Ray Train 1-worker steady-state overhead: {overhead * 100:.1f}% (goal <= 10%)")
    report = {
        "results": res, "ratios_to_plain": ratios, "ray1_overhead": overhead,
        "data": source, "model": {"name": name, "args": margs}, "batch_size_per_worker": args.batch_size,
        "steps": args.steps, "warmup": args.warmup,
        "machine": {"cores": cores, "torch_threads": {"plain_1thread": 1, f"plain_{cores}threads": cores, "ray1": 1, "ray2": "1 per worker"}, "torch": torch.__version__, "ray": ray.__version__,
                    "python": platform.python_version(), "device": "cpu",
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
