"""DVC stage ``register``: validate and align the raw pairs on Ray Data (``register`` section).

Usage: ``python stages/register.py --params params.yaml --raw data/demo --out data/registered``
(``--raw`` holds ``ir/`` and ``vi/``; dvc.yaml passes ``${register.raw_dir}``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping

from pipeline.common.config import param, section
from pipeline.common.stage import Arg, run_stage
from pipeline.data.register import register_dataset
from pipeline.data.register_options import AlignOptions


def run(args: argparse.Namespace, params: Mapping[str, Any]) -> str:
    """The stage's work; returns its summary."""
    cfg = section(params, "register")
    raw = Path(args.raw or param(cfg, "raw_dir", str, where="register"))
    options = AlignOptions.from_params(cfg)
    summary = register_dataset(raw / "ir", raw / "vi", args.out, options, progress=not args.no_progress)
    return summary.format()


def main(argv: list[str] | None = None) -> int:
    """Run the stage (``argv``: its arguments, ``sys.argv[1:]`` when ``None``); returns the exit code."""
    return run_stage("register", __doc__, run,
                     Arg("--raw", "raw data folder (default: register.raw_dir)", {"default": None}),
                     Arg("--out", "output folder", output="staged-dir"),
                     Arg("--no-progress", "no progress bar", {"action": "store_true"}), ray=True, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
