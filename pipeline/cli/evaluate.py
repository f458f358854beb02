"""``mda evaluate``: score a folder of already fused images with the eleven fusion metrics."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

DESCRIPTION = """\
Score every image of --fused against the IR (--ir) and visible (--vi) images of the same file
stem (any of png/jpg/jpeg/bmp/tif/tiff), with the eleven standard fusion metrics under the
conventions of CDDFuse's evaluator (see pipeline/evaluate/metrics.py): EN, SD, SF, AG, MI, SCD, VIF, Qabf,
SSIM, CC, PSNR. Images are read as gray (OpenCV BGR->gray). Writes one CSV row per scored image
(columns name,EN,...,PSNR) and prints the means."""

EPILOG = """\
Fused images that cannot be scored (no IR or visible image with the same stem, unreadable file,
size different from the sources) are listed on stderr with the reason; the other images are still
scored and written. Source pairs (IR and visible of the same stem) without a fused image are
listed by name too: means over fewer images than the test set are not the test set's means.
Exit status: 0 when every fused image was scored and every source pair had one, 1 otherwise (or on
bad arguments), so scripts notice incomplete results; --allow-missing accepts pairs without a fused
image (their count is still printed).

example: mda evaluate --ir data/TNO/ir --vi data/TNO/vi --fused out/ours -o ours.csv"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``mda evaluate``."""
    parser = subparsers.add_parser(
        "evaluate",
        help="score fused images against their sources (EN, SD, ..., PSNR) -> CSV",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ir", required=True, type=Path, metavar="DIR", help="infrared source images")
    parser.add_argument("--vi", required=True, type=Path, metavar="DIR", help="visible source images")
    parser.add_argument("--fused", required=True, type=Path, metavar="DIR", help="fused images to score")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="FILE.csv", help="per-image CSV to write")
    parser.add_argument(
        "--allow-missing", action="store_true",
        help="exit 0 even when some source pairs have no fused image (their count is printed)",
    )
    parser.add_argument(
        "--no-ray", action="store_true", help="score in a plain loop in this process instead of through Ray Data"
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="Ray cluster to use (default: RAY_ADDRESS, else a local Ray for the duration of the command)",
    )
    parser.set_defaults(func=run, outputs={"output": "file"})
    return parser


def format_means(df: "pandas.DataFrame") -> str:  # noqa: F821
    """The mean and standard deviation of every metric column of ``df`` as a text table; the
    brightness diagnostics (``VIgap``, ``IRgap``: gray levels, 0 best) over the pairs that have them."""
    from pipeline.evaluate.metrics import DIAGNOSTICS, METRICS

    lines = [f"{'metric':<6} {'mean':>10} {'std':>10}"]
    for name in (*METRICS, *DIAGNOSTICS):
        if name not in df:
            continue
        col = df[name].astype(float).dropna()
        pairs = f"  ({len(col)} pair(s) with such pixels)" if name in DIAGNOSTICS else ""
        if name in DIAGNOSTICS and not len(col):
            lines.append(f"{name:<6} {'n/a':>10} {'':>10}{pairs}")
            continue
        lines.append(f"{name:<6} {col.mean():>10.4f} {col.std(ddof=0):>10.4f}{pairs}")
    return "\n".join(lines)


def missing_fused(ir_dir: Path, vi_dir: Path, fused_dir: Path) -> list[str]:
    """Stems of the source pairs (IR and visible of the same stem) that have no fused image."""
    from pipeline.data.images import find_pairs, list_images

    pairs, _ = find_pairs(ir_dir, vi_dir)
    fused = list_images(fused_dir)
    return [p.stem for p in pairs if p.stem not in fused]


def report_missing(missing: list[str], fused_dir: Path, allowed: bool) -> bool:
    """Print the source pairs without a fused image; returns True when that fails the run."""
    if not missing:
        return False
    if allowed:
        print(f"{len(missing)} source pair(s) have no fused image in {fused_dir} (--allow-missing)", file=sys.stderr)
        return False
    print(f"no fused image in {fused_dir} for {len(missing)} source pair(s) (--allow-missing to accept): "
          + ", ".join(missing), file=sys.stderr)
    return True


def run(args: argparse.Namespace) -> int:
    """Score the folder, write the CSV atomically, print the means and what was skipped or missing."""
    from pipeline.common.atomic_io import write_text_atomic
    from pipeline.evaluate.score import evaluate_folder

    if args.output.suffix.lower() != ".csv":
        raise ValueError(f"--output {args.output}: expected a .csv file name")
    missing = missing_fused(args.ir, args.vi, args.fused)
    df = evaluate_folder(
        args.ir, args.vi, args.fused, parallel=not args.no_ray, progress=True, address=args.ray_address
    )
    skipped = df.attrs.get("skipped", [])

    if len(df):
        buf = io.StringIO()
        df.to_csv(buf, index=False, float_format="%.6f", lineterminator="\n")
        write_text_atomic(args.output, buf.getvalue())
        print(f"means over {len(df)} image(s) of {args.fused}:")
        print(format_means(df))
        print(f"wrote {args.output}")
    else:
        print(f"no image of {args.fused} could be scored; {args.output} not written", file=sys.stderr)

    failed = report_missing(missing, args.fused, args.allow_missing)
    if skipped:
        print(f"not scored ({len(skipped)} of {len(df) + len(skipped)}):", file=sys.stderr)
        for item in skipped:
            print(f"  {item['reason']}", file=sys.stderr)
        failed = True
    return 1 if failed else 0
