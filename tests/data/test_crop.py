"""Crop step: patch positions, crops, flat-patch drop, split by pair, test list, Ray Data run."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import shared_dataset, shared_file
from pipeline.common import ray_runtime
from pipeline.common.config import ParamsError
from pipeline.data.contracts import PATCH_SCHEMA, decode_patches, read_registered_pair
from pipeline.data.crop import (
    CropConfig,
    crop_arrays,
    crop_dataset,
    patch_positions,
    plan_crop,
    read_test_list,
    split_pairs,
)
from pipeline.data.images import split_luma
from registered_fixtures import registered_from_dataset, write_registered

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


@pytest.mark.parametrize("h,w,size,stride", [(100, 150, 64, 32), (128, 128, 64, 64), (64, 200, 64, 48), (97, 70, 16, 7)])
def test_patch_positions_cover_the_image_on_the_stride_grid(h, w, size, stride):
    pos = patch_positions(h, w, size, stride)
    assert pos == patch_positions(h, w, size, stride)  # deterministic
    assert pos == sorted(pos)  # row-major
    covered = np.zeros((h, w), bool)
    for y, x in pos:
        assert 0 <= y <= h - size and 0 <= x <= w - size
        covered[y : y + size, x : x + size] = True
    assert covered.all()
    ys, xs = sorted({p[0] for p in pos}), sorted({p[1] for p in pos})
    # grid steps are the stride, except the last row/column placed flush with the border
    assert all(b - a == stride for a, b in zip(ys[:-2], ys[1:-1]))
    assert ys[-1] == h - size and xs[-1] == w - size
    assert len(pos) == len(ys) * len(xs)


def test_patch_positions_exact_grid_and_too_small():
    assert patch_positions(128, 128, 64, 64) == [(0, 0), (0, 64), (64, 0), (64, 64)]
    assert patch_positions(100, 150, 64, 32) == [(y, x) for y in (0, 32, 36) for x in (0, 32, 64, 86)]
    assert patch_positions(63, 500, 64, 64) == []
    with pytest.raises(ValueError):
        patch_positions(100, 100, 0, 8)


def test_crop_arrays_returns_the_image_content_and_drops_flat_patches():
    rng = np.random.default_rng(0)
    ir = np.full((64, 96), 40, np.uint8)
    vi = np.full((64, 96), 90, np.uint8)
    ir[:, 64:] = rng.integers(0, 255, (64, 32), dtype=np.uint8)  # right patch: IR textured only
    kept = list(crop_arrays(ir, vi, 32, 32))
    assert [(y, x) for y, x, _, _ in kept] == [(0, 0), (0, 32), (0, 64), (32, 0), (32, 32), (32, 64)]
    for y, x, a, b in kept:
        assert np.array_equal(a, ir[y : y + 32, x : x + 32]) and np.array_equal(b, vi[y : y + 32, x : x + 32])
        assert a.flags.c_contiguous and a.dtype == np.uint8
    dropped = list(crop_arrays(ir, vi, 32, 32, drop_flat=1.0))
    assert [(y, x) for y, x, _, _ in dropped] == [(0, 64), (32, 64)]  # one textured modality keeps a patch
    with pytest.raises(ValueError):
        list(crop_arrays(ir, vi[:, :50], 32, 32))


@pytest.mark.parametrize("n", [3, 4, 5, 10, 37, 221])
def test_split_by_pair_is_a_seeded_partition_with_no_empty_split(n):
    ids = [f"p{i:03d}" for i in range(n)]
    split = split_pairs(ids[::-1], FRACTIONS, seed=7)
    assert split == split_pairs(ids, FRACTIONS, seed=7)  # order of input and reruns do not matter
    parts = [set(split[s]) for s in ("train", "val", "test")]
    assert all(parts) and set.union(*parts) == set(ids) and sum(map(len, parts)) == n
    if n >= 37:
        assert abs(len(split["test"]) - round(0.1 * n)) <= 1 and abs(len(split["val"]) - round(0.1 * n)) <= 1
        assert split_pairs(ids, FRACTIONS, seed=8) != split


def test_split_of_one_or_two_pairs_and_pinned_test_list():
    assert split_pairs(["a"], FRACTIONS, 0) == {"train": ["a"], "val": [], "test": []}
    two = split_pairs(["a", "b"], FRACTIONS, 0)
    assert len(two["train"]) == 1 and len(two["val"]) == 1 and two["test"] == []
    ids = [f"p{i}" for i in range(10)]
    pinned = split_pairs(ids, FRACTIONS, 0, test_ids=["p3", "p5", "missing"])
    assert pinned["test"] == ["p3", "p5"] and pinned["val"] and len(pinned["train"]) + len(pinned["val"]) == 8
    with pytest.raises(ValueError, match="test list"):
        split_pairs(ids, FRACTIONS, 0, test_ids=["x", "y"])


def test_read_test_list_of_the_shared_subsets():
    tno = read_test_list(shared_file("data", "TNO", "subset_CDDFuse_test25.txt"))
    assert len(tno) == 25 and tno[0] == "01" and "40" in tno  # "23.png 40.png": the local name is the last one
    road = read_test_list(shared_file("data", "RoadScene", "subset_CDDFuse_test50.txt"))
    assert len(road) == 50 and road[0] == "FLIR_00211"


def test_crop_config_validation_names_the_key():
    cfg = CropConfig.from_params({"patch_size": 32})
    assert cfg.stride == 32 and cfg.fractions == FRACTIONS
    with pytest.raises(ParamsError, match="crop.fractions"):
        CropConfig.from_params({"patch_size": 32, "fractions": {"train": 0.5, "val": 0.1, "test": 0.1}})
    with pytest.raises(ParamsError, match="crop.patch_size"):
        CropConfig.from_params({"stride": 8})
    with pytest.raises(ParamsError, match="crop.drop_flat"):
        CropConfig.from_params({"patch_size": 32, "drop_flat": -1})


def test_plan_skips_pairs_smaller_than_a_patch(tmp_path):
    big, small = np.zeros((80, 80), np.uint8), np.zeros((20, 90), np.uint8)
    write_registered(tmp_path, [(f"p{i}", big, big) for i in range(4)] + [("tiny", small, small)])
    items, record = plan_crop(tmp_path, CropConfig(patch_size=32))
    assert [i["pair_id"] for i in items] == ["p0", "p1", "p2", "p3"]
    assert "tiny" in record["no_patches"] and "smaller" in record["no_patches"]["tiny"]
    assert sorted(record["train"] + record["val"] + record["test"]) == ["p0", "p1", "p2", "p3", "tiny"]


def test_crop_dataset_on_real_pairs_is_deterministic(tmp_path, ray_local, monkeypatch):
    data = shared_dataset("RoadScene")
    reg = tmp_path / "registered"
    stems = registered_from_dataset(data, reg, 5, rejected=["bad_pair"])
    cfg = CropConfig(patch_size=96, stride=80, drop_flat=1.0, pairs_per_shard=2, seed=3)
    first = crop_dataset(reg, tmp_path / "p1", cfg)  # 3 shards -> 3 tasks on 2 CPUs
    monkeypatch.setattr(ray_runtime, "TASKS_PER_CPU", 1)
    second = crop_dataset(reg, tmp_path / "p2", cfg)  # 2 tasks, one of them with 2 shards
    third = crop_dataset(reg, tmp_path / "p3", cfg, runner=ray_runtime.run_serially)  # no Ray
    parts1 = sorted(p.name for p in (tmp_path / "p1").glob("part-*.parquet"))
    assert len(parts1) == 3  # 5 pairs, 2 per shard
    for other in ("p2", "p3"):
        assert sorted(p.name for p in (tmp_path / other).glob("part-*.parquet")) == parts1
        for name in parts1:  # same params -> same files, rows and bytes, whatever the tasks
            assert (tmp_path / "p1" / name).read_bytes() == (tmp_path / other / name).read_bytes()
        assert (tmp_path / "p1" / "split.json").read_text() == (tmp_path / other / "split.json").read_text()
    assert first == second == third
    table = pq.read_table([str(tmp_path / "p1" / n) for n in parts1])  # split.json sits beside the shards
    assert table.schema.remove_metadata() == PATCH_SCHEMA
    rows = table.to_pydict()
    assert rows["pair_id"] == sorted(rows["pair_id"]) and set(rows["pair_id"]) == set(stems)
    split = json.loads((tmp_path / "p1" / "split.json").read_text())
    assert split["seed"] == 3 and sorted(split["train"] + split["val"] + split["test"]) == stems
    assert all(split[s] for s in ("train", "val", "test"))
    assert split["counts"] == {s: rows["split"].count(s) for s in ("train", "val", "test")}
    split_of = {p: s for s in ("train", "val", "test") for p in split[s]}
    assert all(split_of[p] == s for p, s in zip(rows["pair_id"], rows["split"]))
    # decoded patches are the registered IR and visible luma at their positions
    ir, vi = read_registered_pair(reg, stems[2])
    y, _ = split_luma(vi)
    idx = [i for i, p in enumerate(rows["pair_id"]) if p == stems[2]]
    expected = patch_positions(*ir.shape, 96, 80)
    assert [(rows["y"][i], rows["x"][i]) for i in idx] == expected  # RoadScene has no flat 96px patch
    patches_ir = decode_patches([rows["ir"][i] for i in idx], 96)
    patches_vi = decode_patches([rows["vi"][i] for i in idx], 96)
    for k, (py, px) in enumerate(expected):
        assert np.array_equal(patches_ir[k], ir[py : py + 96, px : px + 96])
        assert np.array_equal(patches_vi[k], y[py : py + 96, px : px + 96])


def test_crop_stage_corrupt_registered_image_is_one_clear_line(tmp_path, ray_local, capsys):
    from stages.crop import main

    rng = np.random.default_rng(0)
    pairs = [(f"p{i}", rng.integers(0, 255, (40, 40), np.uint8), rng.integers(0, 255, (40, 40), np.uint8)) for i in range(4)]
    reg = write_registered(tmp_path / "registered", pairs)
    (tmp_path / "test.txt").write_text("# pinned\np3\n")
    (tmp_path / "params.yaml").write_text(f"crop:\n  patch_size: 32\n  stride: 32\n  test_list: {tmp_path / 'test.txt'}\n")
    argv = ["--params", str(tmp_path / "params.yaml"), "--registered", str(reg), "--out", str(tmp_path / "patches")]
    assert main(argv) == 0
    split = json.loads((tmp_path / "patches" / "split.json").read_text())
    assert split["test"] == ["p3"] and split["test_list_sha256"] == hashlib.sha256(b"# pinned\np3\n").hexdigest()
    before = sorted(p.name for p in (tmp_path / "patches").iterdir())

    (reg / "vi" / "p1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    capsys.readouterr()
    assert main(argv) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("crop: error: ") and "p1.png" in last and "cannot decode" in last and "RayTaskError" not in last
    assert sorted(p.name for p in (tmp_path / "patches").iterdir()) == before  # the old output is kept
