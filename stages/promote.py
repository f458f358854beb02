"""DVC stage ``promote``: register the trained model and move ``@champion`` if it passes the gate.

Usage: ``python stages/promote.py --params params.yaml --train-info models/train.json
--eval-metrics metrics/eval.json --eval-test-set eval/test_set.json --out models/promotion.json``
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.common.config import load_params, section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameter file")
    parser.add_argument("--train-info", required=True, help="models/train.json of the train stage")
    parser.add_argument("--eval-metrics", required=True, help="metrics/eval.json of the evaluate stage")
    parser.add_argument("--eval-test-set", default=None,
                        help="eval/test_set.json of the evaluate stage (the champion is compared only on the same test set)")
    parser.add_argument("--out", required=True, help="JSON file for the decision")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from pipeline.evaluate.promote import PromoteConfig, promote, read_eval_means, read_test_set_digest, write_decision
        from pipeline.train.runs import read_train_info
        from pipeline.common.mlflow_store import configure_mlflow

        cfg = PromoteConfig.from_params(section(load_params(args.params), "promote"))
        info = read_train_info(args.train_info)
        means = read_eval_means(args.eval_metrics)
        configure_mlflow()
        digest = read_test_set_digest(args.eval_test_set) if args.eval_test_set else None
        decision = promote(info, means, cfg, test_set=digest)
        write_decision(args.out, decision)
    except (FileNotFoundError, ValueError) as exc:
        print(f"promote: error: {exc}", file=sys.stderr)
        return 1
    print(f"promote: {cfg.model_name} version {decision.version} -> @{decision.decision}")
    for reason in decision.reasons:
        print(f"  {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
