"""DVC stage ``evaluate``: fuse the test split with the trained model and the baselines, score it.

Usage: ``python stages/evaluate.py --params params.yaml --train-info models/train.json
--registered data/registered --split data/patches/split.json --out eval --metrics metrics/eval``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping

from pipeline.common.config import section
from pipeline.common.machine import use_huge_pages
from pipeline.common.mlflow_store import configure_mlflow
from pipeline.common.stage import Arg, run_stage
from pipeline.train.summary import read_train_info


def run(args: argparse.Namespace, params: Mapping[str, Any]) -> str:
    """The stage's work; returns its summary."""
    from pipeline.evaluate.stage import EvalConfig, evaluate, log_to_run  # torch: after use_huge_pages

    cfg = EvalConfig.from_params(section(params, "evaluate"))
    info = read_train_info(args.train_info)
    result = evaluate(info["checkpoint"], args.registered, args.split, args.out, args.metrics, cfg)
    configure_mlflow()
    log_to_run(info["run_id"], result)
    return Path(result.paths["table"]).read_text()


def main(argv: list[str] | None = None) -> int:
    """Run the stage (``argv``: its arguments, ``sys.argv[1:]`` when ``None``); returns the exit code."""
    use_huge_pages()  # before torch and the local Ray's workers start: inference on 2 MB pages
    return run_stage("evaluate", __doc__, run,
                     Arg("--train-info", "models/train.json of the train stage"),
                     Arg("--registered", "registered images (ir/, vi/)"),
                     Arg("--split", "split.json of the crop stage"),
                     Arg("--out", "report folder (per_image.csv, table.md, grid.png, fused/)", output="staged-dir"),
                     Arg("--metrics", "folder of the DVC metrics: <method>.json with the headline means",
                         output="dir"), ray=True, mlflow=True, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
