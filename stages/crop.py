"""DVC stage ``crop``: cut the registered pairs into patch pairs and split them by pair (``crop`` section).

Usage: ``python stages/crop.py --params params.yaml --registered data/registered --out data/patches``
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
    parser.add_argument("--registered", required=True, help="registered folder (ir/, vi/, manifest.parquet)")
    parser.add_argument("--out", required=True, help="patch folder (part-*.parquet, split.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from pipeline.data.crop import CropConfig, crop_dataset

        params = load_params(args.params)
        cfg = CropConfig.from_params(section(params, "crop"))
        with ray_session(**ray_options(params)):
            record = crop_dataset(args.registered, args.out, cfg)
    except (FileNotFoundError, ValueError) as exc:
        print(f"crop: error: {exc}", file=sys.stderr)
        return 1
    pairs = {name: len(record[name]) for name in ("train", "val", "test")}
    print(f"crop: {sum(record['counts'].values())} patches {record['counts']} from pairs {pairs} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
