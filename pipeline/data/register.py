"""The register step: validate IR/visible pairs, check and correct their alignment, on Ray Data.

Per pair (one Ray Data row each):

1. Read with :func:`pipeline.data.images.read_ir` / :func:`pipeline.data.images.read_visible` (IR: one ``uint8``
   channel, 16-bit stretched; visible: ``uint8`` BGR or gray).
2. Validate; a bad pair is *rejected* with a reason code, the others go on:
   ``missing_partner``, ``unreadable`` (missing, corrupt or not an image), ``unsupported_format``
   (bit depth other than 8/16, odd channel layout), ``size_mismatch``, ``constant_image``.
3. Estimate the residual misalignment with ECC (:func:`estimate_alignment`) on gradient-magnitude
   images (IR vs visible luma: raw intensities of two modalities do not correlate, their edges do),
   coarse to fine, initialised by the better of identity and phase correlation.
4. When the estimated displacement exceeds ``max_shift_px`` (and the estimate beats identity), warp
   the visible image onto the IR frame (colour kept); otherwise the decoded images are written
   unchanged. An estimate that fails (no convergence, implausible displacement) leaves the pair
   unchanged and is recorded in ``align_error``.

Outputs of :func:`register_dataset` in ``OUT``: ``ir/<stem>.png`` (``uint8`` gray), ``vi/<stem>.png``
(``uint8`` BGR or gray), ``manifest.parquet`` (:data:`MANIFEST_SCHEMA`, one row per pair, accepted
and rejected) and ``rejected.json`` (``[{pair_id, ir, vi, reason}]``). The images are written by the
Ray tasks, so on a multi-node cluster ``OUT`` must be on storage shared by all nodes.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.common.atomic_io import atomic_writer, replace_dir, staging_dir, write_json
from pipeline.common.ray_runtime import configure_data_context
from pipeline.data.contracts import MANIFEST_SCHEMA
from pipeline.data.images import ImageError, find_pairs, read_ir, read_visible, split_luma, write_image
from pipeline.data.register_options import MOTION_NAMES, AlignOptions

log = logging.getLogger(__name__)

#: OpenCV ECC motion type of each ``register.motion`` name.
MOTIONS: dict[str, int] = {name: getattr(cv2, f"MOTION_{name.upper()}") for name in MOTION_NAMES}

_IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


class NoPairsError(ValueError):
    """No pair survived validation (the message lists why)."""


@dataclass(frozen=True)
class Alignment:
    """Result of :func:`estimate_alignment`.

    Attributes:
        warp: (2, 3) float64, IR pixel coords -> visible pixel coords (identity when ``error``).
        score: ECC correlation of the gradient magnitudes at ``warp`` (NaN when ``error``).
        identity_score: the same correlation without any warp.
        shift_px: largest displacement of ``warp`` over corners and centre, in pixels.
        error: why the estimate must not be used, else ``None``.
    """

    warp: np.ndarray
    score: float
    identity_score: float
    shift_px: float
    error: str | None = None


def normalised_edges(img: np.ndarray) -> np.ndarray:
    """Contrast-normalised Sobel gradient magnitude of a lightly smoothed image.

    The magnitude is divided by its local mean (Gaussian, sigma 6 px) plus half its global mean,
    so that an edge weighs about as much in a low-contrast modality as in a high-contrast one
    (IR and visible rarely agree on edge *strength*, they do on edge *position*).

    Args:
        img: (H, W) ``uint8`` or float.

    Returns:
        (H, W) ``float32``, dimensionless (about 1 on edges of average local contrast).
    """
    f = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 1.0)
    g = cv2.magnitude(cv2.Sobel(f, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(f, cv2.CV_32F, 0, 1, ksize=3))
    local = cv2.GaussianBlur(g, (0, 0), 6.0)
    return g / (local + 0.5 * float(g.mean()) + 1e-6)


def displacement_px(warp: np.ndarray, height: int, width: int) -> float:
    """Largest displacement ``|warp(p) - p|`` over the four corners and the centre (pixels)."""
    pts = np.array(
        [[0, 0], [width - 1, 0], [0, height - 1], [width - 1, height - 1], [(width - 1) / 2, (height - 1) / 2]],
        dtype=np.float64,
    )
    mapped = pts @ np.asarray(warp, np.float64)[:, :2].T + np.asarray(warp, np.float64)[:, 2]
    return float(np.max(np.linalg.norm(mapped - pts, axis=1)))


def warp_visible(vi: np.ndarray, warp: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resample the visible image onto the IR frame.

    Args:
        vi: ``uint8`` (H', W'[, 3]) visible image.
        warp: (2, 3) map from IR coords to visible coords (as estimated).
        height, width: size of the IR frame.

    Returns:
        ``uint8`` (height, width[, 3]): bilinear, borders replicated.
    """
    return cv2.warpAffine(
        vi,
        np.asarray(warp, np.float32),
        (width, height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )


def _scale_translation(warp: np.ndarray, factor: float) -> np.ndarray:
    """The same warp on both images down/up-sampled by ``factor`` with ``x' = factor * x`` (pyrDown)."""
    out = np.array(warp, np.float64)
    out[:, 2] *= factor
    return out


def _from_resized(warp_s: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """A warp estimated on images resized by (sx, sy) (``cv2.resize`` pixel centres:
    ``x_s = s (x + 0.5) - 0.5``), expressed on the original images."""
    s = np.array([sx, sy])
    c = 0.5 * (s - 1.0)
    a_s, t_s = warp_s[:, :2], warp_s[:, 2]
    a = a_s * s[None, :] / s[:, None]
    t = (a_s @ c + t_s - c) / s
    return np.hstack([a, t[:, None]])


def estimate_alignment(ir: np.ndarray, vi_y: np.ndarray, options: AlignOptions = AlignOptions()) -> Alignment:
    """Estimate the warp that maps IR pixel coordinates onto the visible image.

    ECC (``cv2.findTransformECC``) on the gradient magnitudes of an image pyramid, coarse to fine.
    At the coarsest level a translation is fitted from two starts, identity and the
    phase-correlation shift, and the better one (higher ECC) is kept; each level then refines the
    full motion model of ``options`` from the level above.

    Args:
        ir: ``uint8`` (H, W) IR image (the template).
        vi_y: ``uint8`` (H, W) visible luma, same size.
        options: motion model, pyramid and iteration bounds.

    Returns:
        The :class:`Alignment` in full-resolution pixels; never raises for image content.
    """
    if ir.shape != vi_y.shape:
        raise ValueError(f"IR {ir.shape} and visible {vi_y.shape} sizes differ")
    h, w = ir.shape
    scale = min(1.0, options.max_size / max(h, w))
    ir_s, vi_s = ir.astype(np.float32), vi_y.astype(np.float32)
    if scale < 1.0:
        size = (max(8, round(w * scale)), max(8, round(h * scale)))
        ir_s = cv2.resize(ir_s, size, interpolation=cv2.INTER_AREA)
        vi_s = cv2.resize(vi_s, size, interpolation=cv2.INTER_AREA)
    scale_x, scale_y = ir_s.shape[1] / w, ir_s.shape[0] / h
    levels = max(1, min(options.levels, int(np.log2(max(1, min(ir_s.shape) // 64))) + 1))
    pyr_ir, pyr_vi = [ir_s], [vi_s]
    for _ in range(levels - 1):
        pyr_ir.append(cv2.pyrDown(pyr_ir[-1]))
        pyr_vi.append(cv2.pyrDown(pyr_vi[-1]))
    # gradients per level (of the smoothed image, not a smoothed gradient: fine texture cancels)
    pyr_ir = [normalised_edges(im) for im in pyr_ir]
    pyr_vi = [normalised_edges(im) for im in pyr_vi]
    # findTransformECC smooths both images with a 5x5 Gaussian (gaussFiltSize=5): score likewise
    identity_score = _ecc_value(cv2.GaussianBlur(pyr_ir[0], (5, 5), 0), cv2.GaussianBlur(pyr_vi[0], (5, 5), 0))
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, options.max_iterations, options.eps)

    def ecc(level: int, warp: np.ndarray, motion: int) -> tuple[float, np.ndarray]:
        cc, out = cv2.findTransformECC(pyr_ir[level], pyr_vi[level], warp.astype(np.float32), motion, criteria, None, 5)
        return float(cc), out.astype(np.float64)

    try:
        score, warp = _coarse_to_fine(pyr_ir, pyr_vi, MOTIONS[options.motion], ecc)
    except cv2.error:
        try:  # fall back to the finest level alone, from identity
            score, warp = ecc(0, _IDENTITY.copy(), MOTIONS[options.motion])
        except cv2.error as exc:
            return Alignment(
                _IDENTITY.copy(), float("nan"), identity_score, 0.0, f"ECC did not converge: {_short_cv_error(exc)}"
            )
    if not np.isfinite(score) or not np.all(np.isfinite(warp)):
        return Alignment(_IDENTITY.copy(), float("nan"), identity_score, 0.0, "ECC returned a non-finite result")
    if score <= identity_score:  # the search ended in a worse optimum: identity is the best estimate
        return Alignment(_IDENTITY.copy(), identity_score, identity_score, 0.0)
    full = _from_resized(warp, scale_x, scale_y) if scale < 1.0 else warp
    shift = displacement_px(full, h, w)
    if shift > options.max_correction_px:
        return Alignment(
            full, score, identity_score, shift,
            f"implausible displacement {shift:.1f} px > register.max_correction_px {options.max_correction_px:g}",
        )
    return Alignment(full, score, identity_score, shift)


def _coarse_to_fine(pyr_ir: list, pyr_vi: list, motion: int, ecc: Any) -> tuple[float, np.ndarray]:
    """Translation at the coarsest level from identity and phase correlation, then ``motion`` at
    every level; raises ``cv2.error`` when ECC fails."""
    coarsest = len(pyr_ir) - 1
    g_ir, g_vi = pyr_ir[coarsest], pyr_vi[coarsest]
    starts = [_IDENTITY.copy()]
    window = cv2.createHanningWindow((g_ir.shape[1], g_ir.shape[0]), cv2.CV_32F)
    (dx, dy), _ = cv2.phaseCorrelate(g_ir, g_vi, window)
    if np.hypot(dx, dy) > 0.25:
        starts.append(np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]]))
    best: tuple[float, np.ndarray] | None = None
    error: cv2.error | None = None
    for start in starts:
        try:
            cc, warp = ecc(coarsest, start, cv2.MOTION_TRANSLATION)
        except cv2.error as exc:
            error = exc
            continue
        if np.isfinite(cc) and (best is None or cc > best[0]):
            best = (cc, warp)
    if best is None:
        raise error or cv2.error("no start converged")
    score, warp = best
    for level in range(coarsest, -1, -1):
        if level < coarsest:
            warp = _scale_translation(warp, 2.0)
        if motion != cv2.MOTION_TRANSLATION or level < coarsest:
            score, warp = ecc(level, warp, motion)
    return score, warp


def _ecc_value(a: np.ndarray, b: np.ndarray) -> float:
    """Zero-mean normalised correlation of two float images (the ECC criterion at identity)."""
    a = a.astype(np.float64).ravel() - a.mean()
    b = b.astype(np.float64).ravel() - b.mean()
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else 0.0


def _short_cv_error(exc: Exception) -> str:
    """``cv2.error`` text without OpenCV's source path: ``"(-7:Iterations do not converge) ..."``."""
    import re

    text = " ".join(str(exc).split())
    m = re.search(r"error: (\(.*?\) .*?)(?: in function .*)?$", text)
    return m.group(1) if m else text


# --------------------------------------------------------------------------------------------------
# one pair
# --------------------------------------------------------------------------------------------------


class _Rejected(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.reason = f"{code}: {detail}"


def _read(reader: Any, path: str, what: str) -> np.ndarray:
    try:
        return reader(path)
    except ImageError as exc:
        code = "unsupported_format" if "unsupported" in exc.reason else "unreadable"
        raise _Rejected(code, f"{what} {path}: {exc.reason}") from None


def _empty_row(pair_id: str, ir: str | None, vi: str | None) -> dict[str, Any]:
    return {
        "pair_id": pair_id, "ir_src": ir, "vi_src": vi, "height": None, "width": None, "vi_channels": None,
        "transform": None, "align_score": None, "shift_px": None, "corrected": False,
        "status": "rejected", "reason": None, "align_error": None,
    }


def register_pair(pair_id: str, ir_path: str, vi_path: str, out_dir: str | Path, options: AlignOptions) -> dict[str, Any]:
    """Validate, align and write one pair; never raises for bad input.

    Args:
        pair_id: stem; the outputs are ``out_dir/ir/<pair_id>.png`` and ``out_dir/vi/<pair_id>.png``.
        ir_path, vi_path: source files.
        out_dir: output root (written only for accepted pairs).
        options: alignment settings.

    Returns:
        The manifest row (:data:`MANIFEST_SCHEMA` columns as Python values).
    """
    row = _empty_row(pair_id, str(ir_path), str(vi_path))
    try:
        ir = _read(read_ir, str(ir_path), "IR")
        vi = _read(read_visible, str(vi_path), "visible")
        if ir.shape[:2] != vi.shape[:2]:
            raise _Rejected(
                "size_mismatch",
                f"IR {ir.shape[1]}x{ir.shape[0]} vs visible {vi.shape[1]}x{vi.shape[0]} (WxH)",
            )
        for img, what, path in ((ir, "IR", ir_path), (vi, "visible", vi_path)):
            if int(img.min()) == int(img.max()):
                raise _Rejected("constant_image", f"{what} {path} is constant (value {int(img.min())})")
        h, w = ir.shape
        row.update(height=h, width=w, vi_channels=1 if vi.ndim == 2 else int(vi.shape[2]))
        y, _ = split_luma(vi)
        al = estimate_alignment(ir, y, options)
        corrected = al.error is None and al.shift_px > options.max_shift_px
        error = al.error
        vi_out = warp_visible(vi, al.warp, h, w) if corrected else vi
        out = Path(out_dir)
        write_image(out / "ir" / f"{pair_id}.png", ir)
        write_image(out / "vi" / f"{pair_id}.png", vi_out)
        row.update(
            transform=[float(v) for v in al.warp.ravel()],
            align_score=None if not np.isfinite(al.score) else float(al.score),
            shift_px=float(al.shift_px),
            corrected=bool(corrected),
            status="ok",
            align_error=error,
        )
    except _Rejected as rej:
        row["reason"] = rej.reason
    except Exception as exc:  # keep the stage going; the manifest says what happened
        log.exception("pair %s failed", pair_id)
        row["reason"] = f"internal_error: {type(exc).__name__}: {exc}"
    return row


# --------------------------------------------------------------------------------------------------
# the whole step on Ray Data
# --------------------------------------------------------------------------------------------------


@dataclass
class RegisterSummary:
    """Counts of a register run."""

    found: int = 0
    accepted: int = 0
    corrected: int = 0
    align_failed: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    out_dir: str = ""

    def format(self) -> str:
        """Human-readable multi-line summary."""
        lines = [
            f"register: {self.found} pairs found, {self.accepted} accepted "
            f"({self.corrected} re-aligned, {self.align_failed} alignment estimates not used), "
            f"{sum(self.rejected.values())} rejected",
        ]
        for code, n in sorted(self.rejected.items()):
            lines.append(f"  rejected {code}: {n}")
        if self.out_dir:
            lines.append(f"  outputs in {self.out_dir} (manifest.parquet, rejected.json, ir/, vi/)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)


def _map_row(item: dict[str, Any], out_dir: str, options: dict[str, Any]) -> dict[str, Any]:
    cv2.setNumThreads(1)  # one pair per task; Ray runs as many tasks as there are CPUs
    row = register_pair(item["pair_id"], item["ir"], item["vi"], out_dir, AlignOptions(**options))
    # One JSON column: Arrow would otherwise infer per-block types for columns that are null in
    # some blocks (rejected pairs) and lists in others.
    return {"pair_id": item["pair_id"], "record": json.dumps(row)}


def register_dataset(
    ir_dir: str | Path,
    vi_dir: str | Path,
    out_dir: str | Path,
    options: AlignOptions = AlignOptions(),
    progress: bool = True,
) -> RegisterSummary:
    """Run the register step on every pair of ``ir_dir`` / ``vi_dir`` with Ray Data.

    Ray must be initialised by the caller (``pipeline.common.ray_runtime.ray_session``). Outputs are built
    in a staging folder beside ``out_dir`` (``pipeline.common.atomic_io.staging_dir``) that replaces it as a
    whole at the end, so an earlier result is replaced only by a complete new one (and kept when
    no pair survives or a step fails).

    Args:
        ir_dir, vi_dir: folders of IR and visible images paired by stem.
        out_dir: output folder (see the module docstring for its content).
        options: alignment settings.
        progress: show a tqdm bar (stderr), advanced as results stream back.

    Returns:
        The :class:`RegisterSummary`.

    Raises:
        FileNotFoundError: a folder is missing.
        ValueError: both folders are empty.
        NoPairsError: no pair survived validation.
        ValueError: ``out_dir`` is a non-empty folder that is not a register output.
    """
    import ray.data
    from tqdm import tqdm

    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.parquet").is_file():
        raise ValueError(f"{out}: not empty and not the output of a register step (no manifest.parquet); refusing to replace it")
    pairs, unmatched = find_pairs(ir_dir, vi_dir)
    rows: list[dict[str, Any]] = []
    for path, reason in unmatched:
        p = Path(path)
        is_ir = p.parent.resolve() == Path(ir_dir).resolve()
        row = _empty_row(p.stem, str(p) if is_ir else None, None if is_ir else str(p))
        row["reason"] = reason  # find_pairs: "missing_partner: ...", "duplicate_stem: ...", "unreadable: ..."
        rows.append(row)

    staging = staging_dir(out)
    try:
        for sub in ("ir", "vi"):
            (staging / sub).mkdir()
        if pairs:
            configure_data_context()  # our own bar counts pairs
            items = [{"pair_id": p.stem, "ir": str(p.ir.resolve()), "vi": str(p.vi.resolve())} for p in pairs]
            ds = ray.data.from_items(items, override_num_blocks=min(len(items), 1000)).map(
                _map_row, fn_kwargs={"out_dir": str(staging.resolve()), "options": asdict(options)}, num_cpus=1
            )
            with tqdm(total=len(items), desc="register", unit="pair", disable=not progress) as bar:
                for result in ds.iter_rows():
                    rows.append(json.loads(result["record"]))
                    bar.update(1)
        rows.sort(key=lambda r: r["pair_id"])
        summary = _summarise(rows, len(pairs) + len(unmatched), str(out))
        if summary.accepted == 0:
            raise NoPairsError(_no_pairs_message(rows, ir_dir, vi_dir))
        _write_manifest(rows, staging / "manifest.parquet")
        rejected = [
            {"pair_id": r["pair_id"], "ir": r["ir_src"], "vi": r["vi_src"], "reason": r["reason"]}
            for r in rows
            if r["status"] != "ok"
        ]
        write_json(staging / "rejected.json", rejected)
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def _summarise(rows: list[dict[str, Any]], found: int, out_dir: str) -> RegisterSummary:
    ok = [r for r in rows if r["status"] == "ok"]
    codes = Counter(str(r["reason"]).split(":", 1)[0] for r in rows if r["status"] != "ok")
    return RegisterSummary(
        found=found,
        accepted=len(ok),
        corrected=sum(bool(r["corrected"]) for r in ok),
        align_failed=sum(r["align_error"] is not None for r in ok),
        rejected=dict(sorted(codes.items())),
        out_dir=out_dir,
    )


def _no_pairs_message(rows: list[dict[str, Any]], ir_dir: str | Path, vi_dir: str | Path) -> str:
    shown = "; ".join(f"{r['pair_id']}: {r['reason']}" for r in rows[:5])
    more = f" (and {len(rows) - 5} more)" if len(rows) > 5 else ""
    return f"no valid IR/visible pair in {ir_dir} and {vi_dir}: {shown}{more}"


def _write_manifest(rows: list[dict[str, Any]], path: Path) -> None:
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    with atomic_writer(path, "wb") as fh:
        pq.write_table(table, fh)
