"""``mda fuse``: fuse one IR/visible pair or two folders of pairs.

Examples::

    mda fuse ir.png vis.png -o fused.png --weights models/best.pt
    mda fuse --ir data/TNO/ir --vi data/TNO/vi -o out/ --weights fusion_model.pth
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``mda fuse``."""
    parser = subparsers.add_parser(
        "fuse",
        help="fuse IR/visible image pairs",
        description=(
            "Fuse one pair (IR VIS -o OUT) or all pairs of two folders, paired by file stem "
            "(--ir DIR --vi DIR -o DIR; fused images saved as <stem>.png). A colour visible image "
            "gives a colour output (its chroma is kept); gray in, gray out. Any image size."
        ),
    )
    parser.add_argument("ir", nargs="?", type=Path, help="IR image (single-pair mode)")
    parser.add_argument("vis", nargs="?", type=Path, help="visible image (single-pair mode)")
    parser.add_argument("--ir", dest="ir_dir", type=Path, metavar="DIR", help="folder of IR images")
    parser.add_argument("--vi", dest="vi_dir", type=Path, metavar="DIR", help="folder of visible images")
    parser.add_argument("-o", "--out", type=Path, required=True,
                        help="output file (single pair) or folder (folders)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--weights", metavar="FILE",
                     help="our checkpoint (e.g. models/best.pt) or the authors' fusion_model.pth")
    src.add_argument("--model", metavar="URI",
                     help="registered model, e.g. models:/mda-fusion@champion (MLflow registry)")
    parser.add_argument(
        "--postprocess", choices=("minmax", "clip"), default=None,
        help="output mapping to 0-255: 'minmax' stretches each fused image (the authors' test "
             "procedure; default for the authors' weights), 'clip' keeps the raw intensities "
             "(default for our checkpoints, unless the checkpoint records another default)",
    )
    parser.add_argument("--threads", type=int, default=None,
                        help="PyTorch threads (default: one per available CPU core)")
    parser.set_defaults(func=run)
    return parser


def _check_args(args: argparse.Namespace) -> None:
    single = args.ir is not None or args.vis is not None
    folders = args.ir_dir is not None or args.vi_dir is not None
    if single and folders:
        raise ValueError("give either IR VIS (one pair) or --ir DIR --vi DIR (folders), not both")
    if single and (args.ir is None or args.vis is None):
        raise ValueError("single-pair mode needs two files: IR VIS")
    if folders and (args.ir_dir is None or args.vi_dir is None):
        raise ValueError("folder mode needs both --ir DIR and --vi DIR")
    if not single and not folders:
        raise ValueError("nothing to fuse: give IR VIS or --ir DIR --vi DIR")
    if args.weights is None and args.model is None:
        raise ValueError("no model given: pass --weights FILE (our checkpoint or the authors' "
                         "fusion_model.pth) or --model models:/NAME@ALIAS")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")


def run(args: argparse.Namespace) -> int:
    """Fuse the pair(s); returns 0 if every pair was fused, 1 otherwise."""
    _check_args(args)
    # Large CPU tensors on 2 MB transparent huge pages: far fewer page faults for the ~80 MB
    # feature maps (measured in bench/bench_inference.py). PyTorch reads this variable once, at
    # its first allocation, so it only takes effect when torch has not been imported yet.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from tqdm import tqdm

    from pipeline.data.images import ImageError, find_pairs, read_ir, read_visible, write_image
    from pipeline.model.inference import Fuser, set_threads
    from pipeline.model.weights import resolve_model_source

    set_threads(args.threads)
    source = resolve_model_source(args.weights if args.weights is not None else args.model)
    fuser = Fuser.from_file(source, postprocess=args.postprocess)
    log.info("weights %s (%s), post-processing '%s'", source, fuser.info["kind"], fuser.postprocess)

    if args.ir is not None:
        out = args.out / f"{args.ir.stem}.png" if args.out.is_dir() else args.out
        jobs = [(args.ir, args.vis, out)]
        failures: list[tuple[str, str]] = []
    else:
        pairs, unmatched = find_pairs(args.ir_dir, args.vi_dir)
        failures = list(unmatched)
        for path, reason in unmatched:
            print(f"mda fuse: skipped {path}: {reason}", file=sys.stderr)
        jobs = [(p.ir, p.vi, args.out / f"{p.stem}.png") for p in pairs]

    done = 0
    bar = tqdm(jobs, desc="fuse", unit="pair", disable=len(jobs) < 2, file=sys.stderr)
    for ir_path, vi_path, out_path in bar:
        try:
            ir = read_ir(ir_path)
            vis = read_visible(vi_path)
            if ir.shape != vis.shape[:2]:
                raise ImageError(vi_path, f"size {vis.shape[1]}x{vis.shape[0]} differs from IR "
                                          f"{ir_path} ({ir.shape[1]}x{ir.shape[0]})")
            write_image(out_path, fuser(ir, vis))
            done += 1
        except ImageError as exc:
            failures.append((exc.path, exc.reason))
            tqdm.write(f"mda fuse: skipped {exc.path}: {exc.reason}", file=sys.stderr)
        except OSError as exc:  # e.g. the output folder is not writable
            failures.append((str(out_path), exc.strerror or str(exc)))
            tqdm.write(f"mda fuse: cannot write {out_path}: {exc}", file=sys.stderr)
    print(f"mda fuse: {done} fused, {len(failures)} failed -> {args.out}", file=sys.stderr)
    if failures:
        print("mda fuse: failed: " + ", ".join(path for path, _ in failures), file=sys.stderr)
        return 1
    return 0
