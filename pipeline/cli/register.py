"""``mda register``: validate IR/visible pairs and check their alignment (the register stage, for people)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``mda register``."""
    from pipeline.data.register_options import ALIGN_MODES, AlignOptions

    d = AlignOptions()
    parser = subparsers.add_parser(
        "register",
        help="validate IR/visible pairs and check (optionally correct) their alignment",
        description=(
            "Pair the images of --ir and --vi by file stem (png, jpg, jpeg, bmp, tif, tiff), reject "
            "bad pairs (missing partner, unreadable or corrupt file, unsupported bit depth, size "
            "mismatch, constant image) and check the alignment of each good pair: a gradient ECC and "
            "a mutual-information search estimate the IR->visible offset, and the pair is confident "
            "only when both agree (within --max-disagreement px, per axis), the gradient correlation "
            "reaches --min-score and the offset is within --search px. --align check (default) "
            "records the estimates in the manifest and writes the images exactly as decoded; "
            "--align correct also warps the visible image of confident pairs onto the IR frame "
            "(rigid fit); --align off skips the estimate. A pair that is not confident is never "
            "moved: manifest column align_reason says why. Writes OUT/ir/<stem>.png (8-bit gray; "
            "16-bit IR stretched between its 0.1/99.9 percentiles), OUT/vi/<stem>.png (8-bit, colour "
            "kept), OUT/manifest.parquet (one row per pair), OUT/rejected.json and the alignment "
            "report (alignment.json, alignment.png: edge overlays of the worst flagged pairs) in "
            "--report or OUT. Runs on Ray Data: a local Ray, or the cluster of --address / "
            "RAY_ADDRESS. Exit status 1 when no pair survives."
        ),
    )
    parser.add_argument("--ir", required=True, metavar="DIR", help="folder of IR images")
    parser.add_argument("--vi", required=True, metavar="DIR", help="folder of visible images (same stems)")
    parser.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder")
    parser.add_argument(
        "--align", choices=list(ALIGN_MODES), default=d.align,
        help=f"off: no estimate; check: estimate and record, images unchanged; correct: also warp "
        f"confident pairs (default: {d.align})",
    )
    parser.add_argument(
        "--search", type=float, default=d.search_px, metavar="PX",
        help=f"largest offset per axis that may be corrected, also the MI search radius (default: {d.search_px:g})",
    )
    parser.add_argument(
        "--min-score", type=float, default=d.min_score, metavar="R",
        help=f"least gradient correlation of a confident estimate (default: {d.min_score:g})",
    )
    parser.add_argument(
        "--max-disagreement", type=float, default=d.max_disagreement_px, metavar="PX",
        help=f"largest per-axis difference of the ECC and MI shifts of a confident estimate "
        f"(default: {d.max_disagreement_px:g})",
    )
    parser.add_argument(
        "--min-correction", type=float, default=d.min_correction_px, metavar="PX",
        help=f"with --align correct, leave confident pairs that would move less than PX alone "
        f"(default: {d.min_correction_px:g})",
    )
    parser.add_argument("--report", default=None, metavar="DIR", help="folder of the alignment report (default: OUT)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run, outputs={"out": "staged-dir"})
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the register step; returns the exit code (1 when no pair survives)."""
    from pipeline.common.ray_runtime import ray_session
    from pipeline.data.register import register_dataset
    from pipeline.data.register_options import AlignOptions

    options = AlignOptions(
        align=args.align,
        search_px=args.search,
        min_score=args.min_score,
        max_disagreement_px=args.max_disagreement,
        min_correction_px=args.min_correction,
        report_dir=args.report or "",
    )
    with ray_session(address=args.address, num_cpus=args.num_cpus):
        summary = register_dataset(args.ir, args.vi, args.out, options, progress=not args.no_progress)
    print(summary.format())
    return 0
