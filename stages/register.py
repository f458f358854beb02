"""DVC stage ``register``: validate and align the raw pairs on Ray Data (``register`` section).

Usage: ``python stages/register.py --params params.yaml --raw data/demo --out data/registered``
(``--raw`` holds ``ir/`` and ``vi/``; dvc.yaml passes ``${register.raw_dir}``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.common.config import load_params, param, section
from pipeline.common.ray_runtime import ray_options, ray_session


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameter file")
    parser.add_argument("--raw", default=None, help="raw data folder (default: register.raw_dir)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        from pipeline.data.register import AlignOptions, register_dataset

        params = load_params(args.params)
        cfg = section(params, "register")
        raw = Path(args.raw or param(cfg, "raw_dir", str, where="register"))
        options = AlignOptions.from_params(cfg)
        with ray_session(**ray_options(params)):
            summary = register_dataset(raw / "ir", raw / "vi", args.out, options, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:
        print(f"register: error: {exc}", file=sys.stderr)
        return 1
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
