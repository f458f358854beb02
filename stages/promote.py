"""DVC stage ``promote``: register the trained model and move ``@champion`` if it passes the gate.

Usage: ``python stages/promote.py --params params.yaml --train-info models/train.json
--eval-metrics eval/means.json --eval-test-set eval/test_set.json --out models/promotion.json``
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Mapping

from pipeline.common.config import section
from pipeline.common.mlflow_store import configure_mlflow
from pipeline.common.stage import Arg, run_stage
from pipeline.evaluate.promote import PromoteConfig, promote, read_eval_means, read_test_set_digest, write_decision
from pipeline.train.summary import read_train_info


def run(args: argparse.Namespace, params: Mapping[str, Any]) -> str:
    """The stage's work; returns its summary."""
    cfg = PromoteConfig.from_params(section(params, "promote"))
    info = read_train_info(args.train_info)
    means = read_eval_means(args.eval_metrics)
    configure_mlflow()
    digest = read_test_set_digest(args.eval_test_set) if args.eval_test_set else None
    decision = promote(info, means, cfg, test_set=digest)
    write_decision(args.out, decision)
    lines = [f"promote: {cfg.model_name} version {decision.version} -> @{decision.decision}"]
    return "\n".join(lines + [f"  {reason}" for reason in decision.reasons])


def main(argv: list[str] | None = None) -> int:
    """Run the stage (``argv``: its arguments, ``sys.argv[1:]`` when ``None``); returns the exit code."""
    return run_stage("promote", __doc__, run,
                     Arg("--train-info", "models/train.json of the train stage"),
                     Arg("--eval-metrics", "eval/means.json of the evaluate stage (every mean of every method)"),
                     Arg("--eval-test-set", "eval/test_set.json of the evaluate stage (the champion is "
                         "compared only on the same test set)", {"default": None}),
                     Arg("--out", "JSON file for the decision", output="file"), mlflow=True, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
