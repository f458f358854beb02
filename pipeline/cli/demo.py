"""``mda demo``: write the synthetic demo dataset (registered, complementary IR/visible pairs)."""

from __future__ import annotations

import argparse

from pipeline.data.demo_options import DemoOptions


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
    d = DemoOptions()
    parser.add_argument("-n", "--num-pairs", type=int, default=d.num_pairs, help=f"number of pairs (default: {d.num_pairs})")
    parser.add_argument("--height", type=int, default=d.height, help=f"image height in pixels (default: {d.height})")
    parser.add_argument("--width", type=int, default=d.width, help=f"image width in pixels (default: {d.width})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default: {d.seed})")
    parser.set_defaults(func=run, outputs={"out": "dir"})
    return parser


def run(args: argparse.Namespace) -> int:
    """Generate the dataset; returns the exit code."""
    from pipeline.data.demo import generate_demo

    stems = generate_demo(args.out, args.num_pairs, args.height, args.width, args.seed)
    print(f"wrote {len(stems)} pairs ({args.height}x{args.width}) to {args.out}/ir and {args.out}/vi")
    return 0
