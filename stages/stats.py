"""DVC stage ``stats``: complementary-information statistics and adaptive weights (``stats`` section).

Usage: ``python stages/stats.py --params params.yaml --patches data/patches --registered data/registered
--out data/stats --metrics metrics/stats.json --plot plots/weights_hist.csv``
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.common.config import load_params, section
from pipeline.common.ray_runtime import ray_options, ray_session


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameter file")
    parser.add_argument("--patches", required=True, help="patch folder written by the crop stage")
    parser.add_argument("--registered", required=True, help="registered folder (whole images)")
    parser.add_argument("--out", required=True, help="stats folder (patches/, images.parquet, normalisation.json)")
    parser.add_argument("--metrics", required=True, help="JSON metrics file (spread of the weights)")
    parser.add_argument("--plot", required=True, help="CSV histogram of the weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from pipeline.data.stats import StatsConfig, compute_stats

        params = load_params(args.params)
        cfg = StatsConfig.from_params(section(params, "stats"))
        with ray_session(**ray_options(params)):
            metrics = compute_stats(args.patches, args.registered, args.out, cfg, args.metrics, args.plot)
    except (FileNotFoundError, ValueError) as exc:
        print(f"stats: error: {exc}", file=sys.stderr)
        return 1
    p, i = metrics["patch"], metrics["image"]
    print(
        f"stats: {p['count']} patches, {i['count']} images; w_int_ir p5/p50/p95 = "
        f"{p['w_int_ir']['p5']:.3f}/{p['w_int_ir']['p50']:.3f}/{p['w_int_ir']['p95']:.3f} (patches) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
