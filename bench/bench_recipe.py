"""The CPU recipe's training through Ray Train against the single-process loop it replaced, side by
side in one run, on the recipe's own data.

- ``loop``: what the single-process loop of the first recipe (``recipe.py`` in ``pipeline/train``) did before the recipe became a DVC pipeline: one
  process, ``--threads`` torch threads (the old recipe used 1), 8 random 64x64 crops with flips
  per step drawn per pair (``CropSampler``, the same class the workers use) and ``train_step``.
- ``ray``: the train stage itself (``run_training``) with the recipe's parameters: 2 Ray Train
  workers (DDP over gloo), 4 crops each per step, so the same 8 crops per optimiser step.

Both run the same number of optimiser steps; patches/s is measured over the steps after
``--warmup`` (loop: median step time; Ray: the workers' own per-epoch figure, start-up excluded).
Prints both and their ratio, writes ``bench/results/recipe_speed.json``. Needs the recipe's data
stages (``dvc repro recipes/cpu/dvc.yaml:stats``).

Usage: ``python bench/bench_recipe.py [--steps 200] [--warmup 10] [--threads 1]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.common.atomic_io import write_json
from pipeline.common.config import load_params
from pipeline.common.machine import provenance

RECIPE = Path("recipes/cpu").resolve()
DATA = RECIPE / "data"


def loop(params: dict, steps: int, warmup: int, threads: int) -> dict:
    """The old recipe's loop, rebuilt from the pipeline's pieces."""
    import torch

    from pipeline.model.network import build_model, model_config
    from pipeline.train.data import CropSampler, load_train_pairs
    from pipeline.train.losses import FusionLoss, loss_section
    from pipeline.train.settings import TrainSettings
    from pipeline.train.step import build_optimizer, build_scheduler, prepare_for_training, train_step

    torch.set_num_threads(threads)
    s = TrainSettings.from_params(params)
    name, args = model_config(params["model"])
    torch.manual_seed(s.seed)
    model = prepare_for_training(build_model(name, **args), torch.device("cpu"))
    loss_fn = prepare_for_training(FusionLoss.from_params(loss_section(params)), torch.device("cpu"))
    opt = build_optimizer(model, s)
    sched = build_scheduler(opt, s, steps + warmup)
    pairs = load_train_pairs(DATA / "registered", DATA / "patches" / "split.json", DATA / "stats" / "images.parquet")
    batch = s.batch_size * s.num_workers  # the same crops per optimiser step as the Ray run
    sampler = CropSampler(pairs, s.crop_size, batch, s.pair_sampling, seed=s.seed)
    times = []
    for i in range(steps + warmup):
        t0 = time.perf_counter()
        train_step(model, next(sampler), loss_fn, opt, sched, s.grad_clip)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    return {"patches_per_s": batch / med, "patches_per_s_mean": batch / float(np.mean(times)), "threads": threads,
            "batch": batch, "steps": steps}


def ray(params: dict, steps: int) -> dict:
    """The train stage with the recipe's parameters, ``steps`` optimiser steps in one epoch."""
    from pipeline.train.driver import run_training
    from pipeline.train.runs import TrainPaths

    out = Path("bench/results/recipe_speed").resolve()
    params["train"].update(steps=steps, epochs=1, val_max_pairs=1, val_samples=0, run_name=f"bench-recipe-{int(time.time())}",
                           experiment="mda-bench")
    paths = TrainPaths(patches_dir=DATA / "stats" / "patches", registered_dir=DATA / "registered",
                       split_json=DATA / "patches" / "split.json", images_parquet=DATA / "stats" / "images.parquet",
                       best_checkpoint=out / "best.pt", summary_json=out / "train.json", metrics_json=out / "metrics.json",
                       loss_csv=out / "loss.csv", val_csv=out / "val.csv", root=RECIPE)
    cwd = os.getcwd()
    os.chdir(RECIPE)
    try:
        t0 = time.perf_counter()
        summary = run_training(params, paths)
        wall = time.perf_counter() - t0
    finally:
        os.chdir(cwd)
    metrics = json.loads(paths.metrics_json.read_text())
    return {"patches_per_s": metrics["train_patches_per_s"], "workers": params["train"]["num_workers"],
            "batch_per_worker": params["train"]["batch_size"], "steps": summary["steps"], "stage_wall_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the loop (the old recipe: 1)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/recipe_speed.json"))
    args = parser.parse_args(argv)
    if not (DATA / "stats" / "images.parquet").is_file():
        print(f"bench_recipe: run the recipe's data stages first: dvc repro recipes/cpu/dvc.yaml:stats", file=sys.stderr)
        return 2
    load = os.getloadavg()
    params = load_params(RECIPE / "params.yaml")
    plain = loop(params, args.steps, args.warmup, args.threads)
    print(f"loop ({args.threads} thread(s), {plain['batch']} crops/step): {plain['patches_per_s']:.2f} patches/s")
    distributed = ray(load_params(RECIPE / "params.yaml"), args.steps)
    ratio = distributed["patches_per_s"] / plain["patches_per_s"]
    print(f"Ray Train ({distributed['workers']} workers x {distributed['batch_per_worker']}): "
          f"{distributed['patches_per_s']:.2f} patches/s = {ratio:.2f}x the loop")
    write_json(args.out, {"loop": plain, "ray": distributed, "ray_over_loop": ratio, "machine": provenance(load)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
