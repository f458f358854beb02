"""DVC stage ``params``: validate every section of params.yaml before any other stage runs.

Usage: ``python stages/params.py --params params.yaml --out data/params_check.json``

Why a stage: ``dvc repro`` deletes a stage's outputs before it runs the stage's command, so a stage
that rejects its own parameters has already lost its previous outputs. Every other stage depends on
this stage's output, so DVC runs this check first: a bad value stops ``dvc repro`` here, naming
the key, and every existing output is left in place. Besides types and ranges it checks what can
be checked without doing the work (``pipeline.validate``): unknown sections, input folders,
the files that parameters name, metric names, and the model against ``train.init_weights``. The
output records only which sections were checked (not their values), so it does not change when a
value changes and re-runs nothing by itself. (Recovery, if a stage was run directly and failed:
``dvc checkout <stage>`` restores its last committed outputs from the DVC cache.)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Mapping

from pipeline.common.atomic_io import write_json
from pipeline.common.stage import Arg, run_stage
from pipeline.validate import check_params


def run(args: argparse.Namespace, params: Mapping[str, Any]) -> str:
    """The stage's work; returns its summary."""
    checked = check_params(params)
    write_json(args.out, {"valid": True, "sections": checked})
    return f"params: {args.params} valid ({', '.join(checked)})"


def main(argv: list[str] | None = None) -> int:
    """Run the stage (``argv``: its arguments, ``sys.argv[1:]`` when ``None``); returns the exit code."""
    return run_stage("params", __doc__, run, Arg("--out", "JSON record of the checked sections", output="file"),
                     argv=argv)


if __name__ == "__main__":
    sys.exit(main())
