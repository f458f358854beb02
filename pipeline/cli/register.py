"""``mda register``: validate and align IR/visible pairs (the register stage, for people)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``mda register``."""
    from pipeline.data.register_options import MOTION_NAMES, AlignOptions

    d = AlignOptions()
    parser = subparsers.add_parser(
        "register",
        help="validate and align IR/visible pairs",
        description=(
            "Pair the images of --ir and --vi by file stem (png, jpg, jpeg, bmp, tif, tiff), reject "
            "bad pairs (missing partner, unreadable or corrupt file, unsupported bit depth, size "
            "mismatch, constant image), estimate the residual misalignment of each good pair (ECC on "
            "gradient magnitudes) and warp the visible image onto the IR frame when it exceeds "
            "--max-shift. Writes OUT/ir/<stem>.png (8-bit gray; 16-bit IR stretched between its "
            "0.1/99.9 percentiles), OUT/vi/<stem>.png (8-bit, colour kept), OUT/manifest.parquet (one "
            "row per pair) and OUT/rejected.json. Runs on Ray Data: a local Ray, or the cluster of "
            "--address / RAY_ADDRESS. Exit status 1 when no pair survives."
        ),
    )
    parser.add_argument("--ir", required=True, metavar="DIR", help="folder of IR images")
    parser.add_argument("--vi", required=True, metavar="DIR", help="folder of visible images (same stems)")
    parser.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder")
    parser.add_argument(
        "--motion", choices=list(MOTION_NAMES), default=d.motion, help=f"alignment motion model (default: {d.motion})"
    )
    parser.add_argument(
        "--max-shift", type=float, default=d.max_shift_px, metavar="PX",
        help=f"correct pairs whose estimated displacement exceeds PX pixels (default: {d.max_shift_px:g})",
    )
    parser.add_argument(
        "--max-correction", type=float, default=d.max_correction_px, metavar="PX",
        help="treat larger estimated displacements as failed estimates and leave the pair unchanged "
        f"(default: {d.max_correction_px:g})",
    )
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run, outputs={"out": "staged-dir"})
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the register step; returns the exit code (1 when no pair survives)."""
    from pipeline.common.ray_runtime import ray_session
    from pipeline.data.register_options import AlignOptions
    from pipeline.data.register import register_dataset

    options = AlignOptions(motion=args.motion, max_shift_px=args.max_shift, max_correction_px=args.max_correction)
    with ray_session(address=args.address, num_cpus=args.num_cpus):
        summary = register_dataset(args.ir, args.vi, args.out, options, progress=not args.no_progress)
    print(summary.format())
    return 0
