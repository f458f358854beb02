"""DVC stage ``ship``: copy the promoted checkpoint to ``models/pretrained/`` and write its card.

Usage: ``python stages/ship.py --params params.yaml --checkpoint models/best.pt --train-info
models/train.json --eval-metrics eval/means.json --promotion models/promotion.json --split
data/patches/split.json --raw data/raw --out-model M.pt --out-card M.json``
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Mapping

from pipeline.common.config import section
from pipeline.common.stage import Arg, run_stage
from pipeline.evaluate.ship import ShipConfig, ship, wins


def run(args: argparse.Namespace, params: Mapping[str, Any]) -> str:
    """The stage's work; returns its summary."""
    cfg = ShipConfig.from_params(section(params, "ship"))
    card = ship(cfg, args.checkpoint, args.train_info, args.eval_metrics, args.promotion, args.split,
                args.out_model, args.out_card, raw_dir=args.raw, params=params)
    beats = ", ".join(f"{name} on {len(wins(card, name))}/8" for name in card["tno25_baselines"])
    return f"ship: {args.out_model} (registry {card['registry']['model_name']} v{card['registry']['version']}); beats {beats}"


def main(argv: list[str] | None = None) -> int:
    """Run the stage (``argv``: its arguments, ``sys.argv[1:]`` when ``None``); returns the exit code."""
    return run_stage("ship", __doc__, run,
                     Arg("--checkpoint", "the trained checkpoint (models/best.pt)"),
                     Arg("--train-info", "models/train.json of the train stage"),
                     Arg("--eval-metrics", "eval/means.json of the evaluate stage (every mean of every method)"),
                     Arg("--promotion", "models/promotion.json of the promote stage"),
                     Arg("--split", "split.json of the crop stage"),
                     Arg("--raw", "gathered raw folder (its datasets.json)", {"default": None}),
                     Arg("--out-model", "shipped checkpoint", output="file"),
                     Arg("--out-card", "its model card (JSON)", output="file"), argv=argv)


if __name__ == "__main__":
    sys.exit(main())
