"""DVC stage ``demo``: write the synthetic demo dataset described by the ``demo`` section.

Usage: ``python stages/demo.py --params params.yaml --out data/demo``
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Mapping

from pipeline.common.config import section
from pipeline.common.stage import Arg, run_stage
from pipeline.data.demo import generate_demo
from pipeline.data.demo_options import DemoOptions


def run(args: argparse.Namespace, params: Mapping[str, Any]) -> str:
    """The stage's work; returns its summary."""
    o = DemoOptions.from_params(section(params, "demo"))
    stems = generate_demo(args.out, o.num_pairs, o.height, o.width, o.seed)
    return f"demo: wrote {len(stems)} pairs ({o.height}x{o.width}, seed {o.seed}) to {args.out}"


def main(argv: list[str] | None = None) -> int:
    """Run the stage (``argv``: its arguments, ``sys.argv[1:]`` when ``None``); returns the exit code."""
    return run_stage("demo", __doc__, run, Arg("--out", "output folder (ir/ and vi/ are written in it)", output="dir"), argv=argv)


if __name__ == "__main__":
    sys.exit(main())
