"""Screen training choices on the recipe's validation split, never on its test set.

Each run trains with the ``train`` stage's own code (``pipeline.train.driver.run_training``: Ray
Train, the recipe's prepared data, logged to the MLflow experiment ``mda-screen``), fuses the
recipe's ``val`` pairs with the result through ``mda fuse``'s code path (``Fuser``) and scores
them with ``mda evaluate``'s (``evaluate_folder``): the headline metrics and the brightness
diagnostics, overall and per group (dataset; day and night). One JSON line per run goes to
``bench/results/screen.jsonl``; ``--table`` prints the runs as a Markdown table (means, and
mean +- std over seeds when a name was run with several).

Needs the recipe's data stages: ``dvc repro recipes/cpu/dvc.yaml:stats``.

Usage::

    python bench/screen.py NAME [-S key=value ...] [--steps 300] [--seed 0]
    python bench/screen.py --table [--names a,b]

Groups: ``MSRS-day``/``MSRS-night`` by the pair name (``D``/``N``); the other datasets' pairs are
``day`` when the mean visible luma is at least ``DAY_LUMA`` (RoadScene's sunlit FLIR frames, 128
to 185 on the validation pairs; its dusk and street-light frames are 73 to 107), else ``night``.
``--table`` recomputes the groups from each run's ``val_per_image.csv``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.common.atomic_io import write_json
from pipeline.common.config import load_params
from pipeline.data.contracts import read_registered_pair, read_split
from pipeline.data.gather import read_datasets
from pipeline.data.images import read_gray, write_image
from pipeline.evaluate.metrics import DIAGNOSTICS
from pipeline.evaluate.ship import HEADLINE

RECIPE = Path("recipes/cpu")
RESULTS = Path("bench/results/screen.jsonl")
DAY_LUMA = 110.0
COLUMNS = (*HEADLINE, *DIAGNOSTICS)


def set_dotted(params: dict[str, Any], key: str, value: Any) -> None:
    node = params
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def group_of(stem: str, dataset: str, vi_luma: float) -> str:
    if dataset == "MSRS" and stem[-1:] in ("D", "N"):
        return f"MSRS-{'day' if stem.endswith('D') else 'night'}"
    return "day" if vi_luma >= DAY_LUMA else "night"


def fuse_val(checkpoint: Path | str, registered: Path, ids: list[str], out: Path) -> None:
    """Fuse the pairs ``ids`` with a checkpoint, or a pixel baseline (``average``/``maximum``)."""
    from pipeline.evaluate.stage import PIXEL_METHODS, fuse_average, fuse_maximum
    from pipeline.model.inference import Fuser

    if str(checkpoint) in PIXEL_METHODS:
        fuser = fuse_average if str(checkpoint) == "average" else fuse_maximum
    else:
        fuser = Fuser.from_file(checkpoint)
    for stem in ids:
        ir, vi = read_registered_pair(registered, stem)
        write_image(out / f"{stem}.png", fuser(ir, vi))


def screen(name: str, overrides: list[str], steps: int, seed: int, checkpoint: Path | None = None,
           epochs: int = 1, scored_steps: int = 0) -> dict[str, Any]:
    """Train (or take ``checkpoint``), then score the validation pairs; returns the record."""
    from pipeline.train.driver import run_training
    from pipeline.train.runs import TrainPaths

    recipe = RECIPE.resolve()
    params = load_params(recipe / "params.yaml")
    for item in overrides:
        key, value = item.split("=", 1)
        set_dotted(params, key, yaml.safe_load(value))
    tag = f"screen-{name}-s{seed}-{steps}"
    set_dotted(params, "train.steps", steps)
    set_dotted(params, "train.seed", seed)
    set_dotted(params, "train.run_name", tag)
    set_dotted(params, "train.experiment", "mda-screen")
    set_dotted(params, "train.epochs", epochs)  # validation + checkpoint rounds (the schedule follows the steps)
    out = (Path("bench/results/screen") / (tag if checkpoint is None else f"score-{name}")).resolve()
    data = recipe / "data"
    paths = TrainPaths(patches_dir=data / "stats" / "patches", registered_dir=data / "registered",
                       split_json=data / "patches" / "split.json", images_parquet=data / "stats" / "images.parquet",
                       best_checkpoint=out / "best.pt", summary_json=out / "train.json", metrics_json=out / "metrics.json",
                       loss_csv=out / "loss.csv", val_csv=out / "val.csv", root=recipe)
    t0 = time.time()
    if checkpoint is None:
        cwd = os.getcwd()
        os.chdir(recipe)  # the recipe's relative paths (init weights, VGG file, MLflow store, Ray storage)
        try:
            summary = run_training(params, paths)
        finally:
            os.chdir(cwd)
    else:
        summary = {"fit_time_s": None, "stopped_by": None, "run_id": None}
    record = score_val(name, paths.best_checkpoint if checkpoint is None else checkpoint, data, out)
    record.update({"overrides": overrides, "steps": steps if checkpoint is None else scored_steps, "seed": seed,
                   "fit_time_s": summary.get("fit_time_s"), "wall_s": round(time.time() - t0, 1),
                   "stopped_by": summary.get("stopped_by"), "mlflow_run_id": summary.get("run_id")})
    if summary.get("run_id"):
        _log_to_mlflow(summary, record["means"], record["groups"])
    write_json(out / "record.json", record)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    return record


def score_val(name: str, checkpoint: Path, data: Path, out: Path) -> dict[str, Any]:
    """Fuse the recipe's ``val`` pairs with ``checkpoint`` and score them (overall and per group)."""
    from pipeline.evaluate.score import evaluate_folder

    registered = data / "registered"
    ids = sorted(read_split(data / "patches" / "split.json")["val"])
    fused = out / "fused"
    fuse_val(checkpoint, registered, ids, fused)
    df = evaluate_folder(registered / "ir", registered / "vi", fused, parallel=False)
    datasets = read_datasets(data / "raw")
    groups = {}
    for stem in df["name"]:
        vi = read_gray(registered / "vi" / f"{stem}.png")
        groups[stem] = group_of(stem, datasets.get(stem, "?"), float(vi.mean()))
    df["group"] = df["name"].map(groups)
    df.to_csv(out / "val_per_image.csv", index=False)
    means = {m: float(df[m].mean()) for m in COLUMNS}
    by_group = {g: {m: float(sub[m].mean()) for m in COLUMNS} | {"pairs": int(len(sub))} for g, sub in df.groupby("group")}
    return {"name": name, "val_pairs": len(df), "means": means, "groups": by_group, "out": str(out)}


def _log_to_mlflow(summary: dict[str, Any], means: dict[str, float], groups: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.common.mlflow_store import log_metrics_batched

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    values = {f"valsplit/{m}": v for m, v in means.items() if math.isfinite(v)}
    for g, vals in groups.items():
        values.update({f"valsplit_{g}/{m}": v for m, v in vals.items() if isinstance(v, float) and math.isfinite(v)})
    log_metrics_batched(client, summary["run_id"], values, step=0)


def regroup(record: dict[str, Any], data: Path = RECIPE / "data") -> dict[str, Any]:
    """The record's per-group means recomputed from its ``val_per_image.csv`` (current ``group_of``)."""
    import pandas as pd

    out = Path(record.get("out") or "")
    csv = out / "val_per_image.csv"
    if not csv.is_file():
        return record
    df = pd.read_csv(csv)
    datasets = read_datasets(data / "raw")
    df["group"] = [group_of(n, datasets.get(n, "?"), float(read_gray(data / "registered" / "vi" / f"{n}.png").mean()))
                   for n in df["name"].astype(str)]
    record["groups"] = {g: {m: float(sub[m].mean()) for m in COLUMNS} | {"pairs": int(len(sub))}
                        for g, sub in df.groupby("group")}
    return record


def table(names: list[str] | None = None) -> str:
    rows = [json.loads(ln) for ln in RESULTS.read_text().splitlines() if ln.strip()]
    if names:
        rows = [r for r in rows if r["name"] in names]
    for r in rows:
        r.setdefault("out", str(Path("bench/results/screen") / (f"screen-{r['name']}-s{r['seed']}-{r['steps']}"
                                                               if r["steps"] else f"score-{r['name']}")))
        regroup(r)
    by: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["name"], r["steps"]), []).append(r)
    groups = sorted({g for r in rows for g in r["groups"]})
    head = ["run", "steps", "seeds", *COLUMNS, *(f"VIgap {g}" for g in groups), "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (name, steps), runs in by.items():
        def cell(values: list[float]) -> str:
            vals = [v for v in values if v is not None and math.isfinite(v)]
            if not vals:
                return "n/a"
            if len(vals) == 1:
                return f"{vals[0]:.3f}"
            return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}"

        cells = [cell([r["means"][m] for r in runs]) for m in COLUMNS]
        cells += [cell([r["groups"].get(g, {}).get("VIgap", float("nan")) for r in runs]) for g in groups]
        cells.append(cell([r["fit_time_s"] for r in runs]))
        lines.append(f"| {name} | {steps} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default 300); with --score: "
                        "the steps the checkpoint was trained for, recorded")
    parser.add_argument("--epochs", type=int, default=1, help="validation + checkpoint rounds (the recipe: 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--score", default=None, metavar="CKPT",
                        help="no training: score this checkpoint (or 'average'/'maximum') on the validation pairs")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--names", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.table:
        print(table(args.names.split(",") if args.names else None))
        return 0
    if not args.name:
        parser.error("NAME is required (or --table)")
    record = screen(args.name, args.overrides, args.steps or 300, args.seed, checkpoint=args.score, epochs=args.epochs,
                    scored_steps=args.steps or 0)
    print(json.dumps({k: record[k] for k in ("name", "steps", "seed", "fit_time_s", "means")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
