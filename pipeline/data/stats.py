"""Complementary-information statistics of IR/visible patches and images, and the adaptive weights.

Statistics (per modality, on ``uint8`` gray levels 0-255; ``image_statistics`` / ``batch_statistics``):

- ``entropy``: Shannon entropy (bits) of the 256-bin histogram, ``-sum p log2 p``.
- ``std``: population standard deviation (gray levels).
- ``grad_energy``: mean squared Laplacian-of-Gaussian response: Gaussian blur with ``log_sigma``
  (pixels, reflected borders) then the 4-neighbour Laplacian (gray levels^2 / px^4). 0 on a
  constant image.
- ``avg_grad``: average gradient, central differences (one-sided at the borders), mean of
  ``sqrt((Gx^2 + Gy^2) / 2)`` (the EN/SD/AG conventions of ``/work/shared/NOTES.md``).

Adaptive weights (``adaptive_weights``), for a patch or an image, with modality ``m`` in {IR, VIS}:

    s_int(m) = sum_{k in intensity_terms} stat_k(m) / scale_k      (default terms: entropy, std)
    s_det(m) = sum_{k in detail_terms}    stat_k(m) / scale_k      (default term: grad_energy)
    w_int(m) = softmax_m(s_int / T),  w_det(m) = softmax_m(s_det / T)  (each pair sums to 1)

The authors divide the statistics by a fixed constant (3000), which leaves every weight at about
0.5 on real data. Here each ``scale_k`` comes FROM THE DATA: the median, over the training split, of
the absolute IR-VIS difference ``|stat_k(IR) - stat_k(VIS)|`` -- the typical size of the
disagreement that the weights must arbitrate. A typical patch then has a score difference of about
1 per term and, with temperature ``T = 1``, weights around 0.27/0.73; a patch where one modality is
flat gets weights near 0/1. Patches and whole images have separate scales (``normalisation.json``:
``{"patch": {"scales", "count"}, "image": {...}, "temperature", "intensity_terms", "detail_terms",
"log_sigma", "method"}``). A scale below 1e-6 (modalities identical for that statistic) is
replaced by 1 with a warning. The median is computed in a streaming way from a log-spaced histogram
(100 bins per decade, ~1 % precision) summed over the shards: the driver never holds a per-patch
array.

Ablation ``stats.weighting: fixed``: every weight is 0.5 (``w_int`` and ``w_det``, patches and
whole images), so the loss sees constant weights; ``adaptive`` (default) is the above.

The ``stats`` stage that applies them to the patch and image tables is ``pipeline.data.stats_stage``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from pipeline.common.atomic_io import read_json_object
from pipeline.data.contracts import WEIGHTINGS

log = logging.getLogger(__name__)

STAT_NAMES: tuple[str, ...] = ("entropy", "std", "grad_energy", "avg_grad")
MODALITIES: tuple[str, ...] = ("ir", "vi")
#: Edges of the histogram of |IR - VIS| used for the streaming median: [0, 1e-6, ..., 1e8].
DIFF_EDGES = np.concatenate([[0.0], np.logspace(-6, 8, 1401)])
MIN_SCALE = 1e-6

# ----------------------------------------------------------------------------- statistics


def batch_statistics(imgs: np.ndarray, log_sigma: float = 1.0) -> dict[str, np.ndarray]:
    """Statistics of a stack of single-channel images (see the module docstring).

    Args:
        imgs: ``uint8`` (N, H, W), gray levels 0-255.
        log_sigma: Gaussian sigma of the LoG (pixels).

    Returns:
        ``{name: float64 (N,)}`` for ``STAT_NAMES``.
    """
    imgs = np.asarray(imgs)
    if imgs.dtype != np.uint8 or imgs.ndim != 3:
        raise ValueError(f"expected uint8 (N, H, W) images, got {imgs.dtype} {imgs.shape}")
    n, h, w = imgs.shape
    if n == 0:
        return {name: np.zeros(0) for name in STAT_NAMES}
    if h < 2 or w < 2:
        raise ValueError(f"images must be at least 2x2 pixels, got {h}x{w}")
    counts = np.bincount(
        (np.arange(n, dtype=np.int64)[:, None] * 256 + imgs.reshape(n, -1)).ravel(), minlength=n * 256
    ).reshape(n, 256)
    p = counts / float(h * w)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log2(p), 0.0).sum(axis=1)
    f = imgs.astype(np.float32)
    std = f.reshape(n, -1).astype(np.float64).std(axis=1)
    energy = np.empty(n)
    for i in range(n):
        blurred = cv2.GaussianBlur(f[i], (0, 0), log_sigma, borderType=cv2.BORDER_REFLECT_101)
        lap = cv2.Laplacian(blurred, cv2.CV_32F, ksize=1, borderType=cv2.BORDER_REFLECT_101)
        energy[i] = np.mean(np.square(lap, dtype=np.float64))
    gy, gx = np.gradient(f, axis=(1, 2))
    avg_grad = np.sqrt((gx * gx + gy * gy) / 2.0).reshape(n, -1).mean(axis=1, dtype=np.float64)
    return {"entropy": entropy + 0.0, "std": std, "grad_energy": energy, "avg_grad": avg_grad}


def image_statistics(img_u8: np.ndarray, log_sigma: float = 1.0) -> dict[str, float]:
    """Statistics of one single-channel image.

    Args:
        img_u8: ``uint8`` (H, W) (IR, or the visible luma / gray image).
        log_sigma: Gaussian sigma of the LoG (pixels).

    Returns:
        ``{"entropy": bits, "std": gray levels, "grad_energy": gray levels^2/px^4,
        "avg_grad": gray levels/px}``.
    """
    img = np.asarray(img_u8)
    if img.ndim != 2:
        raise ValueError(f"expected a single-channel (H, W) image, got shape {img.shape}")
    return {k: float(v[0]) for k, v in batch_statistics(img[None], log_sigma).items()}

# ----------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class Normalisation:
    """Data-derived scales and the temperature of the adaptive weights.

    Attributes:
        scales: statistic name -> scale (> 0), in the statistic's unit.
        temperature: softmax temperature (> 0); larger -> weights closer to 0.5.
        intensity_terms: statistics summed into the intensity score.
        detail_terms: statistics summed into the detail score.
        weighting: ``adaptive`` or ``fixed`` (every weight 0.5; the ablation).
    """

    scales: Mapping[str, float]
    temperature: float = 1.0
    intensity_terms: tuple[str, ...] = ("entropy", "std")
    detail_terms: tuple[str, ...] = ("grad_energy",)
    weighting: str = "adaptive"

    @classmethod
    def load(cls, path: str | Path, level: str = "patch") -> "Normalisation":
        """Read ``normalisation.json`` written by the stats step (``level``: "patch" or "image")."""
        data = read_json_object(path, "normalisation file", hint="run the stats stage")
        if level not in data:
            raise ValueError(f"{path}: no '{level}' entry (expected 'patch' or 'image')")
        return cls(
            scales=dict(data[level]["scales"]),
            temperature=float(data["temperature"]),
            intensity_terms=tuple(data["intensity_terms"]),
            detail_terms=tuple(data["detail_terms"]),
            weighting=str(data.get("weighting", "adaptive")),
        )


def _softmax2(a: Any, b: Any) -> tuple[Any, Any]:
    """Softmax over two scores, stable for any magnitude: ``(e^a, e^b) / (e^a + e^b)``."""
    half = np.tanh((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) / 2.0) / 2.0
    return 0.5 + half, 0.5 - half


def adaptive_weights(
    stats_ir: Mapping[str, Any], stats_vi: Mapping[str, Any], norm: Normalisation, temperature: float | None = None
) -> dict[str, Any]:
    """Intensity and detail weight pairs from the statistics of the two modalities.

    Args:
        stats_ir, stats_vi: statistic name -> value (float, or arrays of the same shape for a
            batch), as from ``image_statistics`` / ``batch_statistics``.
        norm: scales and terms (``Normalisation.load("data/stats/normalisation.json", level)``).
        temperature: overrides ``norm.temperature``.

    Returns:
        ``{"int_ir", "int_vi", "det_ir", "det_vi"}`` in (0, 1), ``int_ir + int_vi == 1`` and
        ``det_ir + det_vi == 1`` (floats for float input, float64 arrays for arrays). With
        ``norm.weighting == "fixed"`` every weight is exactly 0.5.
    """
    if norm.weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {norm.weighting!r}")
    t = norm.temperature if temperature is None else temperature
    if not t > 0:
        raise ValueError(f"temperature must be > 0, got {t}")

    def score(stats: Mapping[str, Any], terms: Sequence[str]) -> Any:
        missing = [k for k in terms if k not in stats or k not in norm.scales]
        if missing:
            raise ValueError(f"statistics or scales missing for {missing}")
        return sum(np.asarray(stats[k], dtype=np.float64) / norm.scales[k] for k in terms)

    out: dict[str, Any] = {}
    for kind, terms in (("int", norm.intensity_terms), ("det", norm.detail_terms)):
        w_ir, w_vi = _softmax2(score(stats_ir, terms) / t, score(stats_vi, terms) / t)
        if norm.weighting == "fixed":
            w_ir, w_vi = np.full(np.shape(w_ir), 0.5), np.full(np.shape(w_vi), 0.5)
        if np.ndim(w_ir) == 0:
            w_ir, w_vi = float(w_ir), float(w_vi)
        out[f"{kind}_ir"], out[f"{kind}_vi"] = w_ir, w_vi
    return out


def diff_histograms(stats_ir: Mapping[str, np.ndarray], stats_vi: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Histograms (``DIFF_EDGES``) of ``|IR - VIS|`` per statistic: ``{name: int64 (bins,)}``."""
    out = {}
    for name in names:
        diff = np.abs(np.asarray(stats_ir[name], np.float64) - np.asarray(stats_vi[name], np.float64))
        idx = np.clip(np.searchsorted(DIFF_EDGES, diff, side="right") - 1, 0, len(DIFF_EDGES) - 2)
        out[name] = np.bincount(idx, minlength=len(DIFF_EDGES) - 1).astype(np.int64)
    return out


def histogram_quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """Quantile ``q`` in [0, 1] of values binned with ``edges`` (linear inside a bin)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return float("nan")
    cum = np.cumsum(counts)
    target = q * total
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, len(counts) - 1)
    before = cum[i - 1] if i > 0 else 0.0
    frac = (target - before) / counts[i] if counts[i] > 0 else 0.0
    return float(edges[i] + frac * (edges[i + 1] - edges[i]))


def scales_from_histograms(hists: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Robust scale per statistic = median of ``|IR - VIS|``; below ``MIN_SCALE`` -> 1 (warned)."""
    scales = {}
    for name, counts in hists.items():
        value = histogram_quantile(counts, DIFF_EDGES, 0.5)
        if not value >= MIN_SCALE:
            log.warning("stats: IR and visible agree on '%s' almost everywhere; its scale is set to 1", name)
            value = 1.0
        scales[name] = value
    return scales
