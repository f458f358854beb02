"""``mda recipe``: run a recipe pipeline with DVC (default: the CPU recipe, ``recipes/cpu/dvc.yaml``).

Examples::

    mda recipe                    # dvc repro recipes/cpu/dvc.yaml: the shipped model, from the data
    mda recipe --dry              # print what DVC would run
"""

from __future__ import annotations

import argparse
import shutil
import subprocess

#: the recipe whose ship stage writes models/pretrained/mda_cpu.pt (its card's ``command``)
DEFAULT_RECIPE = "recipes/cpu/dvc.yaml"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``mda recipe``."""
    parser = subparsers.add_parser(
        "recipe",
        help="run a training recipe pipeline with DVC (default recipes/cpu/dvc.yaml)",
        description=(
            "Run a recipe pipeline with `dvc repro` from the repository root (with ../shared beside "
            "it): gather, register, crop and stats on Ray Data, training on Ray Train, evaluation on "
            "TNO-25 beside the authors' weights and the pixel baselines, promotion in the MLflow "
            "registry, and the ship stage that writes models/pretrained/mda_cpu.pt and its card. "
            "Parameters: the params.yaml beside the dvc.yaml; docs/training.md."
        ),
    )
    parser.add_argument("pipeline", nargs="?", default=DEFAULT_RECIPE, help=f"dvc.yaml (default {DEFAULT_RECIPE})")
    parser.add_argument("--dry", action="store_true", help="print the commands without running them")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """``dvc repro PIPELINE``; returns its exit code."""
    dvc = shutil.which("dvc")
    if dvc is None:
        print("mda recipe: error: dvc is not on PATH (pip install -e . installs it)")
        return 2
    cmd = [dvc, "repro", *(["--dry"] if args.dry else []), args.pipeline]
    print("mda recipe: " + " ".join(["dvc", *cmd[1:]]))
    return subprocess.call(cmd)
