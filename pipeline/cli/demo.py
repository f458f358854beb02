"""``mda demo``: write the synthetic demo dataset (registered, complementary IR/visible pairs)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``mda demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="write the synthetic demo dataset",
        description=(
            "Write N synthetic, registered IR/visible pairs as PNG to OUT/ir/ and OUT/vi/ (same stems "
            "demo_000, demo_001, ...). The visible images carry texture, edges and colour with dark "
            "(night) regions; the IR images a smooth thermal background with warm targets that are "
            "faint in the visible image. The same seed and size give byte-identical files."
        ),
    )
    parser.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("-n", "--num-pairs", type=int, default=12, help="number of pairs (default: 12)")
    parser.add_argument("--height", type=int, default=160, help="image height in pixels (default: 160)")
    parser.add_argument("--width", type=int, default=224, help="image width in pixels (default: 224)")
    parser.add_argument("--seed", type=int, default=2024, help="random seed (default: 2024)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Generate the dataset; returns the exit code."""
    from pipeline.demo import generate_demo

    stems = generate_demo(args.out, args.num_pairs, args.height, args.width, args.seed)
    print(f"wrote {len(stems)} pairs ({args.height}x{args.width}) to {args.out}/ir and {args.out}/vi")
    return 0
