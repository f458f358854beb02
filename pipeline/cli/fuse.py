"""``mda fuse``: fuse one IR/visible pair or two folders of pairs.

Examples::

    mda fuse ir.png vis.png -o fused.png                      # the shipped model (DEFAULT_WEIGHTS)
    mda fuse ir.png vis.png -o fused.png --weights models/best.pt
    mda fuse --ir data/TNO/ir --vi data/TNO/vi -o out/ --weights fusion_model.pth

Folders: each pair is fused on its own. A pair that cannot be read, or that would not fit in memory,
is skipped with one line naming it, and the others are still fused; the summary at the end lists
what failed and the exit status is 1 if anything did. Memory: the peak of fusing one pair grows
linearly with its pixel count (``FUSE_BYTES_PER_PIXEL``, measured on a 2-core CPU machine with the
default network: 678 bytes per padded pixel on the fused CPU path, 1278 on the plain one, plus a fixed
~150 MB; ``bench/bench_inference.py``); a pair whose
estimate exceeds ``--max-memory`` (default: the memory available now, see
``pipeline.common.memory``) or whose pixels exceed ``--max-pixels`` is refused before it is fused.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The model used without --weights/--model: the shipped pretrained model (card beside it,
#: models/pretrained/mda_cpu.json; trained by `mda recipe`).
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "pretrained" / "mda_cpu.pt"

#: Peak memory of fusing one pair, per (padded) pixel: measured 678 B/px on the fused CPU path and
#: 1278 B/px on the plain one (peak above the loaded model, 450x620 to 1280x960,
#: ``bench/bench_inference.py``); 1500 covers both.
FUSE_BYTES_PER_PIXEL = 1500
#: Fixed part of that peak (input/output buffers, allocator slack) beyond the loaded model.
FUSE_OVERHEAD_BYTES = 64 << 20
#: Share of the available memory a pair may take (the rest: this process's other allocations).
MEMORY_HEADROOM = 0.9


class PairTooLarge(ValueError):
    """A pair that would not fit in the memory (or pixel) budget; refused before fusing."""


def fuse_memory_estimate(height: int, width: int) -> int:
    """Estimated peak bytes of fusing one ``height`` x ``width`` pair (padded to multiples of 8)."""
    padded = (-(-height // 8) * 8) * (-(-width // 8) * 8)
    return FUSE_BYTES_PER_PIXEL * padded + FUSE_OVERHEAD_BYTES


def check_fits(height: int, width: int, max_pixels: int | None, max_memory: int | None) -> None:
    """Raise ``PairTooLarge`` when a pair exceeds ``max_pixels`` or its estimate the memory budget.

    The budget is ``max_memory`` when given, else :data:`MEMORY_HEADROOM` of what
    ``pipeline.common.memory.available_bytes`` reports now.
    """
    from pipeline.common.memory import available_bytes, format_size

    size = f"{width}x{height}"
    if max_pixels is not None and height * width > max_pixels:
        raise PairTooLarge(f"{size} = {height * width} pixels exceeds --max-pixels {max_pixels}")
    need = fuse_memory_estimate(height, width)
    if max_memory is not None:
        budget, source = max_memory, "--max-memory"
    else:
        free = available_bytes()
        if free is None:
            return
        budget, source = int(free * MEMORY_HEADROOM), "available memory"
    if need > budget:
        raise PairTooLarge(f"{size} needs about {format_size(need)} to fuse, more than the "
                           f"{format_size(budget)} of {source} (downscale or tile it, or use a larger machine)")


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
                     help="our checkpoint (e.g. models/best.pt) or the authors' fusion_model.pth "
                          "(default, without --model: the shipped models/pretrained/mda_cpu.pt)")
    src.add_argument("--model", metavar="URI",
                     help="registered model, e.g. models:/mda-fusion@champion (MLflow registry)")
    parser.add_argument(
        "--postprocess", choices=("minmax", "clip"), default=None,
        help="output mapping to 0-255: 'minmax' stretches each fused image (the authors' test "
             "procedure; default for the authors' weights), 'clip' keeps the raw intensities "
             "(default for our checkpoints, unless the checkpoint records another default)",
    )
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing output files that mda fuse did not write (its own PNGs "
                             "are replaced without it); inputs are never overwritten")
    parser.add_argument("--threads", type=int, default=None,
                        help="PyTorch threads (default: one per available CPU core)")
    parser.add_argument("--max-pixels", type=int, default=None, metavar="N",
                        help="refuse pairs with more than N pixels (default: no pixel limit)")
    parser.add_argument("--max-memory", default=None, metavar="SIZE",
                        help="memory one pair may take, e.g. 4G; a pair whose estimated peak "
                             f"({FUSE_BYTES_PER_PIXEL} bytes per pixel) exceeds it is refused "
                             "(default: 90%% of the memory available when it is fused)")
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
        if not DEFAULT_WEIGHTS.is_file():
            raise ValueError(f"no model given and the shipped model {DEFAULT_WEIGHTS} is missing: pass "
                             "--weights FILE (our checkpoint or the authors' fusion_model.pth) or "
                             "--model models:/NAME@ALIAS")
        args.weights = str(DEFAULT_WEIGHTS)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.max_pixels is not None and args.max_pixels < 1:
        raise ValueError(f"--max-pixels must be >= 1, got {args.max_pixels}")


def _check_outputs_and_store(args: argparse.Namespace) -> None:
    """Before any model or image is loaded: the output can be written, the MLflow store answers."""
    from pipeline.common.mlflow_store import require_tracking_store
    from pipeline.common.preflight import check_output

    single_file = args.ir is not None and not args.out.is_dir()
    check_output(args.out, "file" if single_file else "dir", "--out")
    if args.model is not None and str(args.model).startswith(("models:/", "runs:/")):
        require_tracking_store(read_only=True)  # reads a registered model: never creates a store


def _fuse_one(fuser: Any, ir_path: Path, vi_path: Path, out_path: Path,
              limits: tuple[int | None, int | None]) -> None:
    """Read, check the size and the memory budget, fuse and write one pair."""
    from pipeline.data.images import read_pair

    ir, vis = read_pair(ir_path, vi_path)
    check_fits(*ir.shape[:2], *limits)
    try:
        fused = fuser(ir, vis)
    except MemoryError:
        raise PairTooLarge(f"{ir.shape[1]}x{ir.shape[0]}: out of memory while fusing") from None
    except RuntimeError as exc:  # PyTorch: "DefaultCPUAllocator: can't allocate memory ..."
        if "allocate" not in str(exc):
            raise
        raise PairTooLarge(f"{ir.shape[1]}x{ir.shape[0]}: out of memory while fusing") from None
    _write(out_path, fused)


def _write(path: Path, image: Any) -> None:
    """Write atomically; a PNG carries the ``Software: mda fuse`` mark (``fuse_outputs``)."""
    import cv2

    from pipeline.cli.fuse_outputs import mark_png
    from pipeline.common.atomic_io import write_bytes_atomic

    ok, buf = cv2.imencode(path.suffix, image)
    if not ok:
        raise OSError(f"OpenCV could not encode {path.suffix} output")
    data = buf.tobytes()
    write_bytes_atomic(path, mark_png(data) if path.suffix.lower() == ".png" else data)


def plan_jobs(args: argparse.Namespace) -> tuple[list[tuple[Path, Path, Path]], list[tuple[str, str]]]:
    """``(jobs, unmatched)``: ``(ir, vi, out)`` per pair, checked by ``fuse_outputs`` before any
    model is loaded (no input overwritten, no foreign file replaced without ``--overwrite``)."""
    from pipeline.cli import fuse_outputs as fo
    from pipeline.data.images import find_pairs

    if args.ir is not None:
        fo.check_sources(args.ir, args.vis, folders=False)
        out = args.out / f"{args.ir.stem}.png" if args.out.is_dir() else args.out
        fo.check_suffix(out)
        jobs = [(args.ir, args.vis, out)]
        fo.check_plan(jobs, [args.ir, args.vis], args.overwrite)
        return jobs, []
    fo.check_sources(args.ir_dir, args.vi_dir, folders=True)
    fo.check_plan([], [], args.overwrite, input_dirs=[args.ir_dir, args.vi_dir], out_dir=args.out)
    pairs, unmatched = find_pairs(args.ir_dir, args.vi_dir)
    jobs = [(p.ir, p.vi, args.out / f"{p.stem}.png") for p in pairs]
    inputs = [Path(x) for p in pairs for x in (p.ir, p.vi)] + [Path(u) for u, _ in unmatched]
    fo.check_plan(jobs, inputs, args.overwrite, input_dirs=[args.ir_dir, args.vi_dir], out_dir=args.out)
    return jobs, list(unmatched)


def run(args: argparse.Namespace) -> int:
    """Fuse the pair(s); returns 0 if every pair was fused, 1 otherwise."""
    _check_args(args)
    from pipeline.common.machine import use_huge_pages
    from pipeline.common.memory import parse_size

    limits = (args.max_pixels, parse_size(args.max_memory) if args.max_memory is not None else None)
    jobs, unmatched = plan_jobs(args)
    _check_outputs_and_store(args)
    use_huge_pages()  # before torch's first allocation (pipeline.common.machine)
    from tqdm import tqdm

    from pipeline.data.images import ImageError
    from pipeline.model.inference import Fuser, set_threads
    from pipeline.model.weights import resolve_model_source

    set_threads(args.threads)
    source = resolve_model_source(args.weights if args.weights is not None else args.model)
    fuser = Fuser.from_file(source, postprocess=args.postprocess)
    log.info("weights %s (%s), post-processing '%s'", source, fuser.info["kind"], fuser.postprocess)

    failures: list[tuple[str, str]] = list(unmatched)
    for path, reason in unmatched:
        print(f"mda fuse: skipped {path}: {reason}", file=sys.stderr)

    done = 0
    bar = tqdm(jobs, desc="fuse", unit="pair", disable=len(jobs) < 2, file=sys.stderr)
    for ir_path, vi_path, out_path in bar:
        try:
            _fuse_one(fuser, ir_path, vi_path, out_path, limits)
            done += 1
        except PairTooLarge as exc:
            failures.append((str(ir_path), str(exc)))
            tqdm.write(f"mda fuse: refused {ir_path}: {exc}", file=sys.stderr)
        except ImageError as exc:
            failures.append((exc.path, exc.reason))
            tqdm.write(f"mda fuse: skipped {exc.path}: {exc.reason}", file=sys.stderr)
        except ValueError as exc:  # e.g. a non-finite network output: the pair fails, nothing written
            failures.append((str(ir_path), str(exc)))
            tqdm.write(f"mda fuse: failed {ir_path}: {exc}", file=sys.stderr)
        except OSError as exc:  # e.g. the output folder is not writable
            failures.append((str(out_path), exc.strerror or str(exc)))
            tqdm.write(f"mda fuse: cannot write {out_path}: {exc}", file=sys.stderr)
    print(f"mda fuse: {done} fused, {len(failures)} failed -> {args.out}", file=sys.stderr)
    if failures:
        print("mda fuse: failed: " + ", ".join(path for path, _ in failures), file=sys.stderr)
        return 1
    return 0
