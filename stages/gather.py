"""DVC stage ``gather``: link the pairs of several datasets into one raw folder (``gather`` section).

Usage: ``python stages/gather.py --params params.yaml --out data/raw``
(``data/raw/{ir,vi}`` relative links and ``data/raw/datasets.json``; the register stage reads it).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Mapping

from pipeline.common.config import section
from pipeline.common.stage import Arg, run_stage
from pipeline.data.gather import GatherConfig, gather


def run(args: argparse.Namespace, params: Mapping[str, Any]) -> str:
    """The stage's work; returns its summary."""
    cfg = GatherConfig.from_params(section(params, "gather"))
    cfg.check_inputs()
    counts = gather(cfg, args.out)
    return f"gather: {sum(counts.values())} pairs linked into {args.out} ({', '.join(f'{k} {v}' for k, v in counts.items())})"


def main(argv: list[str] | None = None) -> int:
    """Run the stage (``argv``: its arguments, ``sys.argv[1:]`` when ``None``); returns the exit code."""
    return run_stage("gather", __doc__, run, Arg("--out", "raw folder to write (ir/, vi/, datasets.json)",
                                                 output="dir"), argv=argv)


if __name__ == "__main__":
    sys.exit(main())
