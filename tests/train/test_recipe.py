"""The CPU training recipe (``mda recipe``) and the seeded patch subset of the train stage (issue 10)."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO, shared_dataset, shared_file
from pipeline.train.data import _KeepRows, select_train_rows
from pipeline.train.recipe import (
    DEFAULTS,
    CropSampler,
    PairImages,
    load_recipe,
    lr_factor,
    progress,
    table_markdown,
)


# ---------------------------------------------------------------- max_train_patches: seeded random subset
def _patch_files(tmp_path, n_pairs=6, per_pair=10):
    files = []
    for p in range(n_pairs):
        rows = {"pair_id": [f"p{p}"] * per_pair, "y": list(range(per_pair)), "x": [0] * per_pair,
                "split": ["train" if p < 5 else "val"] * per_pair}
        f = tmp_path / f"part-{p:05d}.parquet"
        pq.write_table(pa.table(rows), f)
        files.append(f)
    return files


def test_max_train_patches_is_a_seeded_random_subset(tmp_path):
    files = _patch_files(tmp_path)
    keep = select_train_rows(files, 12, seed=0)
    assert len(keep) == 12 and all(k[0] != "p5" for k in keep)           # train rows only
    assert keep == select_train_rows(files, 12, seed=0)                    # seeded
    assert keep != select_train_rows(files, 12, seed=1)
    assert len({k[0] for k in keep}) >= 3                                  # not the first 12 in file order
    assert keep != {(f"p{i // 10}", i % 10, 0) for i in range(12)}
    assert select_train_rows(files, 50, seed=0) is None                    # all 50 train rows fit: keep all
    table = pq.read_table(files[0])
    kept = _KeepRows(keep)(table)
    assert kept.num_rows == sum(k[0] == "p0" for k in keep)


# ---------------------------------------------------------------- config, schedule, sampler, table
def test_recipe_file_loads_and_rejects_unknown_keys(tmp_path):
    cfg = load_recipe(REPO / "recipes" / "cpu.yaml")
    assert cfg["data"]["test_list"].endswith("TNO/subset_CDDFuse_test25.txt")
    assert cfg["train"]["max_seconds"] <= 30 * 60                          # the training budget
    assert load_recipe(None, ["train.steps=7"])["train"]["steps"] == 7
    assert load_recipe(None, smoke=True)["train"]["steps"] < 20
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {stpes: 3}\n")
    with pytest.raises(ValueError, match="stpes"):
        load_recipe(bad)
    with pytest.raises(ValueError, match="unknown recipe key"):
        load_recipe(None, ["train.lrr=1"])


def test_schedule_warm_up_then_cosine_on_steps_or_time():
    assert lr_factor(0, 0.0, 10, 0.05) == pytest.approx(0.1)
    assert lr_factor(9, 0.01, 10, 0.05) == pytest.approx(1.0)
    assert lr_factor(50, 0.5, 10, 0.05) == pytest.approx(0.05 + 0.95 * 0.5)
    assert lr_factor(99, 1.0, 10, 0.05) == pytest.approx(0.05)
    assert progress(50, 100, 10.0, None) == 0.5
    assert progress(50, 100, 90.0, 100.0) == 0.9                           # the time budget runs ahead
    assert progress(200, 100, 0.0, None) == 1.0


def test_crop_sampler_is_seeded_and_weighted():
    rng = np.random.default_rng(0)
    imgs = [PairImages("A", f"a{i}", rng.integers(0, 255, (40, 50), np.uint8), rng.integers(0, 255, (40, 50), np.uint8))
            for i in range(3)] + [PairImages("B", "b0", np.zeros((20, 20), np.uint8), np.zeros((20, 20), np.uint8))]
    w = np.array([[0.7, 0.3, 0.6, 0.4]] * 4, np.float32)
    s1 = CropSampler(imgs, w, 32, 4, "pairs", seed=3)
    s2 = CropSampler(imgs, w, 32, 4, "pairs", seed=3)
    assert len(s1.images) == 3                                             # the 20x20 pair is smaller than a crop
    ir1, vi1, w1 = s1.next()
    ir2, _, _ = s2.next()
    assert ir1.shape == (4, 1, 32, 32) and float(ir1.max()) <= 1.0 and np.array_equal(ir1.numpy(), ir2.numpy())
    assert set(w1) == {"int_ir", "int_vi", "det_ir", "det_vi"} and float(w1["int_ir"][0]) == pytest.approx(0.7)
    d = CropSampler(imgs + [PairImages("C", "c0", imgs[0].ir, imgs[0].vi)], np.concatenate([w, w[:1]]), 32, 4,
                    "datasets", 0)
    assert d.p[-1] == pytest.approx(0.5)                                   # dataset C alone gets half the draws


def test_table_counts_wins():
    row = {m: 1.0 for m in ("EN", "SD", "SF", "MI", "SCD", "VIF", "Qabf", "SSIM")}
    md = table_markdown({"ours": {**row, "SSIM": 0.5}, "average": {m: 0.9 for m in row}}, 25)
    assert "| ours |" in md and "| SeAFusion (published) |" in md
    assert "ours beats average on 7/8" in md


# ---------------------------------------------------------------- smoke run of the recipe
def test_recipe_smoke_run(tmp_path):
    """A few pairs and steps through the whole recipe: train, save, fuse, score, table, card."""
    shared_dataset("TNO")
    shared_dataset("RoadScene")
    shared_dataset("MSRS")
    from pipeline.cli import main

    out = tmp_path / "smoke"
    rc = main(["recipe", "--smoke", "--out", str(out), "-S", "data.max_test_pairs=2",
               "-S", "data.root=" + str(shared_dataset("TNO").parent),
               "-S", "data.test_list=" + str(shared_file("data", "TNO", "subset_CDDFuse_test25.txt"))])
    assert rc == 0
    assert (out / "model.pt").is_file() and (out / "table.md").is_file()
    table = (out / "table.md").read_text()
    assert "| ours |" in table and "| average |" in table and "| maximum |" in table
    card = json.loads((out / "model_card.json").read_text())
    assert card["data"]["train_pairs"] == {"RoadScene": 2, "MSRS": 2, "TNO": 2} and card["data"]["test_pairs"] == 2
    assert card["output"] == str(out / "model.pt") and card["train_steps"] == 6
    assert set(card["tno25"]) >= {"EN", "SD", "SF", "MI", "SCD", "VIF", "Qabf", "SSIM"}
    assert all(math.isfinite(v) for v in card["tno25"].values())
    assert "train.steps" in card["params_differing_from_params_yaml"]
    for stem in ("01", "02"):
        assert (out / "fused" / "ours" / f"{stem}.png").is_file()
