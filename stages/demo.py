"""DVC stage ``demo``: write the synthetic demo dataset described by the ``demo`` section.

Usage: ``python stages/demo.py --params params.yaml --out data/demo``
"""

from __future__ import annotations

import argparse
import sys

from pipeline.common.config import load_params, param, section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameter file")
    parser.add_argument("--out", required=True, help="output folder (ir/ and vi/ are written in it)")
    args = parser.parse_args(argv)
    try:
        cfg = section(load_params(args.params), "demo")
        num_pairs = param(cfg, "num_pairs", int, where="demo", default=12, minimum=1)
        height = param(cfg, "height", int, where="demo", default=160, minimum=32)
        width = param(cfg, "width", int, where="demo", default=224, minimum=32)
        seed = param(cfg, "seed", int, where="demo", default=2024)
        from pipeline.demo import generate_demo

        stems = generate_demo(args.out, num_pairs, height, width, seed)
    except (FileNotFoundError, ValueError) as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    print(f"demo: wrote {len(stems)} pairs ({height}x{width}, seed {seed}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
