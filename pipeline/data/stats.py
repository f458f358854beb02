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

The ``stats`` step (``compute_stats``) runs two passes of Ray Data over the patches: pass 1 adds
the statistics (staged as Parquet), whose ``|IR - VIS|`` histograms are then accumulated into the
scales (each task returns its shard's histograms, summed in the driver); pass 2 maps the weights.
Each Ray task reads one shard and writes its output shard itself (same file name), so outputs are
deterministic whatever the cluster. Whole images are one
more Ray Data map over the pairs. It writes

- ``<out>/patches/part-NNNNN.parquet``: the patch columns (``pipeline.data.crop.PATCH_SCHEMA``) +
  ``{ir,vi}_{entropy,std,grad_energy,avg_grad}`` (float64) + ``w_int_ir, w_int_vi, w_det_ir,
  w_det_vi`` + the weights of the patch's whole image ``img_w_int_ir, img_w_int_vi, img_w_det_ir,
  img_w_det_vi``;
- ``<out>/images.parquet``: one row per pair (``pair_id, split, height, width``, statistics,
  weights ``w_*``);
- ``<out>/normalisation.json``; the DVC metrics file (mean, std, p5, p50, p95 of ``w_int_ir`` and
  ``w_det_ir``, patch- and image-level) and the histogram plot CSV (bin centre vs count).
"""

from __future__ import annotations

import csv
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.common.config import ParamsError, param

log = logging.getLogger(__name__)

STAT_NAMES: tuple[str, ...] = ("entropy", "std", "grad_energy", "avg_grad")
MODALITIES: tuple[str, ...] = ("ir", "vi")
#: The adaptive weights, one pair per kind (each pair sums to 1): the keys of every weights dict
#: (``pipeline.train.losses``, ``pipeline.train.data``) and, prefixed ``w_``/``img_w_``, the stats columns.
WEIGHT_NAMES: tuple[str, ...] = ("int_ir", "int_vi", "det_ir", "det_vi")
#: Edges of the histogram of |IR - VIS| used for the streaming median: [0, 1e-6, ..., 1e8].
DIFF_EDGES = np.concatenate([[0.0], np.logspace(-6, 8, 1401)])
#: Edges of the fine weight histogram used for the percentiles of the metrics.
WEIGHT_EDGES = np.linspace(0.0, 1.0, 1001)
PLOT_BINS = 50
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
    """

    scales: Mapping[str, float]
    temperature: float = 1.0
    intensity_terms: tuple[str, ...] = ("entropy", "std")
    detail_terms: tuple[str, ...] = ("grad_energy",)

    @classmethod
    def load(cls, path: str | Path, level: str = "patch") -> "Normalisation":
        """Read ``normalisation.json`` written by the stats step (``level``: "patch" or "image")."""
        import json

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"normalisation file not found: {path}")
        data = json.loads(path.read_text())
        if level not in data:
            raise ValueError(f"{path}: no '{level}' entry (expected 'patch' or 'image')")
        return cls(
            scales=dict(data[level]["scales"]),
            temperature=float(data["temperature"]),
            intensity_terms=tuple(data["intensity_terms"]),
            detail_terms=tuple(data["detail_terms"]),
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
        ``det_ir + det_vi == 1`` (floats for float input, float64 arrays for arrays).
    """
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


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class StatsConfig:
    """The ``stats`` section of ``params.yaml``.

    Attributes:
        log_sigma: Gaussian sigma of the LoG in pixels.
        temperature: softmax temperature of the weights.
        intensity_terms, detail_terms: statistics summed into each score (see module docstring).
        scale_split: split whose data sets the scales (``train``: no test data leaks in).
    """

    log_sigma: float = 1.0
    temperature: float = 1.0
    intensity_terms: tuple[str, ...] = ("entropy", "std")
    detail_terms: tuple[str, ...] = ("grad_energy",)
    scale_split: str = "train"
    terms: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "terms", tuple(dict.fromkeys(self.intensity_terms + self.detail_terms)))

    @classmethod
    def from_params(cls, cfg: Mapping[str, Any]) -> "StatsConfig":
        """Read and validate the ``stats`` section; raises ``ParamsError`` naming the key."""

        def terms(key: str, default: list[str]) -> tuple[str, ...]:
            value = param(cfg, key, list, where="stats", default=default)
            bad = [v for v in value if v not in STAT_NAMES]
            if not value or bad:
                raise ParamsError(f"params: 'stats.{key}' must be a non-empty list of {list(STAT_NAMES)}, got {value}")
            return tuple(value)

        return cls(
            log_sigma=param(cfg, "log_sigma", float, where="stats", default=1.0, minimum=0.1),
            temperature=param(cfg, "temperature", float, where="stats", default=1.0, minimum=1e-3),
            intensity_terms=terms("intensity_terms", ["entropy", "std"]),
            detail_terms=terms("detail_terms", ["grad_energy"]),
            scale_split=param(cfg, "scale_split", str, where="stats", default="train", choices=["train", "all"]),
        )

    def normalisation(self, scales: Mapping[str, float]) -> Normalisation:
        """The ``Normalisation`` of these settings with the given scales."""
        return Normalisation(dict(scales), self.temperature, self.intensity_terms, self.detail_terms)


# ----------------------------------------------------------------------------- batch functions


def stat_columns(prefix: str = "") -> list[str]:
    """Names of the statistic columns: ``{prefix}{ir,vi}_{entropy,...}``."""
    return [f"{prefix}{m}_{s}" for m in MODALITIES for s in STAT_NAMES]


def add_patch_stats(batch: pa.Table, log_sigma: float) -> pa.Table:
    """Pass 1 on a batch of patch rows: append the 8 statistic columns (Ray Data or a loop)."""
    from pipeline.data.crop import decode_patches

    sizes = set(batch.column("size").to_pylist()) if batch.num_rows else {0}
    if len(sizes) != 1:
        raise ValueError(f"a batch mixes patch sizes {sorted(sizes)}")
    size = sizes.pop()
    for m in MODALITIES:
        stats = batch_statistics(decode_patches(batch.column(m).to_pylist(), size), log_sigma)
        for s in STAT_NAMES:
            batch = batch.append_column(f"{m}_{s}", pa.array(stats[s], pa.float64()))
    return batch


def _split_stats(batch: Any, only_split: str | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    cols = {name: np.asarray(batch[name]) for name in batch.keys()} if isinstance(batch, Mapping) else {
        name: batch.column(name).to_numpy() for name in batch.column_names
    }
    keep = slice(None) if only_split is None else np.asarray(cols["split"]) == only_split
    ir = {s: cols[f"ir_{s}"][keep] for s in STAT_NAMES if f"ir_{s}" in cols}
    vi = {s: cols[f"vi_{s}"][keep] for s in STAT_NAMES if f"vi_{s}" in cols}
    return ir, vi


def diff_histogram_batch(batch: Any, names: Sequence[str], only_split: str | None) -> dict[str, np.ndarray]:
    """A batch -> one row holding the ``|IR - VIS|`` histogram of each statistic in ``names``."""
    ir, vi = _split_stats(batch, only_split)
    hists = diff_histograms(ir, vi, names)
    return {name: hists[name][None, :] for name in names}


def add_patch_weights(
    batch: pa.Table, norm: Mapping[str, Any], image_weights: Mapping[str, Sequence[float]]
) -> pa.Table:
    """Pass 2 on a batch with statistics: append the patch weights and the image weights of its pair.

    Args:
        batch: patch rows with the statistic columns.
        norm: ``{"scales", "temperature", "intensity_terms", "detail_terms"}``.
        image_weights: pair id -> ``(int_ir, int_vi, det_ir, det_vi)`` of the whole image.
    """
    normalisation = Normalisation(
        norm["scales"], norm["temperature"], tuple(norm["intensity_terms"]), tuple(norm["detail_terms"])
    )
    ir, vi = _split_stats(batch, None)
    weights = adaptive_weights(ir, vi, normalisation)
    for name in WEIGHT_NAMES:
        batch = batch.append_column(f"w_{name}", pa.array(np.atleast_1d(weights[name]), pa.float64()))
    ids = batch.column("pair_id").to_pylist()
    try:
        img = np.array([image_weights[i] for i in ids], dtype=np.float64).reshape(len(ids), 4)
    except KeyError as exc:
        raise ValueError(f"pair {exc} has patches but no image statistics") from None
    for j, name in enumerate(WEIGHT_NAMES):
        batch = batch.append_column(f"img_w_{name}", pa.array(img[:, j], pa.float64()))
    return batch


def image_stats_batch(batch: Any, registered_dir: str, log_sigma: float) -> pa.Table:
    """Statistics of whole registered images for a batch of ``{pair_id, split}`` rows."""
    from pipeline.data.crop import column_list, load_registered_pair

    cols: dict[str, list[Any]] = {"pair_id": [], "split": [], "height": [], "width": []}
    cols.update({c: [] for c in stat_columns()})
    for pair_id, split in zip(column_list(batch, "pair_id"), column_list(batch, "split")):
        ir, y = load_registered_pair(registered_dir, pair_id)
        cols["pair_id"].append(pair_id)
        cols["split"].append(split)
        cols["height"].append(ir.shape[0])
        cols["width"].append(ir.shape[1])
        for m, img in (("ir", ir), ("vi", y)):
            for s, v in image_statistics(img, log_sigma).items():
                cols[f"{m}_{s}"].append(v)
    types = {"pair_id": pa.string(), "split": pa.string(), "height": pa.int32(), "width": pa.int32()}
    return pa.table({k: pa.array(v, types.get(k, pa.float64())) for k, v in cols.items()})


def weight_summary_batch(batch: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    """A batch -> one row per weight column: count, sum, sum of squares and fine histogram."""
    out: dict[str, np.ndarray] = {}
    for name in names:
        v = np.asarray(batch[name], dtype=np.float64)
        out[f"{name}__moments"] = np.array([[v.size, v.sum(), np.square(v).sum()]])
        out[f"{name}__hist"] = np.histogram(v, bins=WEIGHT_EDGES)[0][None, :].astype(np.int64)
    return out


def summarise_weights(moments: np.ndarray, hist: np.ndarray) -> dict[str, float]:
    """``{"mean", "std", "p5", "p50", "p95"}`` from accumulated moments and fine histogram."""
    n, s, s2 = (float(x) for x in moments)
    mean = s / n if n else float("nan")
    std = math.sqrt(max(s2 / n - mean * mean, 0.0)) if n else float("nan")
    out = {"mean": mean, "std": std}
    for q in (5, 50, 95):
        out[f"p{q}"] = histogram_quantile(hist, WEIGHT_EDGES, q / 100.0)
    return {k: round(v, 6) for k, v in out.items()}


# ----------------------------------------------------------------------------- the stats step


def _numpy_columns(table: pa.Table, names: Sequence[str]) -> dict[str, np.ndarray]:
    return {n: table.column(n).to_numpy(zero_copy_only=False) for n in names}


def stats_shard(
    shard: Mapping[str, Any], src_dir: str, dst_dir: str, log_sigma: float, names: Sequence[str], scale_split: str | None
) -> dict[str, Any]:
    """Pass 1 on one patch shard (a Ray Data ``map`` row ``{"file"}``): statistics -> ``dst_dir/file``.

    Returns:
        ``{"file", "rows", "split_<name>": hist, "all_<name>": hist}``: the ``|IR - VIS|``
        histograms (``DIFF_EDGES``) of each statistic in ``names`` over the rows of ``scale_split``
        and over every row.
    """
    table = add_patch_stats(pq.read_table(Path(src_dir) / shard["file"]), log_sigma)
    pq.write_table(table, Path(dst_dir) / shard["file"])
    cols = _numpy_columns(table, ["split", *(f"{m}_{k}" for m in MODALITIES for k in names)])
    out: dict[str, Any] = {"file": shard["file"], "rows": table.num_rows}
    for prefix, split in (("split_", scale_split), ("all_", None)):
        for name, hist in diff_histogram_batch(cols, names, split).items():
            out[prefix + name] = hist[0]
    return out


def weights_shard(
    shard: Mapping[str, Any], src_dir: str, dst_dir: str, norm: Mapping[str, Any],
    image_weights: Mapping[str, Sequence[float]], watched: Sequence[str],
) -> dict[str, Any]:
    """Pass 2 on one shard with statistics: weights -> ``dst_dir/file``; returns the weight summaries."""
    table = add_patch_weights(pq.read_table(Path(src_dir) / shard["file"]), norm, image_weights)
    pq.write_table(table, Path(dst_dir) / shard["file"])
    summary = weight_summary_batch(_numpy_columns(table, watched), watched)
    return {"file": shard["file"], **{k: v[0] for k, v in summary.items()}}


def accumulate_scales(rows: Any, names: Sequence[str], scale_split: str | None) -> tuple[dict[str, float], int]:
    """Sum the pass-1 histograms of every shard into the scales (falls back to every split if empty)."""
    totals = {p + n: np.zeros(len(DIFF_EDGES) - 1, np.int64) for p in ("split_", "all_") for n in names}
    for row in rows:
        for key in totals:
            totals[key] += np.asarray(row[key], np.int64)
    prefix = "split_"
    if scale_split is not None and totals["split_" + names[0]].sum() == 0:
        log.warning("stats: no '%s' patch; the scales use every split", scale_split)
        prefix = "all_"
    hists = {n: totals[prefix + n] for n in names}
    return scales_from_histograms(hists), int(hists[names[0]].sum())


def accumulate_weight_metrics(rows: Any, names: Sequence[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Sum per-shard weight summaries into ``{name: {"mean", "std", "p5", ...}}`` and fine histograms."""
    moments = {n: np.zeros(3) for n in names}
    hists = {n: np.zeros(len(WEIGHT_EDGES) - 1, np.int64) for n in names}
    for row in rows:
        for n in names:
            moments[n] += np.asarray(row[f"{n}__moments"], np.float64).reshape(3)
            hists[n] += np.asarray(row[f"{n}__hist"], np.int64)
    return {n: summarise_weights(moments[n], hists[n]) for n in names}, hists


def write_hist_csv(path: str | Path, hists: Mapping[str, np.ndarray]) -> Path:
    """Write ``bin_centre`` + one count column per histogram (``PLOT_BINS`` bins over [0, 1])."""
    from pipeline.common.atomic_io import atomic_writer

    group = (len(WEIGHT_EDGES) - 1) // PLOT_BINS
    centres = (np.arange(PLOT_BINS) + 0.5) / PLOT_BINS
    coarse = {k: np.asarray(v).reshape(PLOT_BINS, group).sum(axis=1) for k, v in hists.items()}
    with atomic_writer(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["bin_centre", *coarse])
        for i, c in enumerate(centres):
            writer.writerow([f"{c:.3f}", *(int(v[i]) for v in coarse.values())])
    return Path(path)


def compute_stats(
    patches_dir: str | Path,
    registered_dir: str | Path,
    out_dir: str | Path,
    cfg: StatsConfig,
    metrics_path: str | Path | None = None,
    plot_path: str | Path | None = None,
) -> dict[str, Any]:
    """The stats step (two Ray Data passes), run inside ``pipeline.common.ray_runtime.ray_session``.

    Args:
        patches_dir: output of the crop step (``part-*.parquet`` + ``split.json``).
        registered_dir: output of the register step (whole images).
        out_dir: stats folder (``patches/``, ``images.parquet``, ``normalisation.json``), replaced
            atomically at the end.
        cfg: stats parameters.
        metrics_path: JSON metrics file (weight spread), or ``None``.
        plot_path: CSV histogram of the weights, or ``None``.

    Returns:
        The metrics dictionary (also written to ``metrics_path``).
    """
    import json

    import ray.data

    from pipeline.common.atomic_io import replace_dir, staging_dir, write_json
    from pipeline.data.crop import SPLITS, ordered_data_context

    patches_dir, out_dir = Path(patches_dir), Path(out_dir)
    split_file = patches_dir / "split.json"
    if not split_file.is_file():
        raise FileNotFoundError(f"split file not found: {split_file} (run the crop stage first)")
    parts = sorted(patches_dir.glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no patch shards (part-*.parquet) in {patches_dir}")
    split = json.loads(split_file.read_text())
    items = sorted(({"pair_id": p, "split": s} for s in SPLITS for p in split.get(s, [])), key=lambda r: r["pair_id"])
    ordered_data_context()
    tmp = staging_dir(out_dir)
    try:
        # Whole images: one row of scalars per pair (the size of the manifest).
        images = (
            ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 64)))
            .map_batches(image_stats_batch, batch_size=None, batch_format="pyarrow",
                         fn_kwargs={"registered_dir": str(registered_dir), "log_sigma": cfg.log_sigma})
            .to_arrow_refs()
        )
        import ray

        image_table = pa.concat_tables(ray.get(images)).sort_by("pair_id")
        img_cols = {c: image_table.column(c).to_numpy() for c in image_table.column_names}
        img_scales, img_count = _level_scales(img_cols, cfg)
        img_norm = cfg.normalisation(img_scales)
        ir = {s: img_cols[f"ir_{s}"] for s in STAT_NAMES}
        vi = {s: img_cols[f"vi_{s}"] for s in STAT_NAMES}
        img_w = adaptive_weights(ir, vi, img_norm)
        for name in WEIGHT_NAMES:
            image_table = image_table.append_column(f"w_{name}", pa.array(np.atleast_1d(img_w[name]), pa.float64()))
        pq.write_table(image_table, tmp / "images.parquet")
        image_weights = {
            pid: tuple(float(img_w[n][i]) for n in WEIGHT_NAMES) for i, pid in enumerate(img_cols["pair_id"])
        }

        # Pass 1: statistics of every patch, staged, and the |IR - VIS| histograms -> scales.
        stage1 = tmp / ".pass1"
        stage1.mkdir()
        shards = [{"file": p.name} for p in parts]
        only = None if cfg.scale_split == "all" else cfg.scale_split
        rows = (ray.data.from_items(shards, override_num_blocks=len(shards))
                .map(stats_shard, fn_kwargs={"src_dir": str(patches_dir), "dst_dir": str(stage1),
                                             "log_sigma": cfg.log_sigma, "names": list(cfg.terms), "scale_split": only})
                .iter_rows())
        scales, count = accumulate_scales(rows, cfg.terms, only)
        norm = cfg.normalisation(scales)

        # Pass 2: weights of every patch (+ the weights of its whole image), and their spread.
        (tmp / "patches").mkdir()
        watched = ["w_int_ir", "w_det_ir"]
        norm_arg = {"scales": dict(norm.scales), "temperature": norm.temperature,
                    "intensity_terms": list(norm.intensity_terms), "detail_terms": list(norm.detail_terms)}
        rows = (ray.data.from_items(shards, override_num_blocks=len(shards))
                .map(weights_shard, fn_kwargs={"src_dir": str(stage1), "dst_dir": str(tmp / "patches"), "norm": norm_arg,
                                               "image_weights": image_weights, "watched": watched})
                .iter_rows())
        patch_metrics, patch_hists = accumulate_weight_metrics(rows, watched)
        shutil.rmtree(stage1)

        normalisation = {
            "method": "median over the scale split of |stat(IR) - stat(VIS)| (streaming log histogram)",
            "scale_split": cfg.scale_split,
            "temperature": cfg.temperature,
            "intensity_terms": list(cfg.intensity_terms),
            "detail_terms": list(cfg.detail_terms),
            "log_sigma": cfg.log_sigma,
            "patch": {"scales": scales, "count": count},
            "image": {"scales": img_scales, "count": img_count},
        }
        write_json(tmp / "normalisation.json", normalisation)

        img_summary = weight_summary_batch(_numpy_columns(image_table, watched), watched)
        img_metrics, img_hists = accumulate_weight_metrics([{k: v[0] for k, v in img_summary.items()}], watched)
        metrics = {
            "patch": {"count": int(patch_hists[watched[0]].sum()), **patch_metrics},
            "image": {"count": image_table.num_rows, **img_metrics},
            "scales": {"patch": scales, "image": img_scales},
        }
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    if plot_path is not None:
        hists = {f"{n}_patch": patch_hists[n] for n in watched}
        hists.update({f"{n}_image": img_hists[n] for n in watched})
        write_hist_csv(plot_path, hists)
    log.info("stats: %s", metrics)
    return metrics


def _level_scales(cols: Mapping[str, np.ndarray], cfg: StatsConfig) -> tuple[dict[str, float], int]:
    """Scales from in-memory per-image statistics (the scale split, else every row)."""
    keep = np.asarray(cols["split"]) == cfg.scale_split if cfg.scale_split != "all" else np.ones(len(cols["split"]), bool)
    if not keep.any():
        keep = np.ones(len(cols["split"]), bool)
    ir = {s: cols[f"ir_{s}"][keep] for s in cfg.terms}
    vi = {s: cols[f"vi_{s}"][keep] for s in cfg.terms}
    return scales_from_histograms(diff_histograms(ir, vi, cfg.terms)), int(keep.sum())
