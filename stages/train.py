"""DVC stage ``train``: Ray Train DDP training on the patch table, tracked in MLflow.

Usage: ``python stages/train.py --params params.yaml --patches data/stats/patches
--images data/stats/images.parquet --registered data/registered --split data/patches/split.json
--checkpoint models/best.pt`` (and, with these defaults, ``--summary models/train.json --metrics
metrics/train.json --loss-plot plots/train_loss.csv --val-plot plots/train_val.csv``)

Joins the Ray cluster of ``ray.address`` / ``RAY_ADDRESS`` when set, else starts a local Ray.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping

from pipeline.common.stage import USER_ERRORS, Arg, run_stage


def run(args: argparse.Namespace, params: Mapping[str, Any]) -> str:
    """The stage's work; returns the training summary as JSON."""
    from pipeline.train.driver import run_training
    from pipeline.train.runs import TrainPaths

    paths = TrainPaths(
        patches_dir=Path(args.patches), registered_dir=Path(args.registered), split_json=Path(args.split),
        images_parquet=Path(args.images), best_checkpoint=Path(args.checkpoint),
        summary_json=Path(args.summary), metrics_json=Path(args.metrics),
        loss_csv=Path(args.loss_plot), val_csv=Path(args.val_plot), root=Path.cwd(),
    )
    summary = run_training(params, paths, run_name=args.run_name)
    return format_summary(summary)


def format_summary(summary: Mapping[str, Any]) -> str:
    """Two lines: the run and its steps, and where the model went (all figures: ``--summary``)."""
    m = summary.get("metrics") or {}
    figures = ", ".join(f"{k} {m[k]:.4f}" for k in ("val_ssim", "val_qabf", "val_loss") if k in m)
    return (f"train: run {summary['run_name']}: {summary.get('steps')} steps (stopped by {summary.get('stopped_by')}) "
            f"in {summary.get('fit_time_s')} s; {figures}\n"
            f"  best checkpoint {summary['checkpoint']} ({summary['best_metric']['name']} "
            f"{summary['best_metric']['value']:.4f}, epoch {summary['best_metric']['epoch']}); MLflow run {summary['run_id']}")


def main(argv: list[str] | None = None) -> int:
    """Run the stage (``argv``: its arguments, ``sys.argv[1:]`` when ``None``); returns the exit code."""
    return run_stage("train", __doc__, run,
                     Arg("--patches", "stats stage's patch table (folder of part-*.parquet)"),
                     Arg("--images", "stats stage's per-pair table (images.parquet)"),
                     Arg("--registered", "registered images (ir/, vi/)"),
                     Arg("--split", "split.json of the crop stage"),
                     Arg("--checkpoint", "best checkpoint out (our format)", output="file"),
                     Arg("--summary", "JSON with run_id, model_uri, checkpoint, best_metric and every figure",
                         {"default": "models/train.json"}, output="file"),
                     Arg("--metrics", "the few training figures of the DVC metrics", {"default": "metrics/train.json"},
                         output="file"),
                     Arg("--loss-plot", "per-step loss terms CSV (DVC plots)", {"default": "plots/train_loss.csv"},
                         output="file"),
                     Arg("--val-plot", "per-epoch train/val metrics CSV (DVC plots)", {"default": "plots/train_val.csv"},
                         output="file"),
                     Arg("--run-name", "override train.run_name (same name resumes)", {"default": None}),
                     mlflow=True, errors=(*USER_ERRORS, RuntimeError), argv=argv)


if __name__ == "__main__":
    sys.exit(main())
