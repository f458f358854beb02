"""DVC stage ``evaluate``: fuse the test split with the trained model and the baselines, score it.

Usage: ``python stages/evaluate.py --params params.yaml --train-info models/train.json
--registered data/registered --split data/patches/split.json --out eval --metrics metrics/eval.json``
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.common.config import load_params, section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameter file")
    parser.add_argument("--train-info", required=True, help="models/train.json of the train stage")
    parser.add_argument("--registered", required=True, help="registered images (ir/, vi/)")
    parser.add_argument("--split", required=True, help="split.json of the crop stage")
    parser.add_argument("--out", required=True, help="report folder (per_image.csv, table.md, grid.png, fused/)")
    parser.add_argument("--metrics", required=True, help="JSON of the means per method (DVC metrics)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from pipeline.evaluate.stage import EvalConfig, evaluate, log_to_run
        from pipeline.common.ray_runtime import ray_options, ray_session
        from pipeline.train.runs import read_train_info
        from pipeline.common.mlflow_store import configure_mlflow

        params = load_params(args.params)
        cfg = EvalConfig.from_params(section(params, "evaluate"))
        info = read_train_info(args.train_info)
        with ray_session(**ray_options(params)):
            result = evaluate(info["checkpoint"], args.registered, args.split, args.out, args.metrics, cfg)
        configure_mlflow()
        log_to_run(info["run_id"], result)
    except (FileNotFoundError, ValueError) as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 1
    print(Path(result.paths["table"]).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
