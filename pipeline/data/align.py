"""Alignment maths of the register stage: two independent offset estimates and the confidence rule.

The register stage must not move a pair on an estimate that is noise. Cross-modal alignment
estimates are fragile (a search can lock onto a spurious optimum at a correlation of 0.05), so
an estimate is used only when independent evidence agrees (:func:`check_alignment`):

1. **Gradient ECC**: translation-only ECC (``cv2.findTransformECC``) on contrast-normalised
   gradient magnitudes (:func:`gradient_magnitude`), started from identity, two pyramid levels.
   IR and visible intensities do not correlate, their edges do.
2. **MI search**: exhaustive search of the integer shift that maximises the mutual information
   of the two (histogram-equalised) intensity images (:func:`mi_shift`), a different feature and
   a different optimiser that cannot jump to a far optimum of the first.

The pair is *confident* when the ECC converged, its gradient correlation reaches
``min_score``, the two shifts agree within ``max_disagreement_px`` and the offset is within the
plausibility bound ``search_px`` (also the MI search radius). ``correct`` then fits a rigid
motion (rotation + translation ECC from the agreed shift, :func:`rigid_warp`) to a confident pair.
The thresholds and the measurements behind them are in the README (section "register").

All warps map IR pixel coordinates to visible pixel coordinates (``cv2.WARP_INVERSE_MAP``
convention), at full resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.data.register_options import AlignOptions

IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])

#: Refusal codes of :class:`AlignmentCheck` (``reason`` starts with one of them, then ``: detail``).
REFUSALS: tuple[str, ...] = ("ecc_failed", "implausible_shift", "low_score", "disagree")

#: ``reason`` code of a confident estimate.
CONFIDENT = "agree"

_MI_BINS = 32
_MI_LEVELS = 3  # exhaustive MI search at 1/4 scale, refined at 1/2 and full working scale


@dataclass(frozen=True)
class AlignmentCheck:
    """Result of :func:`check_alignment` (full-resolution pixels).

    Attributes:
        warp: (2, 3) IR -> visible translation of the ECC (identity when it failed).
        ecc_shift: (dx, dy) of the gradient ECC, ``None`` when it failed.
        mi_shift: (dx, dy) of the MI search.
        score: gradient correlation at ``warp`` (NaN when the ECC failed).
        identity_score: gradient correlation without any warp.
        shift_px: largest displacement of ``warp`` over the corners and the centre.
        disagreement_px: largest per-axis difference of the two shifts (NaN when the ECC failed).
        confident: the estimate is proven (see the module docstring).
        reason: ``"agree: ..."`` when confident, else a code of :data:`REFUSALS` and a detail.
    """

    warp: np.ndarray
    ecc_shift: tuple[float, float] | None
    mi_shift: tuple[float, float]
    score: float
    identity_score: float
    shift_px: float
    disagreement_px: float
    confident: bool
    reason: str


def gradient_magnitude(img: np.ndarray) -> np.ndarray:
    """Contrast-normalised Sobel gradient magnitude of a lightly smoothed image.

    The magnitude is divided by its local mean (Gaussian, sigma 6 px) plus half its global mean,
    so that an edge weighs about as much in a low-contrast modality as in a high-contrast one.

    Args:
        img: (H, W) ``uint8`` or float.

    Returns:
        (H, W) ``float32``, about 1 on edges of average local contrast.
    """
    f = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 1.0)
    gx, gy = cv2.Sobel(f, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(f, cv2.CV_32F, 0, 1, ksize=3)
    # not cv2.magnitude: its result depends on the arrays' memory alignment (SIMD head/tail in
    # other arithmetic), which made the same pair's rigid fit differ from run to run; numpy's
    # multiply, add and sqrt are correctly rounded on every path
    g = np.sqrt(gx * gx + gy * gy)
    local = cv2.GaussianBlur(g, (0, 0), 6.0)
    return g / (local + 0.5 * float(g.mean()) + 1e-6)


def displacement_px(warp: np.ndarray, height: int, width: int) -> float:
    """Largest displacement ``|warp(p) - p|`` over the four corners and the centre (pixels)."""
    pts = _check_points(height, width)
    return float(np.max(np.linalg.norm(apply_warp(warp, pts) - pts, axis=1)))


def apply_warp(warp: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Map (N, 2) points (x, y) through a (2, 3) warp."""
    w = np.asarray(warp, np.float64)
    return np.asarray(pts, np.float64) @ w[:, :2].T + w[:, 2]


def _check_points(height: int, width: int) -> np.ndarray:
    return np.array(
        [[0, 0], [width - 1, 0], [0, height - 1], [width - 1, height - 1], [(width - 1) / 2, (height - 1) / 2]],
        dtype=np.float64,
    )


def warp_visible(vi: np.ndarray, warp: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resample the visible image onto the IR frame (bilinear, borders replicated).

    Args:
        vi: ``uint8`` (H', W'[, 3]) visible image.
        warp: (2, 3) map from IR coords to visible coords.
        height, width: size of the IR frame.
    """
    return cv2.warpAffine(
        vi,
        np.asarray(warp, np.float32),
        (width, height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )


def to_full_resolution(warp: np.ndarray, scale: float) -> np.ndarray:
    """A warp estimated on images resized by ``scale`` (``cv2.resize`` pixel centres,
    ``x_s = scale (x + 0.5) - 0.5``), expressed on the full-resolution images."""
    if scale == 1.0:
        return np.array(warp, np.float64)
    a, t = np.asarray(warp, np.float64)[:, :2], np.asarray(warp, np.float64)[:, 2]
    c = 0.5 * (scale - 1.0)
    return np.hstack([a, ((a @ np.array([c, c]) + t - c) / scale)[:, None]])


def to_working_resolution(warp: np.ndarray, scale: float) -> np.ndarray:
    """Inverse of :func:`to_full_resolution`."""
    if scale == 1.0:
        return np.array(warp, np.float64)
    a, t = np.asarray(warp, np.float64)[:, :2], np.asarray(warp, np.float64)[:, 2]
    c = 0.5 * (scale - 1.0)
    return np.hstack([a, (scale * t + c - a @ np.array([c, c]))[:, None]])


def _working_images(ir: np.ndarray, vi_y: np.ndarray, max_size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Float32 copies downscaled (area) so that the longest side is at most ``max_size``; and the scale."""
    h, w = ir.shape
    scale = min(1.0, max_size / max(h, w))
    ir_f, vi_f = ir.astype(np.float32), vi_y.astype(np.float32)
    if scale < 1.0:
        size = (max(16, round(w * scale)), max(16, round(h * scale)))
        ir_f = cv2.resize(ir_f, size, interpolation=cv2.INTER_AREA)
        vi_f = cv2.resize(vi_f, size, interpolation=cv2.INTER_AREA)
        scale = size[0] / w
    return ir_f, vi_f, scale


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Zero-mean normalised correlation of two same-size images (the ECC criterion at a warp)."""
    if float(a.std()) == 0.0 or float(b.std()) == 0.0:
        return 0.0
    return float(cv2.matchTemplate(a.astype(np.float32), b.astype(np.float32), cv2.TM_CCOEFF_NORMED)[0, 0])


def ecc_shift(g_ir: list[np.ndarray], g_vi: list[np.ndarray], options: AlignOptions) -> tuple[np.ndarray, float]:
    """Translation-only ECC from identity, coarse to fine over the given gradient pyramids.

    Args:
        g_ir, g_vi: gradient magnitudes, finest level first, each level half the size of the last.
        options: iteration bounds.

    Returns:
        ``(shift, cc)``: (dx, dy) at the finest level and the ECC correlation there.

    Raises:
        cv2.error: ECC did not converge.
    """
    warp = np.eye(2, 3, dtype=np.float32)
    cc = float("nan")
    for level in range(len(g_ir) - 1, -1, -1):
        if level < len(g_ir) - 1:
            warp[:, 2] *= 2.0
        cc, warp = cv2.findTransformECC(g_ir[level], g_vi[level], warp, cv2.MOTION_TRANSLATION, _criteria(options), None, 5)
    return warp[:, 2].astype(np.float64), float(cc)


def _criteria(options: AlignOptions) -> tuple[int, int, float]:
    return (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, options.max_iterations, options.eps)


def _equalised_labels(img: np.ndarray) -> np.ndarray:
    """``_MI_BINS`` intensity labels of equal population (histogram equalisation): the MI then
    uses every bin also on dark night images."""
    eq = cv2.equalizeHist(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    return (eq.astype(np.int32) * _MI_BINS) >> 8


def _mutual_information(joint_counts: np.ndarray) -> float:
    p = joint_counts.reshape(_MI_BINS, _MI_BINS) / float(joint_counts.sum())
    outer = p.sum(1)[:, None] * p.sum(0)[None, :]
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / outer[nz])))


def _mi_at(a_labels: np.ndarray, b_labels: np.ndarray, margin: int, shifts: list[tuple[int, int]]) -> np.ndarray:
    """MI of ``a`` over its window inset by ``margin`` and ``b`` shifted by each ``(dx, dy)``."""
    h, w = a_labels.shape
    a = (a_labels[margin : h - margin, margin : w - margin] * _MI_BINS).ravel()
    out = np.empty(len(shifts))
    for i, (dx, dy) in enumerate(shifts):
        b = b_labels[margin + dy : h - margin + dy, margin + dx : w - margin + dx].ravel()
        out[i] = _mutual_information(np.bincount(a + b, minlength=_MI_BINS * _MI_BINS))
    return out


def mi_shift(ir: np.ndarray, vi_y: np.ndarray, radius_px: float) -> tuple[np.ndarray, bool]:
    """Integer shift (dx, dy) maximising the mutual information of ``ir(x)`` and ``vi(x + shift)``.

    Exhaustive over ``|dx|, |dy| <= radius_px`` on quarter-scale images (4 px steps), then
    refined +-1 step on half-scale and on the given images. Intensities are histogram-equalised
    to 32 labels, so that dark (night) images use every label.

    Args:
        ir, vi_y: float or ``uint8`` (H, W) images of the same size (0-255).
        radius_px: search radius at the given scale.

    Returns:
        ``(shift, on_border)``: the shift, and whether the coarse optimum lies on the search border
        (the true optimum may be outside: not a usable estimate).
    """
    levels = [(np.asarray(ir, np.float32), np.asarray(vi_y, np.float32))]
    for _ in range(_MI_LEVELS - 1):
        size = (max(8, levels[-1][0].shape[1] // 2), max(8, levels[-1][0].shape[0] // 2))
        levels.append(tuple(cv2.resize(im, size, interpolation=cv2.INTER_AREA) for im in levels[-1]))
    factor = 2 ** (_MI_LEVELS - 1)
    coarse_a, coarse_b = levels[-1]
    r = max(1, min(int(np.ceil(radius_px / factor)), min(coarse_a.shape) // 4))
    grid = [(dx, dy) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    values = _mi_at(_equalised_labels(coarse_a), _equalised_labels(coarse_b), r, grid)
    best = grid[int(np.argmax(values))]
    on_border = max(abs(best[0]), abs(best[1])) == r
    for level in range(_MI_LEVELS - 2, -1, -1):
        a, b = levels[level]
        r = 2 * r + 1
        cands = [(2 * best[0] + dx, 2 * best[1] + dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        best = cands[int(np.argmax(_mi_at(_equalised_labels(a), _equalised_labels(b), r, cands)))]
    return np.array(best, np.float64), on_border


def rigid_warp(ir: np.ndarray, vi_y: np.ndarray, check: AlignmentCheck, options: AlignOptions = AlignOptions()) -> np.ndarray:
    """The warp ``correct`` applies to a confident pair: a rigid (rotation + translation) ECC on the
    gradient magnitudes, started from the ECC shift of ``check``.

    Measured on real pairs with known shifts and rotations (README), a rigid fit reproduces the
    correction of a shifted or rotated copy better than the translation alone, also when the pair
    has no rotation. It runs on two pyramid levels; the translation is kept when the fit fails,
    lowers the correlation or rotates by more than ``max_rotation_deg``.

    Args:
        ir, vi_y: the images given to :func:`check_alignment`.
        check: its result, which must be confident.
        options: the same options.

    Returns:
        (2, 3) IR -> visible warp at full resolution.
    """
    if not check.confident or check.ecc_shift is None:
        raise ValueError("rigid_warp needs a confident alignment check")
    ir_w, vi_w, scale = _working_images(ir, vi_y, options.max_size)
    translation = _translation(check.ecc_shift)
    pyr_ir, pyr_vi = [ir_w, cv2.pyrDown(ir_w)], [vi_w, cv2.pyrDown(vi_w)]
    warp_w = to_working_resolution(translation, scale)
    warp_w[:, 2] /= 2.0
    cc = float("nan")
    try:
        for level in (1, 0):
            if level == 0:
                warp_w[:, 2] *= 2.0
            cc, out = cv2.findTransformECC(
                gradient_magnitude(pyr_ir[level]), gradient_magnitude(pyr_vi[level]), warp_w.astype(np.float32),
                cv2.MOTION_EUCLIDEAN, _criteria(options), None, 5,
            )
            warp_w = out.astype(np.float64)
    except cv2.error:
        return translation
    warp = to_full_resolution(warp_w, scale)
    if not (np.all(np.isfinite(warp)) and cc >= check.score and abs(rotation_deg(warp)) <= options.max_rotation_deg):
        return translation
    return warp


def rotation_deg(warp: np.ndarray) -> float:
    """Rotation angle of a rigid (2, 3) warp, degrees."""
    return float(np.degrees(np.arctan2(warp[1, 0], warp[0, 0])))


def check_alignment(ir: np.ndarray, vi_y: np.ndarray, options: AlignOptions = AlignOptions()) -> AlignmentCheck:
    """Estimate the IR -> visible misalignment of a pair and decide whether it is proven.

    Args:
        ir: ``uint8`` (H, W) IR image.
        vi_y: ``uint8`` (H, W) visible luma, same size.
        options: thresholds and iteration bounds (``register`` section).

    Returns:
        The :class:`AlignmentCheck`; never raises for image content.

    Raises:
        ValueError: the two images differ in size.
    """
    if ir.shape != vi_y.shape:
        raise ValueError(f"IR {ir.shape} and visible {vi_y.shape} sizes differ")
    h, w = ir.shape
    ir_w, vi_w, scale = _working_images(ir, vi_y, options.max_size)
    pyr_ir, pyr_vi = [ir_w, cv2.pyrDown(ir_w)], [vi_w, cv2.pyrDown(vi_w)]
    g_ir = [gradient_magnitude(im) for im in pyr_ir]
    g_vi = [gradient_magnitude(im) for im in pyr_vi]
    # findTransformECC smooths both images with a 5x5 Gaussian: score identity the same way
    identity_score = correlation(cv2.GaussianBlur(g_ir[0], (5, 5), 0), cv2.GaussianBlur(g_vi[0], (5, 5), 0))
    mi, mi_on_border = mi_shift(ir_w, vi_w, options.search_px * scale)
    mi_full = tuple(float(v) for v in to_full_resolution(_translation(mi), scale)[:, 2])

    def refused(
        code: str,
        detail: str,
        warp: np.ndarray = IDENTITY,
        shift: tuple[float, float] | None = None,
        score: float = float("nan"),
        dis: float = float("nan"),
    ) -> AlignmentCheck:
        return AlignmentCheck(
            warp=np.array(warp, np.float64), ecc_shift=shift, mi_shift=mi_full, score=score,
            identity_score=identity_score, shift_px=displacement_px(warp, h, w), disagreement_px=dis,
            confident=False, reason=f"{code}: {detail}",
        )

    try:
        shift, cc = ecc_shift(g_ir, g_vi, options)
    except cv2.error as exc:
        return refused("ecc_failed", _short_cv_error(exc))
    if not (np.isfinite(cc) and np.all(np.isfinite(shift))):
        return refused("ecc_failed", "non-finite result")
    t_warp = to_full_resolution(_translation(shift), scale)
    ecc_full = (float(t_warp[0, 2]), float(t_warp[1, 2]))
    dis = float(np.max(np.abs(np.subtract(ecc_full, mi_full))))
    shown = (
        f"ECC ({ecc_full[0]:.2f}, {ecc_full[1]:.2f}) px at correlation {cc:.3f}, "
        f"MI ({mi_full[0]:.1f}, {mi_full[1]:.1f}) px"
    )
    args = {"warp": t_warp, "shift": ecc_full, "score": float(cc), "dis": dis}
    if max(abs(ecc_full[0]), abs(ecc_full[1])) > options.search_px:
        return refused("implausible_shift", f"{shown}; ECC beyond register.search_px {options.search_px:g}", **args)
    if mi_on_border:
        return refused(
            "implausible_shift", f"{shown}; MI optimum on the border of its +-{options.search_px:g} px search", **args
        )
    if cc < options.min_score:
        return refused("low_score", f"{shown}; correlation below register.min_score {options.min_score:g}", **args)
    if dis > options.max_disagreement_px:
        return refused(
            "disagree", f"{shown}; differ by {dis:.2f} px > register.max_disagreement_px {options.max_disagreement_px:g}",
            **args,
        )
    return AlignmentCheck(
        warp=t_warp, ecc_shift=ecc_full, mi_shift=mi_full, score=float(cc), identity_score=identity_score,
        shift_px=displacement_px(t_warp, h, w), disagreement_px=dis, confident=True, reason=f"{CONFIDENT}: {shown}",
    )


def _translation(shift: np.ndarray) -> np.ndarray:
    return np.array([[1.0, 0.0, float(shift[0])], [0.0, 1.0, float(shift[1])]])


def _short_cv_error(exc: Exception) -> str:
    """``cv2.error`` text without OpenCV's source path: ``"(-7:Iterations do not converge) ..."``."""
    import re

    text = " ".join(str(exc).split())
    m = re.search(r"error: (\(.*?\) .*?)(?: in function .*)?$", text)
    return m.group(1) if m else text
