"""DVC stage ``params``: validate every section of params.yaml before any other stage runs.

Usage: ``python stages/params.py --params params.yaml --out params.checked.json``

Why a stage: ``dvc repro`` deletes a stage's outputs before it runs the stage's command, so a stage
that rejects its own parameters has already lost its previous outputs. Every other stage depends on
this stage's output, so DVC runs this check first: a bad value stops ``dvc repro`` here, naming
the key, and every existing output is left in place. The output records only which sections were
checked (not their values), so it does not change when a value changes and re-runs nothing by
itself. (Recovery, if a stage was run directly and failed: ``dvc checkout <stage>`` restores its
last committed outputs from the DVC cache.)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Mapping

from pipeline.common.atomic_io import write_json
from pipeline.common.config import section
from pipeline.common.ray_runtime import ray_options
from pipeline.common.stage import Arg, run_stage
from pipeline.data.crop import CropConfig
from pipeline.data.demo_options import DemoOptions
from pipeline.data.register_options import AlignOptions
from pipeline.data.stats_stage import StatsConfig
from pipeline.evaluate.promote import PromoteConfig
from pipeline.evaluate.stage import EvalConfig
from pipeline.model.network import model_config
from pipeline.train.losses import FusionLoss
from pipeline.train.settings import TrainSettings

#: Every section a stage reads, with the reader that stage uses.
CHECKS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "demo": lambda p: DemoOptions.from_params(section(p, "demo")),
    "register": lambda p: AlignOptions.from_params(section(p, "register")),
    "crop": lambda p: CropConfig.from_params(section(p, "crop")),
    "stats": lambda p: StatsConfig.from_params(section(p, "stats")),
    "model": lambda p: model_config(section(p, "model")),
    "loss": lambda p: FusionLoss.from_params(section(p, "loss")),
    "train": TrainSettings.from_params,
    "evaluate": lambda p: EvalConfig.from_params(section(p, "evaluate")),
    "promote": lambda p: PromoteConfig.from_params(section(p, "promote")),
    "ray": ray_options,
}


def check_params(params: Mapping[str, Any]) -> list[str]:
    """Run every check; returns the checked section names. Raises the first error (naming its key)."""
    for check in CHECKS.values():
        check(params)
    return list(CHECKS)


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
