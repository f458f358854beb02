"""Where ``mda fuse`` may write: the output plan checked before any model is loaded.

- No source is ever overwritten: an output that is, or resolves to, an input file is refused, and
  in folder mode ``-o`` equal to or inside ``--ir``/``--vi`` is refused.
- The same file (or folder) is not accepted as both IR and visible.
- An existing output that ``mda fuse`` did not write is not replaced without ``--overwrite``. Our
  PNGs carry a ``tEXt`` chunk ``Software: mda fuse`` (:func:`encode_png`), so a second run into
  the same folder replaces its own results without asking.
- An output extension that OpenCV cannot write is refused up front.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Iterable, Sequence

#: Suffixes OpenCV writes (``cv2.imencode``) in the builds we install.
WRITABLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm")
#: The PNG text chunk that marks an image written by ``mda fuse``.
SOFTWARE_KEY, SOFTWARE_VALUE = b"Software", b"mda fuse"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class OutputRefused(ValueError):
    """An output path ``mda fuse`` will not write (the message says why and the way out)."""


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    p, f = path.resolve(), folder.resolve()
    return p == f or f in p.parents


def check_sources(ir: Path, vi: Path, folders: bool) -> None:
    """Refuse the same file or folder given as both IR and visible."""
    if _same(ir, vi):
        what = "folder" if folders else "file"
        raise OutputRefused(f"the same {what} {ir} is given as both IR and visible")


def check_suffix(out: Path) -> None:
    """Refuse an output file whose suffix OpenCV cannot write."""
    if out.suffix.lower() not in WRITABLE_SUFFIXES:
        raise OutputRefused(f"-o {out}: cannot write '{out.suffix or '(no extension)'}' images "
                            f"(use one of {', '.join(WRITABLE_SUFFIXES)}; .png is lossless)")


def check_plan(jobs: Sequence[tuple[Path, Path, Path]], inputs: Iterable[Path], overwrite: bool,
               input_dirs: Sequence[Path] = (), out_dir: Path | None = None) -> None:
    """Check every planned output before any work.

    Args:
        jobs: ``(ir, vi, out)`` per pair.
        inputs: every input file (all pairs, also those not fused).
        overwrite: ``--overwrite`` (replace existing outputs that are not ours).
        input_dirs: ``--ir``/``--vi`` in folder mode.
        out_dir: ``-o`` in folder mode.

    Raises:
        OutputRefused: naming the output and the input or reason.
    """
    for folder in input_dirs:
        if out_dir is not None and _inside(out_dir, folder):
            raise OutputRefused(f"-o {out_dir} is the input folder {folder} or inside it: the fused images "
                                "would mix with (or replace) the sources; choose another folder")
    sources = {p.resolve(): p for p in inputs}
    for _, _, out in jobs:
        src = sources.get(out.resolve())
        if src is not None or any(_same(out, s) for s in sources.values() if s.exists() and out.exists()):
            raise OutputRefused(f"-o would write {out} over the input {src or out}; choose another output path")
    if overwrite:
        return
    foreign = [out for _, _, out in jobs if out.exists() and not written_by_us(out)]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise OutputRefused(f"{foreign[0]}{more} exists and was not written by mda fuse: pass --overwrite to "
                            "replace it, or choose another output path")


def written_by_us(path: Path) -> bool:
    """True for a PNG whose text chunks say ``Software: mda fuse`` (:func:`encode_png`)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return False
    if not head.startswith(_PNG_SIGNATURE):
        return False
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(head):
        length, kind = struct.unpack(">I4s", head[pos:pos + 8])
        if kind == b"tEXt" and head[pos + 8:pos + 8 + length] == SOFTWARE_KEY + b"\0" + SOFTWARE_VALUE:
            return True
        if kind == b"IDAT":
            return False
        pos += 12 + length
    return False


def mark_png(data: bytes) -> bytes:
    """PNG bytes with the ``Software: mda fuse`` text chunk inserted after ``IHDR``."""
    if not data.startswith(_PNG_SIGNATURE):
        return data
    ihdr_end = len(_PNG_SIGNATURE) + 12 + struct.unpack(">I", data[8:12])[0]
    body = b"tEXt" + SOFTWARE_KEY + b"\0" + SOFTWARE_VALUE
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    return data[:ihdr_end] + chunk + data[ihdr_end:]
