"""The ``stats`` stage on Ray Data: statistics and adaptive weights of every patch and image.

The maths (statistics, weights, scales) is in ``pipeline.data.stats``.

The ``stats`` step (``compute_stats``) is two Ray Data executions
(``pipeline.common.ray_runtime.map_groups``), each one task per CPU (more for a large input) over
groups of patch shards (``task_groups``: shards dealt round-robin; a task works through its shards
one at a time, so its memory does not grow with the input):

- pass 1: each task computes the statistics of its patch shards (staged as Parquet, statistic
  columns only) and of its share of the whole registered images; it returns the ``|IR - VIS|``
  histograms of its shards (summed) and its image-statistics table, both small. The driver sums
  the histograms into the patch scales, and derives the image scales and weights from the image
  table (one row per pair);
- pass 2: each task reads its patch shards again with their staged statistics, appends the patch
  and image weights and writes the output shard (same file name); it returns its weight summaries.

Each task writes its own files, so the outputs are the same whatever the cluster, the number of
tasks or their order (the weight metrics up to the order of float additions). It writes

- ``<out>/patches/part-NNNNN.parquet``: the patch columns (``pipeline.data.crop.PATCH_SCHEMA``) +
  ``{ir,vi}_{entropy,std,grad_energy,avg_grad}`` (float64) + ``w_int_ir, w_int_vi, w_det_ir,
  w_det_vi`` + the weights of the patch's whole image ``img_w_int_ir, img_w_int_vi, img_w_det_ir,
  img_w_det_vi``;
- ``<out>/images.parquet``: one row per pair (``pair_id, split, height, width``, statistics,
  weights ``w_*``);
- ``<out>/normalisation.json``; ``<out>/summary.json`` (mean, std, p5, p50, p95 of ``w_int_ir``
  and ``w_det_ir``, patch- and image-level, and the scales); the DVC metrics file (the counts and
  the median image weight: ``headline_metrics``) and the histogram plot CSV (bin centre vs count).
"""

from __future__ import annotations

import csv
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.common.atomic_io import atomic_writer, replace_dir, staging_dir, write_json
from pipeline.common.config import ParamsError, read_settings, setting
from pipeline.common.ray_runtime import Runner, configure_data_context, map_groups, task_count, task_groups
from pipeline.data.contracts import SPLITS, WEIGHT_NAMES, WEIGHTINGS, column_list, decode_patches, read_registered_pair, read_split
from pipeline.data.images import split_luma
from pipeline.data.stats import (
    DIFF_EDGES,
    MODALITIES,
    STAT_NAMES,
    Normalisation,
    adaptive_weights,
    batch_statistics,
    diff_histograms,
    histogram_quantile,
    image_statistics,
    scales_from_histograms,
)

log = logging.getLogger(__name__)

#: Edges of the fine weight histogram used for the percentiles of the metrics.
WEIGHT_EDGES = np.linspace(0.0, 1.0, 1001)
PLOT_BINS = 50


# ----------------------------------------------------------------------------- configuration


def _stat_names(value: Sequence[Any], key: str) -> tuple[str, ...]:
    """A non-empty list of statistic names (:data:`STAT_NAMES`) as a tuple."""
    bad = [v for v in value if v not in STAT_NAMES]
    if not value or bad:
        raise ParamsError(f"params: '{key}' must be a non-empty list of {list(STAT_NAMES)}, got {list(value)}")
    return tuple(value)


@dataclass(frozen=True)
class StatsConfig:
    """The ``stats`` section of ``params.yaml``.

    Attributes:
        log_sigma: Gaussian sigma of the LoG in pixels.
        temperature: softmax temperature of the weights.
        intensity_terms, detail_terms: statistics summed into each score (see module docstring).
        scale_split: split whose data sets the scales (``train``: no test data leaks in).
        weighting: ``adaptive``, or ``fixed`` (ablation: every weight 0.5).
    """

    log_sigma: float = setting(1.0, float, minimum=0.1)
    temperature: float = setting(1.0, float, minimum=1e-3)
    intensity_terms: tuple[str, ...] = setting(("entropy", "std"), list, convert=_stat_names)
    detail_terms: tuple[str, ...] = setting(("grad_energy",), list, convert=_stat_names)
    scale_split: str = setting("train", str, choices=["train", "all"])
    weighting: str = setting("adaptive", str, choices=list(WEIGHTINGS))
    terms: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "terms", tuple(dict.fromkeys(self.intensity_terms + self.detail_terms)))

    @classmethod
    def from_params(cls, cfg: Mapping[str, Any]) -> "StatsConfig":
        """Read and validate the ``stats`` section; raises ``ParamsError`` naming the key."""
        return read_settings(cls, cfg, "stats")

    def normalisation(self, scales: Mapping[str, float]) -> Normalisation:
        """The ``Normalisation`` of these settings with the given scales."""
        return Normalisation(dict(scales), self.temperature, self.intensity_terms, self.detail_terms, self.weighting)


# ----------------------------------------------------------------------------- batch functions


def stat_columns(prefix: str = "") -> list[str]:
    """Names of the statistic columns: ``{prefix}{ir,vi}_{entropy,...}``."""
    return [f"{prefix}{m}_{s}" for m in MODALITIES for s in STAT_NAMES]


def add_patch_stats(batch: pa.Table, log_sigma: float) -> pa.Table:
    """Pass 1 on a batch of patch rows: append the 8 statistic columns (Ray Data or a loop)."""

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
    batch: pa.Table, norm: Normalisation, image_weights: Mapping[str, Sequence[float]]
) -> pa.Table:
    """Pass 2 on a batch with statistics: append the patch weights and the image weights of its pair.

    Args:
        batch: patch rows with the statistic columns.
        norm: the patch-level scales and terms.
        image_weights: pair id -> ``(int_ir, int_vi, det_ir, det_vi)`` of the whole image.
    """
    ir, vi = _split_stats(batch, None)
    weights = adaptive_weights(ir, vi, norm)
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

    cols: dict[str, list[Any]] = {"pair_id": [], "split": [], "height": [], "width": []}
    cols.update({c: [] for c in stat_columns()})
    for pair_id, split in zip(column_list(batch, "pair_id"), column_list(batch, "split")):
        ir, vi = read_registered_pair(registered_dir, pair_id)
        y, _ = split_luma(vi)
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


def _add_counts(total: dict[str, np.ndarray], part: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Add the arrays of ``part`` into ``total`` key by key (``total`` starts empty)."""
    for key, value in part.items():
        value = np.asarray(value)
        total[key] = total[key] + value if key in total else value.copy()
    return total


def stats_shard(
    file: str, patches_dir: str, stage_dir: str, log_sigma: float, names: Sequence[str], scale_split: str | None
) -> dict[str, Any]:
    """Pass 1 on one patch shard: its statistic columns -> ``stage_dir/file`` (staged, statistics only).

    Returns:
        ``{"rows": n, "split_<name>": hist, "all_<name>": hist}``: the ``|IR - VIS|`` histograms
        (``DIFF_EDGES``) of each statistic in ``names`` over the rows of ``scale_split`` and over
        every row.
    """
    table = add_patch_stats(pq.read_table(Path(patches_dir) / file), log_sigma)
    pq.write_table(table.select(stat_columns()), Path(stage_dir) / file)
    cols = _numpy_columns(table, ["split", *(f"{m}_{k}" for m in MODALITIES for k in names)])
    out: dict[str, Any] = {"rows": np.int64(table.num_rows)}
    for prefix, split in (("split_", scale_split), ("all_", None)):
        for name, hist in diff_histogram_batch(cols, names, split).items():
            out[prefix + name] = hist[0]
    return out


def stats_group(
    group: Mapping[str, Sequence[Any]], patches_dir: str, stage_dir: str, registered_dir: str, log_sigma: float,
    names: Sequence[str], scale_split: str | None,
) -> dict[str, Any]:
    """Pass 1 of one task: statistics of its patch shards (staged) and of its whole images.

    Args:
        group: ``{"files": [shard file names], "pairs": [{"pair_id", "split"}]}``.

    Returns:
        ``{"hists": summed ``stats_shard`` histograms and rows, "images": image_stats_batch table}``.
    """
    hists: dict[str, np.ndarray] = {}
    for file in group["files"]:
        _add_counts(hists, stats_shard(file, patches_dir, stage_dir, log_sigma, names, scale_split))
    pairs = list(group["pairs"])
    images = image_stats_batch({"pair_id": [p["pair_id"] for p in pairs], "split": [p["split"] for p in pairs]},
                               registered_dir, log_sigma)
    return {"hists": hists, "images": images}


def weights_shard(
    file: str, patches_dir: str, stage_dir: str, dst_dir: str, norm: Normalisation,
    image_weights: Mapping[str, Sequence[float]], watched: Sequence[str],
) -> dict[str, np.ndarray]:
    """Pass 2 on one shard: patch columns + staged statistics + weights -> ``dst_dir/file``.

    Returns:
        The weight summaries of the shard (``weight_summary_batch``, one row squeezed).
    """
    table = pq.read_table(Path(patches_dir) / file)
    stats = pq.read_table(Path(stage_dir) / file)
    if stats.num_rows != table.num_rows:
        raise ValueError(f"{Path(stage_dir) / file}: {stats.num_rows} staged rows for {table.num_rows} patches")
    for name in stats.column_names:
        table = table.append_column(stats.schema.field(name), stats.column(name))
    table = add_patch_weights(table, norm, image_weights)
    pq.write_table(table, Path(dst_dir) / file)
    summary = weight_summary_batch(_numpy_columns(table, watched), watched)
    return {k: v[0] for k, v in summary.items()}


def weights_group(
    files: Sequence[str], patches_dir: str, stage_dir: str, dst_dir: str, norm: Normalisation,
    image_weights: Mapping[str, Sequence[float]], watched: Sequence[str],
) -> dict[str, np.ndarray]:
    """Pass 2 of one task: ``weights_shard`` on each of its files; the summed weight summaries."""
    total: dict[str, np.ndarray] = {}
    for file in files:
        _add_counts(total, weights_shard(file, patches_dir, stage_dir, dst_dir, norm, image_weights, watched))
    return total


def accumulate_scales(rows: Any, names: Sequence[str], scale_split: str | None) -> tuple[dict[str, float], int]:
    """Sum the pass-1 histograms (per shard or per task) into the scales (falls back to every split if empty)."""
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


#: The whole weight spread (every percentile of every weight, patch and image level, the scales)
#: in the stats folder; ``dvc metrics show`` gets :func:`headline_metrics`.
SUMMARY_FILE = "summary.json"


def headline_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The counts and the median image-level IR intensity weight (the DVC metrics file)."""
    image = metrics["image"]
    return {"patches": metrics["patch"]["count"], "images": image["count"],
            "w_int_ir_p50": image.get("w_int_ir", {}).get("p50")}


def accumulate_weight_metrics(rows: Any, names: Sequence[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Sum weight summaries (per shard or per task) into ``{name: {"mean", "std", "p5", ...}}`` and fine histograms."""
    moments = {n: np.zeros(3) for n in names}
    hists = {n: np.zeros(len(WEIGHT_EDGES) - 1, np.int64) for n in names}
    for row in rows:
        for n in names:
            moments[n] += np.asarray(row[f"{n}__moments"], np.float64).reshape(3)
            hists[n] += np.asarray(row[f"{n}__hist"], np.int64)
    return {n: summarise_weights(moments[n], hists[n]) for n in names}, hists


def write_hist_csv(path: str | Path, hists: Mapping[str, np.ndarray]) -> Path:
    """Write ``bin_centre`` + one count column per histogram (``PLOT_BINS`` bins over [0, 1])."""

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
    runner: Runner = map_groups,
) -> dict[str, Any]:
    """The stats step (two Ray Data executions), run inside ``pipeline.common.ray_runtime.ray_session``.

    Args:
        patches_dir: output of the crop step (``part-*.parquet`` + ``split.json``).
        registered_dir: output of the register step (whole images).
        out_dir: stats folder (``patches/``, ``images.parquet``, ``normalisation.json``), replaced
            atomically at the end.
        cfg: stats parameters.
        metrics_path: JSON metrics file (weight spread), or ``None``.
        plot_path: CSV histogram of the weights, or ``None``.
        runner: how the task groups run (``map_groups``: Ray Data; ``run_serially``: the same
            work in this process, for benchmarks and tests).

    Returns:
        The metrics dictionary (also written to ``metrics_path``).
    """
    patches_dir, out_dir = Path(patches_dir), Path(out_dir)
    parts = sorted(patches_dir.glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no patch shards (part-*.parquet) in {patches_dir}")
    split = read_split(patches_dir / "split.json")
    items = sorted(({"pair_id": p, "split": s} for s in SPLITS for p in split[s]), key=lambda r: r["pair_id"])
    configure_data_context()
    watched = ["w_int_ir", "w_det_ir"]
    tmp = staging_dir(out_dir)
    try:
        stage = tmp / ".pass1"
        stage.mkdir()
        (tmp / "patches").mkdir()
        files = [p.name for p in parts]
        only = None if cfg.scale_split == "all" else cfg.scale_split
        # pass 1 (one execution): patch statistics (staged) + whole-image statistics
        tasks = task_count(len(files))
        groups = [{"files": f, "pairs": p} for f, p in zip(task_groups(files, tasks), _deal(items, tasks))]
        results = runner("stats pass 1", stats_group, groups, {
            "patches_dir": str(patches_dir), "stage_dir": str(stage), "registered_dir": str(registered_dir),
            "log_sigma": cfg.log_sigma, "names": list(cfg.terms), "scale_split": only})
        scales, count = accumulate_scales([r["hists"] for r in results], cfg.terms, only)
        image_table, img_scales, img_count, image_weights = _image_level([r["images"] for r in results], cfg)
        pq.write_table(image_table, tmp / "images.parquet")
        # pass 2 (one execution): weights -> patches/
        rows = runner("stats pass 2", weights_group, task_groups(files, tasks), {
            "patches_dir": str(patches_dir), "stage_dir": str(stage), "dst_dir": str(tmp / "patches"),
            "norm": cfg.normalisation(scales), "image_weights": image_weights, "watched": watched})
        patch_metrics, patch_hists = accumulate_weight_metrics(rows, watched)
        shutil.rmtree(stage)
        write_json(tmp / "normalisation.json", {
            "method": "median over the scale split of |stat(IR) - stat(VIS)| (streaming log histogram)",
            "scale_split": cfg.scale_split,
            "temperature": cfg.temperature,
            "intensity_terms": list(cfg.intensity_terms),
            "detail_terms": list(cfg.detail_terms),
            "log_sigma": cfg.log_sigma,
            "weighting": cfg.weighting,
            "patch": {"scales": scales, "count": count},
            "image": {"scales": img_scales, "count": img_count},
        })
        img_summary = weight_summary_batch(_numpy_columns(image_table, watched), watched)
        img_metrics, img_hists = accumulate_weight_metrics([{k: v[0] for k, v in img_summary.items()}], watched)
        metrics = {
            "patch": {"count": int(patch_hists[watched[0]].sum()), **patch_metrics},
            "image": {"count": image_table.num_rows, **img_metrics},
            "scales": {"patch": scales, "image": img_scales},
        }
        write_json(tmp / SUMMARY_FILE, metrics)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if metrics_path is not None:
        write_json(metrics_path, headline_metrics(metrics))
    if plot_path is not None:
        hists = {f"{n}_patch": patch_hists[n] for n in watched}
        hists.update({f"{n}_image": img_hists[n] for n in watched})
        write_hist_csv(plot_path, hists)
    log.debug("stats: %s", metrics)
    return metrics


def _deal(items: Sequence[Any], tasks: int) -> list[list[Any]]:
    """``task_groups`` that keeps empty groups: exactly ``tasks`` lists (the pairs beside the files)."""
    return [list(items[k::tasks]) for k in range(tasks)]


def _image_level(
    tables: Sequence[pa.Table], cfg: StatsConfig
) -> tuple[pa.Table, dict[str, float], int, dict[str, tuple[float, ...]]]:
    """Whole images: the per-task statistic tables -> one table sorted by pair, scales, weights.

    Returns:
        ``(image_table, scales, count, {pair_id: (int_ir, int_vi, det_ir, det_vi)})``.
    """
    image_table = pa.concat_tables(tables).sort_by("pair_id")
    cols = {c: image_table.column(c).to_numpy(zero_copy_only=False) for c in image_table.column_names}
    scales, count = _level_scales(cols, cfg)
    ir = {s: cols[f"ir_{s}"] for s in STAT_NAMES}
    vi = {s: cols[f"vi_{s}"] for s in STAT_NAMES}
    weights = adaptive_weights(ir, vi, cfg.normalisation(scales))
    for name in WEIGHT_NAMES:
        image_table = image_table.append_column(f"w_{name}", pa.array(np.atleast_1d(weights[name]), pa.float64()))
    per_pair = {pid: tuple(float(weights[n][i]) for n in WEIGHT_NAMES) for i, pid in enumerate(cols["pair_id"])}
    return image_table, scales, count, per_pair


def _level_scales(cols: Mapping[str, np.ndarray], cfg: StatsConfig) -> tuple[dict[str, float], int]:
    """Scales from in-memory per-image statistics (the scale split, else every row)."""
    keep = np.asarray(cols["split"]) == cfg.scale_split if cfg.scale_split != "all" else np.ones(len(cols["split"]), bool)
    if not keep.any():
        keep = np.ones(len(cols["split"]), bool)
    ir = {s: cols[f"ir_{s}"][keep] for s in cfg.terms}
    vi = {s: cols[f"vi_{s}"][keep] for s in cfg.terms}
    return scales_from_histograms(diff_histograms(ir, vi, cfg.terms)), int(keep.sum())
