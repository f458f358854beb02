"""``mda recipe``: the CPU training recipe (train on RoadScene + MSRS + TNO outside TNO-25, score
TNO-25 against the authors' weights, the pixel average and the pixel maximum).

Examples::

    mda recipe                                  # recipes/cpu.yaml -> runs/recipe/
    mda recipe --out runs/try -S train.steps=200 -S train.lr=5e-4
    mda recipe --smoke --out /tmp/smoke         # a few pairs and steps, seconds
"""

from __future__ import annotations

import argparse
from pathlib import Path

#: the recipe shipped as models/pretrained/ (its card's ``command`` runs this file)
DEFAULT_CONFIG = "recipes/cpu.yaml"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``mda recipe``."""
    parser = subparsers.add_parser(
        "recipe",
        help="train MDA with the CPU recipe and score it on TNO-25",
        description=(
            "Train MDA with a recipe file (default recipes/cpu.yaml: its keys override the defaults "
            "of pipeline.train.recipe, its loss: keys override params.yaml's loss section), then "
            "fuse the pinned test pairs (TNO-25) with the trained model, the authors' weights, the "
            "pixel average and the pixel maximum, score them with the project's evaluator and write "
            "OUT/table.md, OUT/summary.json, OUT/model_card.json and OUT/model.pt. Paths are "
            "relative to the current folder (the repository root, with ../shared beside it)."
        ),
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE",
                        help=f"recipe YAML (default: {DEFAULT_CONFIG})")
    parser.add_argument("--params", default="params.yaml", metavar="FILE",
                        help="params.yaml giving the model and the base loss (default: params.yaml)")
    parser.add_argument("-o", "--out", default="runs/recipe", metavar="DIR",
                        help="output folder (default: runs/recipe)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key (YAML value), e.g. -S train.steps=200; repeatable")
    parser.add_argument("--smoke", action="store_true",
                        help="a fast check: 2 pairs per training set, 4 test pairs, 6 steps of 2 patches")
    parser.add_argument("--evaluate-only", metavar="CKPT", type=Path, default=None,
                        help="skip training; score this checkpoint")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the recipe; returns the exit code."""
    from pipeline.common.config import load_params
    from pipeline.train.recipe import load_recipe, run_recipe

    cfg = load_recipe(args.config, args.overrides, smoke=args.smoke)
    params = load_params(args.params)
    import shlex
    import sys

    command = shlex.join(["mda", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("mda") else "mda recipe"
    run_recipe(cfg, params, args.out, evaluate_only=args.evaluate_only, command=command)
    return 0
