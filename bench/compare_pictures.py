"""Side-by-side pictures of fused pairs: IR | visible | each model, with labels.

Usage::

    python bench/compare_pictures.py --ir IR.png --vi VI.png -o out.png [--model NAME=CKPT ...]

Models: our checkpoints or the authors' file (``Fuser``), or ``average``/``maximum``. Used for the
README's picture (a synthetic demo pair) and the before/after pictures of the day-scene fix.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from pipeline.data.images import read_ir, read_visible, write_image


def tile(img: np.ndarray, label: str, height: int) -> np.ndarray:
    img = img if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    scale = height / img.shape[0]
    img = cv2.resize(img, (round(img.shape[1] * scale), height), interpolation=cv2.INTER_AREA)
    bar = np.full((24, img.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, label, (6, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([bar, img])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ir", type=Path, required=True)
    parser.add_argument("--vi", type=Path, required=True)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--model", action="append", default=[], metavar="NAME=CKPT")
    parser.add_argument("--height", type=int, default=240)
    args = parser.parse_args(argv)
    from pipeline.evaluate.stage import fuse_average, fuse_maximum
    from pipeline.model.inference import Fuser

    ir, vi = read_ir(args.ir), read_visible(args.vi)
    tiles = [tile(ir, "IR", args.height), tile(vi, "visible", args.height)]
    for item in args.model:
        name, ckpt = item.split("=", 1)
        fuse = {"average": fuse_average, "maximum": fuse_maximum}.get(ckpt) or Fuser.from_file(ckpt)
        tiles.append(tile(fuse(ir, vi), name, args.height))
    gap = np.full((args.height + 24, 6, 3), 255, np.uint8)
    row = tiles[0]
    for t in tiles[1:]:
        row = np.hstack([row, gap, t])
    write_image(args.out, row)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
