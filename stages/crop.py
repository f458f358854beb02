"""DVC stage ``crop``: cut the registered pairs into patch pairs and split them by pair (``crop`` section).

Usage: ``python stages/crop.py --params params.yaml --registered data/registered --out data/patches``
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Mapping

from pipeline.common.config import section
from pipeline.common.stage import Arg, run_stage
from pipeline.data.contracts import SPLITS
from pipeline.data.crop import CropConfig, crop_dataset


def run(args: argparse.Namespace, params: Mapping[str, Any]) -> str:
    """The stage's work; returns its summary."""
    cfg = CropConfig.from_params(section(params, "crop"))
    record = crop_dataset(args.registered, args.out, cfg)
    pairs = {name: len(record[name]) for name in SPLITS}
    return f"crop: {sum(record['counts'].values())} patches {record['counts']} from pairs {pairs} -> {args.out}"


def main(argv: list[str] | None = None) -> int:
    """Run the stage (``argv``: its arguments, ``sys.argv[1:]`` when ``None``); returns the exit code."""
    return run_stage("crop", __doc__, run,
                     Arg("--registered", "registered folder (ir/, vi/, manifest.parquet)"),
                     Arg("--out", "patch folder (part-*.parquet, split.json)", output="staged-dir"), ray=True, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
