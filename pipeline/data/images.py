"""The one place that reads, converts and writes images, and pairs IR/visible files by stem.

Conventions used everywhere in the project:

- IR images are single-channel ``uint8`` (H, W). Three identical channels are folded to one;
  three differing channels are converted to gray (ITU-R BT.601 weights, as OpenCV does); an alpha
  channel is dropped. 16-bit IR (raw radiometric frames) is stretched linearly between its 0.1 and
  99.9 percentiles to 0-255, because raw thermal counts usually occupy a narrow band of the 16-bit
  range and a fixed ``/257`` would give a flat image.
- Visible images keep their colour as ``uint8`` BGR (H, W, 3) (OpenCV order), or (H, W) for gray
  files. 16-bit visible images are scaled by ``1/257`` (full-range cameras).
- Fusion uses the luma: ``Y`` of OpenCV's YCrCb conversion; the chroma (Cr, Cb) is kept to put the
  colour back on the fused ``Y`` (``merge_luma``).
- Any other bit depth (32-bit, float, 1-bit palettes decoded to something else) is rejected with
  ``ImageError`` naming the file.
"""

from __future__ import annotations

import errno
import stat
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.common.atomic_io import write_bytes_atomic

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ImageError(ValueError):
    """An image that cannot be used; ``path`` names the file and the message says why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # pickled as (path, reason): Ray ships a task's exception back to the driver
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True)
class Pair:
    """An IR/visible pair found by stem."""

    stem: str
    ir: Path
    vi: Path


def _unusable(path: Path) -> str | None:
    """Why a directory entry with an image suffix cannot be read as a file, or ``None`` if it can."""
    try:
        st = path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"unreadable: {path}: symbolic link loop"
        if path.is_symlink():
            return f"unreadable: {path}: dangling symbolic link"
        return f"unreadable: {path}: {exc.strerror or exc}"
    return None if stat.S_ISREG(st.st_mode) else "not a file"


def scan_images(folder: str | Path) -> tuple[dict[str, Path], dict[str, str]]:
    """The image files directly inside ``folder`` and the stems that cannot be used.

    Returns:
        ``(images, rejected)``: stem -> path of each usable image (sorted by stem), and stem ->
        reason (``"duplicate_stem: ..."`` when two files share the stem, ``"unreadable: ..."`` for a
        symbolic link loop or a dangling link), naming the files. Folders and other non-files with
        an image suffix are ignored.

    Raises:
        FileNotFoundError: the folder does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    found: dict[str, list[Path]] = {}
    rejected: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        problem = _unusable(path)
        if problem == "not a file":
            continue
        if problem is not None:
            rejected[path.stem] = problem
        found.setdefault(path.stem, []).append(path)
    images: dict[str, Path] = {}
    for stem, paths in found.items():
        if len(paths) > 1:
            rejected[stem] = (f"duplicate_stem: {folder}: {len(paths)} images share the stem '{stem}': "
                              + " and ".join(p.name for p in paths))
        elif stem not in rejected:
            images[stem] = paths[0]
    return dict(sorted(images.items())), dict(sorted(rejected.items()))


def list_images(folder: str | Path) -> dict[str, Path]:
    """Map stem -> path for the image files directly inside ``folder`` (sorted by stem).

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: a stem cannot be used (two files share it, which makes pairing ambiguous, or
            a symbolic link loop); ``find_pairs`` rejects such stems one by one instead.
    """
    images, rejected = scan_images(folder)
    if rejected:
        raise ValueError(next(iter(rejected.values())))
    return images


def find_pairs(ir_dir: str | Path, vi_dir: str | Path) -> tuple[list[Pair], list[tuple[str, str]]]:
    """Pair the images of ``ir_dir`` and ``vi_dir`` by file stem.

    A stem that cannot be used on one side (``scan_images``: duplicate stem, unreadable link) is
    rejected alone: its files on both sides are reported with that reason, the other pairs are kept.

    Returns:
        ``(pairs, unmatched)``: the pairs sorted by stem, and ``(path, reason)`` for every file not
        paired, the reason starting with its kind (``missing_partner:``, ``duplicate_stem:``,
        ``unreadable:``).

    Raises:
        FileNotFoundError: a folder is missing.
        ValueError: both folders hold no image at all.
    """
    ir, ir_bad = scan_images(ir_dir)
    vi, vi_bad = scan_images(vi_dir)
    if not ir and not vi and not ir_bad and not vi_bad:
        raise ValueError(f"no images found in {ir_dir} or {vi_dir} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    unmatched: list[tuple[str, str]] = []
    for folder, bad in ((ir_dir, ir_bad), (vi_dir, vi_bad)):
        unmatched += [(str(Path(folder) / stem), reason) for stem, reason in bad.items()]
    bad_stems = set(ir_bad) | set(vi_bad)
    for images in (ir, vi):
        unmatched += [(str(p), (ir_bad.get(s) or vi_bad[s]) + " (its partner)") for s, p in images.items() if s in bad_stems]
    ir = {s: p for s, p in ir.items() if s not in bad_stems}
    vi = {s: p for s, p in vi.items() if s not in bad_stems}
    pairs = [Pair(stem, ir[stem], vi[stem]) for stem in ir if stem in vi]
    unmatched += [(str(p), f"missing_partner: missing visible partner '{s}.*' in {vi_dir}") for s, p in ir.items() if s not in vi]
    unmatched += [(str(p), f"missing_partner: missing IR partner '{s}.*' in {ir_dir}") for s, p in vi.items() if s not in ir]
    return pairs, unmatched


def read_raw(path: str | Path) -> np.ndarray:
    """Read a file as stored (any depth, any channel count); raise ``ImageError`` if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(path, "file not found")
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None or img.size == 0:
        raise ImageError(path, "cannot decode image (unreadable, corrupt or not an image)")
    return img


def _to_uint8(img: np.ndarray, path: Path | str, stretch: bool) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        if not stretch:
            return np.round(img.astype(np.float32) / 257.0).astype(np.uint8)
        lo, hi = np.percentile(img, [0.1, 99.9])
        if hi <= lo:
            hi = lo + 1.0
        scaled = (img.astype(np.float32) - lo) * (255.0 / (hi - lo))
        return np.clip(np.round(scaled), 0, 255).astype(np.uint8)
    raise ImageError(path, f"unsupported bit depth {img.dtype} (expected 8-bit or 16-bit)")


def _drop_alpha(img: np.ndarray, path: Path | str) -> np.ndarray:
    if img.ndim == 2:
        return img
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ImageError(path, f"unsupported channel layout {img.shape}")
    if img.shape[2] == 1:
        return img[:, :, 0]
    return img[:, :, :3]


def read_ir(path: str | Path) -> np.ndarray:
    """Read an IR image as ``uint8`` (H, W); see the module docstring for the conversions."""
    img = _drop_alpha(read_raw(path), path)
    img = _to_uint8(img, path, stretch=True)
    if img.ndim == 3:
        if np.array_equal(img[:, :, 0], img[:, :, 1]) and np.array_equal(img[:, :, 0], img[:, :, 2]):
            img = img[:, :, 0]
        else:
            spread = _channel_spread(img)
            if spread > MAX_IR_CHANNEL_SPREAD:
                raise ImageError(path, f"is a colour image (its channels differ by {spread:.0f} gray levels on "
                                       "average): a false-colour palette such as JET is not monotonic in "
                                       "temperature; give the single-channel thermal image")
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    return np.ascontiguousarray(img)


#: Largest mean difference (gray levels) between the channels of a 3-channel IR file still read as
#: gray (compression noise of a gray image); every 3-channel IR of TNO and MSRS has 0, JET ~200.
MAX_IR_CHANNEL_SPREAD = 10.0


def _channel_spread(img: np.ndarray) -> float:
    """Mean absolute difference of channels 1 and 2 from channel 0 (the larger), on a subsample."""
    sub = img[:: max(1, img.shape[0] // 256), :: max(1, img.shape[1] // 256)].astype(np.int16)
    return float(max(np.abs(sub[..., 0] - sub[..., 1]).mean(), np.abs(sub[..., 0] - sub[..., 2]).mean()))


def read_visible(path: str | Path) -> np.ndarray:
    """Read a visible image as ``uint8`` BGR (H, W, 3), or (H, W) when the file is gray.

    A colour file whose three channels are identical is returned as gray (H, W).
    """
    img = _drop_alpha(read_raw(path), path)
    img = _to_uint8(img, path, stretch=False)
    if img.ndim == 3 and np.array_equal(img[:, :, 0], img[:, :, 1]) and np.array_equal(img[:, :, 0], img[:, :, 2]):
        img = img[:, :, 0]
    return np.ascontiguousarray(img)


def read_gray(path: str | Path) -> np.ndarray:
    """Read any image as ``uint8`` gray (H, W) with OpenCV's BGR->gray (metric convention)."""
    img = _to_uint8(_drop_alpha(read_raw(path), path), path, stretch=False)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    return np.ascontiguousarray(img)


def read_pair(ir_path: str | Path, vi_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an IR/visible pair of the same size: ``uint8`` IR (H, W), visible (H, W, 3) BGR or (H, W).

    Raises:
        ImageError: a file is missing or unreadable, or the sizes differ (naming the visible file).
    """
    ir, vi = read_ir(ir_path), read_visible(vi_path)
    if vi.shape[:2] != ir.shape:
        raise ImageError(vi_path, f"size {vi.shape[1]}x{vi.shape[0]} differs from IR {ir_path} ({ir.shape[1]}x{ir.shape[0]})")
    return ir, vi


def split_luma(visible: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Split a visible image into its luma and chroma.

    Args:
        visible: ``uint8`` BGR (H, W, 3) or gray (H, W).

    Returns:
        ``(y, crcb)``: ``y`` ``uint8`` (H, W); ``crcb`` ``uint8`` (H, W, 2) in OpenCV's YCrCb order,
        or ``None`` for a gray input.
    """
    if visible.ndim == 2:
        return visible, None
    ycrcb = cv2.cvtColor(visible, cv2.COLOR_BGR2YCrCb)
    return np.ascontiguousarray(ycrcb[:, :, 0]), np.ascontiguousarray(ycrcb[:, :, 1:])


def merge_luma(y: np.ndarray, crcb: np.ndarray | None) -> np.ndarray:
    """Put a (fused) luma back together with the chroma of the visible image.

    Args:
        y: ``uint8`` (H, W).
        crcb: ``uint8`` (H, W, 2) from ``split_luma``, or ``None`` (gray out).

    Returns:
        ``uint8`` BGR (H, W, 3), or ``y`` itself when ``crcb`` is ``None``.
    """
    if crcb is None:
        return y
    if crcb.shape[:2] != y.shape:
        raise ValueError(f"luma {y.shape} and chroma {crcb.shape[:2]} sizes differ")
    return cv2.cvtColor(np.dstack([y, crcb]), cv2.COLOR_YCrCb2BGR)


def to_float(img: np.ndarray) -> np.ndarray:
    """``uint8`` -> ``float32`` in [0, 1]."""
    return img.astype(np.float32) / 255.0


def to_uint8(img: np.ndarray) -> np.ndarray:
    """``float`` in [0, 1] -> ``uint8`` (rounded, clipped)."""
    return np.clip(np.round(np.asarray(img, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def write_image(path: str | Path, img: np.ndarray) -> Path:
    """Write an image atomically (temporary file + rename), creating parent folders.

    The format follows the suffix of ``path`` (PNG recommended: lossless).
    """
    path = Path(path)
    ok, buf = cv2.imencode(path.suffix or ".png", img)
    if not ok:
        raise ImageError(path, "OpenCV could not encode the image")
    write_bytes_atomic(path, buf.tobytes())
    return path
