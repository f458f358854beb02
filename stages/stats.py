"""DVC stage ``stats``: complementary-information statistics and adaptive weights (``stats`` section).

Usage: ``python stages/stats.py --params params.yaml --patches data/patches --registered data/registered
--out data/stats --metrics metrics/stats.json --plot plots/weights_hist.csv``
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Mapping

from pipeline.common.config import section
from pipeline.common.stage import Arg, run_stage
from pipeline.data.stats_stage import StatsConfig, compute_stats


def run(args: argparse.Namespace, params: Mapping[str, Any]) -> str:
    """The stage's work; returns its summary."""
    cfg = StatsConfig.from_params(section(params, "stats"))
    metrics = compute_stats(args.patches, args.registered, args.out, cfg, args.metrics, args.plot)
    p, i = metrics["patch"], metrics["image"]
    w = p["w_int_ir"]
    return (f"stats: {p['count']} patches, {i['count']} images; w_int_ir p5/p50/p95 = "
            f"{w['p5']:.3f}/{w['p50']:.3f}/{w['p95']:.3f} (patches) -> {args.out}")


def main(argv: list[str] | None = None) -> int:
    """Run the stage (``argv``: its arguments, ``sys.argv[1:]`` when ``None``); returns the exit code."""
    return run_stage("stats", __doc__, run,
                     Arg("--patches", "patch folder written by the crop stage"),
                     Arg("--registered", "registered folder (whole images)"),
                     Arg("--out", "stats folder (patches/, images.parquet, normalisation.json)", output="staged-dir"),
                     Arg("--metrics", "JSON metrics file (spread of the weights)", output="file"),
                     Arg("--plot", "CSV histogram of the weights", output="file"), ray=True, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
