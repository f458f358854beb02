"""DVC stage ``train``: Ray Train DDP training on the patch table, tracked in MLflow.

Usage: ``python stages/train.py --params params.yaml --patches data/stats/patches
--images data/stats/images.parquet --registered data/registered --split data/patches/split.json
--checkpoint models/best.pt --summary models/train.json --metrics metrics/train.json
--loss-plot plots/train_loss.csv --val-plot plots/train_val.csv``

Joins the Ray cluster of ``ray.address`` / ``RAY_ADDRESS`` when set, else starts a local Ray.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameter file")
    parser.add_argument("--patches", required=True, help="stats stage's patch table (folder of part-*.parquet)")
    parser.add_argument("--images", required=True, help="stats stage's per-pair table (images.parquet)")
    parser.add_argument("--registered", required=True, help="registered images (ir/, vi/)")
    parser.add_argument("--split", required=True, help="split.json of the crop stage")
    parser.add_argument("--checkpoint", required=True, help="best checkpoint out (our format)")
    parser.add_argument("--summary", required=True, help="JSON with run_id, model_uri, checkpoint, best_metric")
    parser.add_argument("--metrics", required=True, help="final metrics JSON (DVC metrics)")
    parser.add_argument("--loss-plot", required=True, help="per-step loss terms CSV (DVC plots)")
    parser.add_argument("--val-plot", required=True, help="per-epoch train/val metrics CSV (DVC plots)")
    parser.add_argument("--run-name", default=None, help="override train.run_name (same name resumes)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from pipeline.common.config import load_params
        from pipeline.train.driver import run_training
        from pipeline.train.runs import TrainPaths

        paths = TrainPaths(
            patches_dir=Path(args.patches), registered_dir=Path(args.registered), split_json=Path(args.split),
            images_parquet=Path(args.images), best_checkpoint=Path(args.checkpoint),
            summary_json=Path(args.summary), metrics_json=Path(args.metrics),
            loss_csv=Path(args.loss_plot), val_csv=Path(args.val_plot), root=Path.cwd(),
        )
        summary = run_training(load_params(args.params), paths, run_name=args.run_name)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
