"""The eleven standard no-reference fusion metrics, with the conventions of CDDFuse's evaluator.

Most recent infrared/visible fusion papers report EN, SD, SF, AG, MI, SCD, VIF, Qabf, SSIM, CC and
PSNR computed by the evaluator shipped with CDDFuse (Zhao et al., CVPR 2023). The formulas below
follow those conventions exactly, so that our figures are comparable with published tables
(checked in ``tests/evaluate/test_metrics.py``: CDDFuse's SDNet row on the 25 TNO test pairs is reproduced
within 0.02).

Conventions common to every metric:

- Images are gray ``(H, W)`` arrays of floats in [0, 255] (any real dtype; computed in float64).
  Files are read with :func:`pipeline.data.images.read_gray` (OpenCV BGR->gray, rounded), as the
  evaluator reads them.
- ``A`` is the infrared source, ``B`` the visible source, ``F`` the fused image; every metric is a
  plain function ``metric(A, B, F) -> float`` (the single-image ones ignore ``A`` and ``B``).
- Higher is better for all eleven.

Formulas (``mean``/``sum`` over all pixels unless said otherwise; ``corr`` is Pearson's r):

=====  ===========================================================================  ==============
name   formula and convention                                                       unit / range
=====  ===========================================================================  ==============
EN     ``-sum_k p_k log2 p_k`` over the 256-bin histogram of ``round(F)``           bits, [0, 8]
SD     population standard deviation of ``F``                                       gray levels
SF     ``sqrt(mean(dx^2) + mean(dy^2))``, ``dx``/``dy`` neighbour differences       gray levels
       (each mean over its own (H, W-1) / (H-1, W) array)
AG     ``mean(sqrt((Gx^2 + Gy^2) / 2))``, central differences, one-sided at the     gray levels
       borders (``numpy.gradient``)
MI     ``MI(F, A) + MI(F, B)``; pixel values used as discrete labels (joint         nats, >= 0
       histogram of the value pairs, as ``sklearn.metrics.mutual_info_score``)
SCD    ``corr(A, F - B) + corr(B, F - A)`` (sum of correlations of differences)     [-2, 2]
VIF    ``VIF(A, F) + VIF(B, F)``, Sheikh-Bovik pixel-domain VIF: 4 scales,          [0, ~2]
       Gaussian window ``N = 2^(5-s) + 1``, sigma ``N/5`` (MATLAB
       ``fspecial``-style), 'valid' filtering, 2x subsampling between scales,
       noise variance 2, numerator and denominator summed over the scales
Qabf   Xydeas-Petrovic edge preservation, 3x3 Sobel, zero-padded 'same'             [0, ~0.975]
       borders, orientation ``arctan(Sy/Sx)`` (pi/2 where ``Sx = 0``),
       Tg 0.9994, kg -15, Dg 0.5, Ta 0.9879, ka -22, Da 0.8, weighted by
       the source gradient magnitudes (see :func:`qabf` for their quirk)
SSIM   ``SSIM(F, A) + SSIM(F, B)``, scikit-image style: 7x7 uniform window,         [-2, 2]
       sample covariance, K1 0.01, K2 0.03, ``data_range = 2`` on the 0-255
       floats (what scikit-image 0.19 used for float input), mean of the map
       without its 3-pixel border
CC     ``(corr(A, F) + corr(B, F)) / 2``                                            [-1, 1]
PSNR   ``10 log10(max(F)^2 / MSE)``, ``MSE = (mse(A, F) + mse(B, F)) / 2``          dB
=====  ===========================================================================  ==============

Note that the "summed" metrics (MI, VIF, SSIM, SCD) are sums over the two sources, as published:
an SSIM of 1.00 means an average of 0.5 per source, and ``VIF(F=A=B)`` is 2.

Degenerate inputs follow the reference code where it defines a value (VIF is 1.0 when its
denominator vanishes, i.e. a constant source) and give ``nan`` where it divides by zero (CC/SCD
of a constant image, PSNR of identical images is ``inf``).

:func:`evaluate_folder` scores a folder of fused images against their sources, through Ray Data
when asked.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import cv2
import numpy as np

log = logging.getLogger(__name__)

#: The metric columns, in the order used by every table, CSV and JSON of the project.
METRICS: tuple[str, ...] = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM", "CC", "PSNR")
#: The 8 metrics of the published tables (CDDFuse's order; all: higher is better).
HEADLINE: tuple[str, ...] = ("EN", "SD", "SF", "MI", "SCD", "VIF", "Qabf", "SSIM")

# Qabf constants (Xydeas & Petrovic, 2000; values of the reference evaluator).
_QABF_TG, _QABF_KG, _QABF_DG = 0.9994, -15.0, 0.5
_QABF_TA, _QABF_KA, _QABF_DA = 0.9879, -22.0, 0.8
# VIF constants (Sheikh & Bovik, 2006; values of the reference evaluator).
_VIF_SIGMA_NSQ = 2.0
_VIF_EPS = 1e-10
# SSIM constants (scikit-image defaults, with the data range the published numbers used).
_SSIM_WIN, _SSIM_K1, _SSIM_K2, _SSIM_DATA_RANGE = 7, 0.01, 0.03, 2.0


# --------------------------------------------------------------------------------------------
# helpers


def _as_float(img: np.ndarray, name: str = "image") -> np.ndarray:
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a gray (H, W) image, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name}: empty image")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{name}: expected a numeric image, got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def _check_triplet(A: np.ndarray, B: np.ndarray, F: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a, b, f = _as_float(A, "A (IR)"), _as_float(B, "B (visible)"), _as_float(F, "F (fused)")
    if not (a.shape == b.shape == f.shape):
        raise ValueError(f"image sizes differ: A (IR) {a.shape}, B (visible) {b.shape}, F (fused) {f.shape}")
    return a, b, f


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two arrays (``nan`` if one is constant)."""
    xc = x - x.mean()
    yc = y - y.mean()
    den = math.sqrt(float(np.sum(xc * xc)) * float(np.sum(yc * yc)))
    return float(np.sum(xc * yc)) / den if den > 0 else float("nan")


def _labels(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Discrete labels of the pixel values: ``(labels (N,) int64, number of labels)``."""
    flat = x.ravel()
    if flat.min() >= 0 and flat.max() <= 255 and np.array_equal(flat, np.round(flat)):
        return flat.astype(np.int64), 256  # integer gray levels: the value is the label
    uniq, inv = np.unique(flat, return_inverse=True)
    return inv.ravel().astype(np.int64), int(uniq.size)


def _filter_valid(img: np.ndarray, k1d: np.ndarray) -> np.ndarray:
    """Correlate with the separable kernel ``outer(k1d, k1d)`` and keep the 'valid' part.

    Same as ``scipy.signal.convolve2d(img, rot90(outer(k1d, k1d), 2), mode='valid')``:
    output ``(H - n + 1, W - n + 1)`` for an odd kernel length ``n``.
    """
    n = k1d.size
    r = n // 2
    out = cv2.sepFilter2D(img, cv2.CV_64F, k1d, k1d, borderType=cv2.BORDER_REFLECT)
    return out[r : img.shape[0] - r, r : img.shape[1] - r]


def _box_valid(img: np.ndarray, size: int) -> np.ndarray:
    """Mean over a ``size`` x ``size`` window, 'valid' part only (odd ``size``)."""
    r = size // 2
    out = cv2.boxFilter(img, cv2.CV_64F, (size, size), normalize=True, borderType=cv2.BORDER_REFLECT)
    return out[r : img.shape[0] - r, r : img.shape[1] - r]


def gaussian_window_1d(n: int) -> np.ndarray:
    """1-D factor of MATLAB's ``fspecial('gaussian', n, n / 5)`` (normalised to sum 1).

    The 2-D window is ``outer(w, w)``; MATLAB also zeroes values below ``eps * max``, which never
    happens for the four VIF windows (their smallest value is about 4e-3 of the maximum).

    Args:
        n: odd window size.

    Returns:
        ``(n,)`` float64 summing to 1.
    """
    sigma = n / 5.0
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    w = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return w / w.sum()


# --------------------------------------------------------------------------------------------
# single-image metrics


def en(A: np.ndarray | None, B: np.ndarray | None, F: np.ndarray) -> float:
    """Entropy of the fused image, in bits.

    Args:
        A, B: unused (uniform signature).
        F: (H, W) float, 0-255; rounded to 256 gray levels (values outside 0-255 clipped).

    Returns:
        ``-sum p log2 p`` of the 256-bin histogram, in [0, 8] bits.
    """
    f = _as_float(F, "F (fused)")
    levels = np.clip(np.round(f), 0, 255).astype(np.int64).ravel()
    p = np.bincount(levels, minlength=256) / levels.size
    p = p[p > 0]
    return float(-np.sum(p * np.log2(p))) + 0.0


def sd(A: np.ndarray | None, B: np.ndarray | None, F: np.ndarray) -> float:
    """Population standard deviation of ``F`` (H, W, 0-255), in gray levels."""
    return float(np.std(_as_float(F, "F (fused)")))


def sf(A: np.ndarray | None, B: np.ndarray | None, F: np.ndarray) -> float:
    """Spatial frequency ``sqrt(mean(dx^2) + mean(dy^2))`` of ``F``, in gray levels.

    ``dx = F[:, 1:] - F[:, :-1]`` and ``dy = F[1:, :] - F[:-1, :]``, each averaged over its own
    size (an image 1 pixel wide or high contributes 0 for that direction).
    """
    f = _as_float(F, "F (fused)")
    dx = np.diff(f, axis=1)
    dy = np.diff(f, axis=0)
    mx = float(np.mean(dx * dx)) if dx.size else 0.0
    my = float(np.mean(dy * dy)) if dy.size else 0.0
    return math.sqrt(mx + my)


def ag(A: np.ndarray | None, B: np.ndarray | None, F: np.ndarray) -> float:
    """Average gradient ``mean(sqrt((Gx^2 + Gy^2) / 2))`` of ``F``, in gray levels per pixel.

    ``Gx``, ``Gy``: central differences ``(f[i+1] - f[i-1]) / 2`` inside, one-sided differences at
    the borders (``numpy.gradient``). ``F`` must be at least 2x2.
    """
    f = _as_float(F, "F (fused)")
    if min(f.shape) < 2:
        raise ValueError(f"F (fused): AG needs an image of at least 2x2 pixels, got {f.shape}")
    gy, gx = np.gradient(f)
    return float(np.mean(np.sqrt((gx * gx + gy * gy) / 2.0)))


# --------------------------------------------------------------------------------------------
# metrics against the sources


def mutual_information(X: np.ndarray, Y: np.ndarray) -> float:
    """Mutual information of two images, in nats, pixel values as discrete labels.

    Equals ``sklearn.metrics.mutual_info_score(X.ravel(), Y.ravel())``: ``sum p_xy log(p_xy /
    (p_x p_y))`` over the joint histogram of the value pairs (one bin per distinct value), clipped
    at 0. ``mutual_information(X, X)`` is the entropy of ``X`` in nats.

    Args:
        X, Y: (H, W) arrays of the same shape (gray levels 0-255 take a fast 256x256 path).

    Returns:
        MI in nats (>= 0).
    """
    x, y = _as_float(X, "X"), _as_float(Y, "Y")
    if x.shape != y.shape:
        raise ValueError(f"image sizes differ: {x.shape} and {y.shape}")
    lx, nx = _labels(x)
    ly, ny = _labels(y)
    joint = np.bincount(lx * ny + ly, minlength=nx * ny).reshape(nx, ny)
    total = float(lx.size)
    px = joint.sum(axis=1) / total
    py = joint.sum(axis=0) / total
    ix, iy = np.nonzero(joint)
    pxy = joint[ix, iy] / total
    mi = float(np.sum(pxy * (np.log(pxy) - np.log(px[ix]) - np.log(py[iy]))))
    return max(mi, 0.0)


def mi(A: np.ndarray, B: np.ndarray, F: np.ndarray) -> float:
    """``MI(F, A) + MI(F, B)`` in nats (see :func:`mutual_information`)."""
    a, b, f = _check_triplet(A, B, F)
    return mutual_information(f, a) + mutual_information(f, b)


def scd(A: np.ndarray, B: np.ndarray, F: np.ndarray) -> float:
    """Sum of the correlations of differences ``corr(A, F - B) + corr(B, F - A)``, in [-2, 2]."""
    a, b, f = _check_triplet(A, B, F)
    return _corr(a, f - b) + _corr(b, f - a)


def vif_single(ref: np.ndarray, dist: np.ndarray) -> float:
    """Pixel-domain visual information fidelity of ``dist`` with respect to ``ref`` (Sheikh-Bovik).

    Four scales ``s = 1..4``: window size ``N = 2^(5-s) + 1`` (17, 9, 5, 3), Gaussian with sigma
    ``N / 5`` (:func:`gaussian_window_1d`); from scale 2 on, both images are low-passed with that
    scale's window ('valid') and subsampled by 2. Local statistics use 'valid' filtering; noise
    variance ``sigma_n^2 = 2``; ``eps = 1e-10`` guards as in the reference code. Returns
    ``sum_s sum log10(1 + g^2 s1 / (sv + sigma_n^2)) / sum_s sum log10(1 + s1 / sigma_n^2)``,
    or 1.0 when that is undefined (constant ``ref``: 0/0), as the reference code does.
    ``vif_single(x, x)`` is 1 (up to ~1e-10).

    Args:
        ref, dist: (H, W) float, 0-255, same shape; at least 33x33 pixels (for the 4 scales).

    Returns:
        VIF, >= 0 (about 1 for identical images; can exceed 1 for contrast-enhanced ``dist``).
    """
    x, y = _as_float(ref, "ref"), _as_float(dist, "dist")
    if x.shape != y.shape:
        raise ValueError(f"image sizes differ: {x.shape} and {y.shape}")
    if min(x.shape) < 33:
        raise ValueError(f"VIF needs images of at least 33x33 pixels, got {x.shape}")
    eps = _VIF_EPS
    num = 0.0
    den = 0.0
    for scale in range(1, 5):
        win = gaussian_window_1d(2 ** (5 - scale) + 1)
        if scale > 1:
            x = _filter_valid(x, win)[::2, ::2]
            y = _filter_valid(y, win)[::2, ::2]
        mu1 = _filter_valid(x, win)
        mu2 = _filter_valid(y, win)
        s1 = _filter_valid(x * x, win) - mu1 * mu1
        s2 = _filter_valid(y * y, win) - mu2 * mu2
        s12 = _filter_valid(x * y, win) - mu1 * mu2
        np.maximum(s1, 0.0, out=s1)
        np.maximum(s2, 0.0, out=s2)

        g = s12 / (s1 + eps)
        sv = s2 - g * s12
        low1 = s1 < eps
        g[low1] = 0.0
        sv[low1] = s2[low1]
        s1[low1] = 0.0
        low2 = s2 < eps
        g[low2] = 0.0
        sv[low2] = 0.0
        neg = g < 0
        sv[neg] = s2[neg]
        g[neg] = 0.0
        sv[sv <= eps] = eps

        num += float(np.sum(np.log10(1.0 + g * g * s1 / (sv + _VIF_SIGMA_NSQ))))
        den += float(np.sum(np.log10(1.0 + s1 / _VIF_SIGMA_NSQ)))
    if den == 0.0:
        return 1.0
    return num / den


def vif(A: np.ndarray, B: np.ndarray, F: np.ndarray) -> float:
    """``VIF(A, F) + VIF(B, F)`` (see :func:`vif_single`); 2 for ``F = A = B``."""
    a, b, f = _check_triplet(A, B, F)
    return vif_single(a, f) + vif_single(b, f)


def sobel_gradients(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradient magnitude and orientation of Qabf.

    ``Sx``/``Sy``: 2-D convolution with the 3x3 Sobel kernels ``[[-1,0,1],[-2,0,2],[-1,0,1]]`` and
    ``[[1,2,1],[0,0,0],[-1,-2,-1]]`` with zero padding, output the size of the input
    (``scipy.signal.convolve2d(img, k, mode='same')``).

    Args:
        img: (H, W) float, 0-255.

    Returns:
        ``(g, alpha)``: ``g = sqrt(Sx^2 + Sy^2)``; ``alpha = arctan(Sy / Sx)`` in (-pi/2, pi/2],
        ``pi/2`` where ``Sx == 0``. Both (H, W) float64.
    """
    x = _as_float(img)
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
    ky = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=np.float64)
    # filter2D correlates: flip the kernels to convolve.
    sx = cv2.filter2D(x, cv2.CV_64F, kx[::-1, ::-1].copy(), borderType=cv2.BORDER_CONSTANT)
    sy = cv2.filter2D(x, cv2.CV_64F, ky[::-1, ::-1].copy(), borderType=cv2.BORDER_CONSTANT)
    g = np.sqrt(sx * sx + sy * sy)
    zero = sx == 0
    alpha = np.arctan(sy / np.where(zero, 1.0, sx))
    alpha[zero] = math.pi / 2
    return g, alpha


def _edge_preservation(g_s: np.ndarray, a_s: np.ndarray, g_f: np.ndarray, a_f: np.ndarray) -> np.ndarray:
    """Per-pixel edge preservation ``Q^{SF}`` of the fused image with respect to one source."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(g_s > g_f, g_f / g_s, g_s / g_f)
    ratio = np.where(g_s == g_f, g_f, ratio)  # the reference evaluator's quirk (see qabf)
    orient = 1.0 - np.abs(a_s - a_f) / (math.pi / 2)
    q_g = _QABF_TG / (1.0 + np.exp(_QABF_KG * (ratio - _QABF_DG)))
    q_a = _QABF_TA / (1.0 + np.exp(_QABF_KA * (orient - _QABF_DA)))
    return q_g * q_a


def qabf(A: np.ndarray, B: np.ndarray, F: np.ndarray) -> float:
    """Xydeas-Petrovic gradient-based fusion quality Q^{AB/F}.

    ``Q = sum(Q^{AF} gA + Q^{BF} gB) / sum(gA + gB)`` with, per pixel and source S,
    ``Q^{SF} = Tg / (1 + exp(kg (G - Dg))) * Ta / (1 + exp(ka (Aor - Da)))``,
    ``G = min(gS, gF) / max(gS, gF)`` (strength ratio), ``Aor = 1 - |aS - aF| / (pi/2)``
    (orientation agreement), gradients from :func:`sobel_gradients`, constants Tg 0.9994,
    kg -15, Dg 0.5, Ta 0.9879, ka -22, Da 0.8.

    Quirk kept from the reference evaluator: where ``gS == gF`` exactly, ``G`` is set to ``gF``
    instead of 1. For 0-255 images with integer values a non-zero Sobel magnitude is >= 1, where
    the sigmoid is saturated, so the quirk changes little; it makes a real difference only for
    magnitudes below ~0.8 (images scaled to [0, 1], for instance: ``qabf(x, x, x)`` then drops
    towards 0). Consequence: ``qabf(S, S, S)`` of a 0-255 image is not 1 but
    ``Ta / (1 + exp(-0.2 ka))`` times a mean of ``Tg / (1 + exp(kg (g - Dg)))`` weighted by ``g``,
    i.e. between 0.97481 (all edge magnitudes 1) and 0.97536 (the limit for strong edges).
    ``nan`` when both sources are constant (no gradient at all).

    Args:
        A, B, F: (H, W) float, 0-255, same shape.

    Returns:
        Qabf in [0, ~0.975].
    """
    a, b, f = _check_triplet(A, B, F)
    g_a, al_a = sobel_gradients(a)
    g_b, al_b = sobel_gradients(b)
    g_f, al_f = sobel_gradients(f)
    q_af = _edge_preservation(g_a, al_a, g_f, al_f)
    q_bf = _edge_preservation(g_b, al_b, g_f, al_f)
    den = float(np.sum(g_a + g_b))
    if den == 0.0:
        return float("nan")
    return float(np.sum(q_af * g_a + q_bf * g_b)) / den


def ssim_single(X: np.ndarray, Y: np.ndarray, data_range: float = _SSIM_DATA_RANGE) -> float:
    """Mean SSIM of two images, as ``skimage.metrics.structural_similarity`` with defaults.

    7x7 uniform window, sample covariance (``49 / 48``), ``C1 = (0.01 R)^2``, ``C2 = (0.03 R)^2``,
    ``SSIM = (2 mx my + C1)(2 vxy + C2) / ((mx^2 + my^2 + C1)(vx + vy + C2))`` averaged over the
    map without its 3-pixel border. The project convention is ``R = data_range = 2`` on 0-255
    images (the value behind the published numbers); with such small constants the score of
    flat regions is driven by noise, which is part of the convention.

    Args:
        X, Y: (H, W) float, 0-255, same shape, at least 7x7.
        data_range: ``R`` above.

    Returns:
        Mean SSIM in [-1, 1] (1 for identical images).
    """
    x, y = _as_float(X, "X"), _as_float(Y, "Y")
    if x.shape != y.shape:
        raise ValueError(f"image sizes differ: {x.shape} and {y.shape}")
    if min(x.shape) < _SSIM_WIN:
        raise ValueError(f"SSIM needs images of at least {_SSIM_WIN}x{_SSIM_WIN} pixels, got {x.shape}")
    n = _SSIM_WIN * _SSIM_WIN
    cov_norm = n / (n - 1.0)
    ux = _box_valid(x, _SSIM_WIN)
    uy = _box_valid(y, _SSIM_WIN)
    vx = cov_norm * (_box_valid(x * x, _SSIM_WIN) - ux * ux)
    vy = cov_norm * (_box_valid(y * y, _SSIM_WIN) - uy * uy)
    vxy = cov_norm * (_box_valid(x * y, _SSIM_WIN) - ux * uy)
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return float(np.mean(s))


def ssim(A: np.ndarray, B: np.ndarray, F: np.ndarray) -> float:
    """``SSIM(F, A) + SSIM(F, B)`` with ``data_range = 2`` (see :func:`ssim_single`); 2 for F = A = B."""
    a, b, f = _check_triplet(A, B, F)
    return ssim_single(f, a) + ssim_single(f, b)


def cc(A: np.ndarray, B: np.ndarray, F: np.ndarray) -> float:
    """Mean correlation coefficient ``(corr(A, F) + corr(B, F)) / 2``, in [-1, 1]."""
    a, b, f = _check_triplet(A, B, F)
    return (_corr(a, f) + _corr(b, f)) / 2.0


def psnr(A: np.ndarray, B: np.ndarray, F: np.ndarray) -> float:
    """``10 log10(max(F)^2 / MSE)`` in dB, ``MSE = (mean((A-F)^2) + mean((B-F)^2)) / 2``.

    The peak is the fused image's maximum (reference convention), not 255. ``inf`` when
    ``F = A = B``.
    """
    a, b, f = _check_triplet(A, B, F)
    mse = (float(np.mean((a - f) ** 2)) + float(np.mean((b - f) ** 2))) / 2.0
    peak = float(np.max(f)) ** 2
    if mse == 0.0:
        return float("inf")
    if peak == 0.0:
        return float("-inf")
    return 10.0 * math.log10(peak / mse)


#: Metric name -> function ``(A, B, F) -> float``, in the order of :data:`METRICS`.
METRIC_FUNCTIONS: dict[str, Callable[[Any, Any, np.ndarray], float]] = {
    "EN": en,
    "SD": sd,
    "SF": sf,
    "AG": ag,
    "MI": mi,
    "SCD": scd,
    "VIF": vif,
    "Qabf": qabf,
    "SSIM": ssim,
    "CC": cc,
    "PSNR": psnr,
}


def compute_all(ir: np.ndarray, vi: np.ndarray, fused: np.ndarray) -> dict[str, float]:
    """All eleven metrics of one fused image.

    Args:
        ir: A, (H, W) float or uint8, 0-255.
        vi: B, (H, W) gray (luma of a colour image: read it with ``read_gray``), 0-255.
        fused: F, (H, W), 0-255.

    Returns:
        ``{name: value}`` in the order of :data:`METRICS`.

    Raises:
        ValueError: not 2-D, sizes differ, or smaller than 33x33 (VIF).
    """
    a, b, f = _check_triplet(ir, vi, fused)
    return {name: METRIC_FUNCTIONS[name](a, b, f) for name in METRICS}


#: Diagnostics beside the published metrics (not in their tables): the brightness a fused image
#: keeps where one input is much brighter than the other (:func:`brightness_gaps`).
DIAGNOSTICS: tuple[str, ...] = ("VIgap", "IRgap")
#: Gray levels by which one input must exceed the other for a pixel to count in a gap.
BRIGHT_MARGIN = 60.0


def brightness_gaps(ir: np.ndarray, vi: np.ndarray, fused: np.ndarray, margin: float = BRIGHT_MARGIN) -> dict[str, float]:
    """Mean of ``F - max(A, B)`` over the pixels where the visible image is at least ``margin``
    levels brighter than IR (``VIgap``: sky, snow, sunlit ground in day scenes) and, mirrored, where
    IR is (``IRgap``: warm targets). 0 keeps the brighter input; -79 is a darkened day scene.
    ``nan`` where no pixel qualifies (averages over pairs skip it).
    """
    a, b, f = (np.asarray(x, dtype=np.float64) for x in (ir, vi, fused))
    top = np.maximum(a, b)
    out = {}
    for name, mask in (("VIgap", b >= a + margin), ("IRgap", a >= b + margin)):
        out[name] = float((f - top)[mask].mean()) if mask.any() else float("nan")
    return out

