"""Complementary statistics, data-derived adaptive weights and the two-pass Ray Data stats step."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import shared_dataset
from pipeline.common import ray_runtime
from pipeline.common.config import ParamsError
from pipeline.evaluate import metrics
from pipeline.data.contracts import read_registered_pair
from pipeline.data.crop import CropConfig, crop_dataset
from pipeline.data.images import split_luma
from pipeline.data.stats import (
    DIFF_EDGES,
    Normalisation,
    adaptive_weights,
    batch_statistics,
    diff_histograms,
    histogram_quantile,
    image_statistics,
    scales_from_histograms,
)
from pipeline.data.stats_stage import StatsConfig, compute_stats
from registered_fixtures import registered_from_dataset

NORM = Normalisation({"entropy": 1.0, "std": 10.0, "grad_energy": 50.0})


def test_statistics_on_known_arrays():
    const = np.full((32, 32), 77, np.uint8)
    s = image_statistics(const)
    assert s == {"entropy": 0.0, "std": 0.0, "grad_energy": 0.0, "avg_grad": 0.0}
    half = np.zeros((32, 32), np.uint8)
    half[:, 16:] = 100
    s = image_statistics(half)
    assert s["entropy"] == pytest.approx(1.0) and s["std"] == pytest.approx(50.0)
    assert s["grad_energy"] > 0 and s["avg_grad"] > 0
    four = np.repeat(np.array([0, 60, 120, 180], np.uint8), 64).reshape(16, 16)
    assert image_statistics(four)["entropy"] == pytest.approx(2.0)
    ramp = np.tile(np.arange(0, 64, 2, dtype=np.uint8), (20, 1))  # slope 2 along x
    assert image_statistics(ramp)["avg_grad"] == pytest.approx(np.sqrt(2.0))


def test_grad_energy_scales_with_contrast_squared_and_sigma_smooths():
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 50, (48, 48)).astype(np.uint8)
    e1 = image_statistics(noise)["grad_energy"]
    e2 = image_statistics(noise * 2)["grad_energy"]
    assert e2 == pytest.approx(4 * e1, rel=1e-4)
    assert image_statistics(noise, log_sigma=2.0)["grad_energy"] < e1


def test_batch_statistics_match_single_images_and_the_metric_conventions():
    rng = np.random.default_rng(2)
    stack = rng.integers(0, 256, (5, 24, 24)).astype(np.uint8)
    stack[1] = 9
    batch = batch_statistics(stack)
    for i in range(5):
        single = image_statistics(stack[i])
        assert {k: batch[k][i] for k in single} == pytest.approx(single)
        f = stack[i].astype(np.float64)
        assert single["entropy"] == pytest.approx(metrics.en(None, None, f))
        assert single["std"] == pytest.approx(metrics.sd(None, None, f))
        assert single["avg_grad"] == pytest.approx(metrics.ag(None, None, f), rel=1e-5)
    with pytest.raises(ValueError):
        batch_statistics(stack.astype(np.float32))
    with pytest.raises(ValueError):
        image_statistics(np.zeros((8, 8, 3), np.uint8))


def test_weights_sum_to_one_and_favour_the_informative_modality():
    rng = np.random.default_rng(3)
    textured = image_statistics(rng.integers(0, 256, (64, 64)).astype(np.uint8))
    dark = image_statistics(np.clip(rng.normal(4, 1, (64, 64)), 0, 255).astype(np.uint8))
    flat = image_statistics(np.full((64, 64), 120, np.uint8))
    w = adaptive_weights(textured, dark, NORM)  # visible dark: IR favoured
    assert w["int_ir"] > 0.9 and w["det_ir"] > 0.9
    w2 = adaptive_weights(flat, textured, NORM)  # IR flat: visible favoured
    assert w2["int_vi"] > 0.9 and w2["det_vi"] > 0.9
    for ws in (w, w2):
        assert ws["int_ir"] + ws["int_vi"] == pytest.approx(1.0) and ws["det_ir"] + ws["det_vi"] == pytest.approx(1.0)
    same = adaptive_weights(textured, textured, NORM)
    assert same["int_ir"] == pytest.approx(0.5) and same["det_ir"] == pytest.approx(0.5)
    hot = adaptive_weights(textured, dark, NORM, temperature=100.0)
    assert 0.5 < hot["int_ir"] < w["int_ir"]  # a higher temperature flattens the weights
    huge = adaptive_weights({"entropy": 1e9, "std": 0, "grad_energy": 0}, {"entropy": 0, "std": 0, "grad_energy": 1e9}, NORM)
    assert huge["int_ir"] == 1.0 and huge["det_ir"] == 0.0  # no overflow
    with pytest.raises(ValueError):
        adaptive_weights(textured, dark, NORM, temperature=0.0)


def test_scales_from_the_data_make_the_weights_vary_unlike_a_fixed_constant():
    rng = np.random.default_rng(4)
    n = 400
    contrast_ir, contrast_vi = rng.uniform(2, 60, n), rng.uniform(2, 60, n)
    ir = np.clip(128 + rng.normal(0, 1, (n, 32, 32)) * contrast_ir[:, None, None], 0, 255).astype(np.uint8)
    vi = np.clip(128 + rng.normal(0, 1, (n, 32, 32)) * contrast_vi[:, None, None], 0, 255).astype(np.uint8)
    s_ir, s_vi = batch_statistics(ir), batch_statistics(vi)
    names = ("entropy", "std", "grad_energy")
    scales = scales_from_histograms(diff_histograms(s_ir, s_vi, names))
    for k in names:  # streaming median of |IR - VIS| ~ exact median
        assert scales[k] == pytest.approx(np.median(np.abs(s_ir[k] - s_vi[k])), rel=0.03)
    w = adaptive_weights(s_ir, s_vi, Normalisation(scales))["int_ir"]
    assert np.percentile(w, 5) < 0.3 and np.percentile(w, 95) > 0.7
    assert np.corrcoef(w, contrast_ir - contrast_vi)[0, 1] > 0.8
    fixed = adaptive_weights(s_ir, s_vi, Normalisation({k: 3000.0 for k in names}))["int_ir"]
    assert np.all(np.abs(fixed - 0.5) < 0.02)  # the authors' constant: adaptation off


def test_histogram_quantile_and_degenerate_scale():
    values = np.random.default_rng(5).lognormal(0, 2, 5000)
    counts = np.histogram(values, bins=DIFF_EDGES)[0]
    for q in (0.05, 0.5, 0.95):
        assert histogram_quantile(counts, DIFF_EDGES, q) == pytest.approx(np.quantile(values, q), rel=0.03)
    zeros = {"std": np.zeros(10)}
    assert scales_from_histograms(diff_histograms(zeros, zeros, ["std"])) == {"std": 1.0}


def test_stats_config_validation():
    cfg = StatsConfig.from_params({"temperature": 2, "detail_terms": ["grad_energy", "avg_grad"]})
    assert cfg.temperature == 2.0 and cfg.terms == ("entropy", "std", "grad_energy", "avg_grad")
    with pytest.raises(ParamsError, match="stats.detail_terms"):
        StatsConfig.from_params({"detail_terms": ["sharpness"]})
    with pytest.raises(ParamsError, match="stats.temperature"):
        StatsConfig.from_params({"temperature": 0})


def test_crop_and_stats_on_real_roadscene_pairs(tmp_path, ray_local):
    data = shared_dataset("RoadScene")
    reg = tmp_path / "registered"
    stems = registered_from_dataset(data, reg, 6)
    crop_dataset(reg, tmp_path / "patches", CropConfig(patch_size=64, stride=64, pairs_per_shard=3))
    out, metrics_path, plot = tmp_path / "stats", tmp_path / "metrics" / "stats.json", tmp_path / "plots" / "h.csv"
    cfg = StatsConfig()
    result = compute_stats(tmp_path / "patches", reg, out, cfg, metrics_path, plot)

    patches = pq.read_table(out / "patches").to_pandas()
    images = pq.read_table(out / "images.parquet").to_pandas()
    norm_file = json.loads((out / "normalisation.json").read_text())
    assert sorted(images.pair_id) == stems and len(patches) == result["patch"]["count"] > 100
    assert not (out / ".pass1").exists()
    for prefix, table in (("", patches), ("", images), ("img_", patches)):
        assert np.allclose(table[f"{prefix}w_int_ir"] + table[f"{prefix}w_int_vi"], 1.0)
        assert np.allclose(table[f"{prefix}w_det_ir"] + table[f"{prefix}w_det_vi"], 1.0)
    # statistics recomputed from the decoded patch equal the stored ones
    row = patches.iloc[7]
    ir_patch = np.frombuffer(row["ir"], np.uint8).reshape(64, 64)
    assert image_statistics(ir_patch)["grad_energy"] == pytest.approx(row["ir_grad_energy"])
    # image rows: stats of the whole registered image; patch rows carry the weights of their image
    ir, vi = read_registered_pair(reg, stems[0])
    y, _ = split_luma(vi)
    first = images.set_index("pair_id").loc[stems[0]]
    assert image_statistics(y)["entropy"] == pytest.approx(first["vi_entropy"])
    assert np.allclose(patches[patches.pair_id == stems[0]]["img_w_int_ir"], first["w_int_ir"])
    # the scales are the median |IR - VIS| of the training patches, and reproduce the weights
    train = patches[patches.split == "train"]
    for k, scale in norm_file["patch"]["scales"].items():
        assert scale == pytest.approx(np.median(np.abs(train[f"ir_{k}"] - train[f"vi_{k}"])), rel=0.03)
    norm = Normalisation.load(out / "normalisation.json", "patch")
    w = adaptive_weights({k: row[f"ir_{k}"] for k in norm.scales}, {k: row[f"vi_{k}"] for k in norm.scales}, norm)
    assert w["int_ir"] == pytest.approx(row["w_int_ir"]) and w["det_vi"] == pytest.approx(row["w_det_vi"])
    # metrics (the counts and the median image weight) and the whole spread in the stats folder
    assert json.loads(metrics_path.read_text()) == {"patches": len(patches), "images": len(images),
                                                    "w_int_ir_p50": result["image"]["w_int_ir"]["p50"]}
    saved = json.loads((out / "summary.json").read_text())
    assert saved["patch"]["w_int_ir"]["p5"] == pytest.approx(np.percentile(patches.w_int_ir, 5, method="inverted_cdf"), abs=0.002)
    assert saved["patch"]["w_int_ir"]["p95"] - saved["patch"]["w_int_ir"]["p5"] > 0.3  # the weights really vary
    with plot.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 50 and sum(int(r["w_int_ir_patch"]) for r in rows) == len(patches)
    assert sum(int(r["w_det_ir_image"]) for r in rows) == len(images)


def test_stats_outputs_do_not_depend_on_the_tasks_or_on_ray(tmp_path, ray_local, monkeypatch):
    """The same files from Ray Data with 8 or 2 tasks and from the serial runner (no Ray)."""
    data = shared_dataset("RoadScene")
    reg = tmp_path / "registered"
    registered_from_dataset(data, reg, 9)
    crop_dataset(reg, tmp_path / "patches", CropConfig(patch_size=64, stride=64, pairs_per_shard=1))
    cfg = StatsConfig()
    monkeypatch.setattr(ray_runtime, "TASKS_PER_CPU", 4)  # 8 tasks on 2 CPUs, one with 2 shards
    runs = {"ray": compute_stats(tmp_path / "patches", reg, tmp_path / "ray", cfg)}
    monkeypatch.setattr(ray_runtime, "TASKS_PER_CPU", 1)  # 2 tasks
    runs["ray2"] = compute_stats(tmp_path / "patches", reg, tmp_path / "ray2", cfg)
    runs["serial"] = compute_stats(tmp_path / "patches", reg, tmp_path / "serial", cfg, runner=ray_runtime.run_serially)
    files = sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*") if p.is_file())
    assert len([f for f in files if f.name.startswith("part-")]) == 9 and not any(".pass1" in str(f) for f in files)
    for other in ("ray2", "serial"):
        assert sorted(p.relative_to(tmp_path / other) for p in (tmp_path / other).rglob("*") if p.is_file()) == files
        for f in files:
            if f.suffix == ".parquet":
                assert pq.read_table(tmp_path / "ray" / f).equals(pq.read_table(tmp_path / other / f)), f
            else:
                assert (tmp_path / "ray" / f).read_text() == (tmp_path / other / f).read_text(), f
        # per-task sums of the weight moments: equal up to the order of the float additions
        assert _approx_equal(runs[other], runs["ray"])


def _approx_equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_approx_equal(a[k], b[k]) for k in a)
    return a == pytest.approx(b, rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------- ablation: fixed weights
def test_fixed_weighting_gives_half_everywhere():
    rng = np.random.default_rng(1)
    ir = {k: rng.uniform(0, 50, 7) for k in NORM.scales}
    vi = {k: rng.uniform(0, 50, 7) for k in NORM.scales}
    fixed = Normalisation(dict(NORM.scales), weighting="fixed")
    w = adaptive_weights(ir, vi, fixed)
    assert all(np.array_equal(w[k], np.full(7, 0.5)) for k in ("int_ir", "int_vi", "det_ir", "det_vi"))
    one = adaptive_weights({k: v[0] for k, v in ir.items()}, {k: v[0] for k, v in vi.items()}, fixed)
    assert one == {"int_ir": 0.5, "int_vi": 0.5, "det_ir": 0.5, "det_vi": 0.5}
    assert not np.allclose(adaptive_weights(ir, vi, NORM)["int_ir"], 0.5)  # adaptive really differs
    assert StatsConfig.from_params({}).weighting == "adaptive"
    with pytest.raises(ParamsError, match="stats.weighting"):
        StatsConfig.from_params({"weighting": "uniform"})


def test_stats_stage_with_fixed_weighting_writes_constant_weights(tmp_path, ray_local):
    from registered_fixtures import write_registered

    rng = np.random.default_rng(0)
    reg = tmp_path / "registered"
    yy, xx = np.mgrid[0:48, 0:64]
    pairs = []
    for i in range(4):  # IR: a warm blob on a flat background; visible: texture
        ir = np.clip(40 + 150 * np.exp(-((yy - 10 * i - 10) ** 2 + (xx - 30) ** 2) / 40) + rng.normal(0, 3, yy.shape), 0, 255)
        vi = np.clip(100 + 60 * np.sin(xx / (2 + i)) * np.cos(yy / 3) + rng.normal(0, 5, yy.shape), 0, 255)
        pairs.append((f"p{i}", ir.astype(np.uint8), vi.astype(np.uint8)))
    write_registered(reg, pairs)
    crop_dataset(reg, tmp_path / "patches", CropConfig(patch_size=16, stride=16, pairs_per_shard=2))
    compute_stats(tmp_path / "patches", reg, tmp_path / "stats", StatsConfig(weighting="fixed"),
                  tmp_path / "m.json")
    patches = pq.read_table(tmp_path / "stats" / "patches").to_pandas()
    images = pq.read_table(tmp_path / "stats" / "images.parquet").to_pandas()
    assert len(patches) > 20 and len(images) == 4
    for table, prefixes in ((patches, ("w_", "img_w_")), (images, ("w_",))):
        for prefix in prefixes:
            for name in ("int_ir", "int_vi", "det_ir", "det_vi"):
                assert (table[prefix + name] == 0.5).all(), prefix + name
    assert json.loads((tmp_path / "stats" / "normalisation.json").read_text())["weighting"] == "fixed"
    assert Normalisation.load(tmp_path / "stats" / "normalisation.json").weighting == "fixed"
    saved = json.loads((tmp_path / "stats" / "summary.json").read_text())
    assert saved["patch"]["w_int_ir"]["std"] == 0 and saved["image"]["w_det_ir"]["mean"] == 0.5
