"""Stage hand-off files: the manifest, registered pairs, split.json and patch bytes, each with one reader."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import shared_dataset
from pipeline.data.contracts import (
    MANIFEST_SCHEMA,
    decode_patches,
    read_accepted_pairs,
    read_registered_pair,
    read_split,
)
from pipeline.data.images import ImageError, write_image
from registered_fixtures import registered_from_dataset, write_registered


def test_manifest_errors_and_rejected_rows(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.parquet"):
        read_accepted_pairs(tmp_path)
    img = np.zeros((40, 40), np.uint8)
    write_registered(tmp_path, [("b", img, img), ("a", img, img)], rejected=["c"])
    assert [r["pair_id"] for r in read_accepted_pairs(tmp_path)] == ["a", "b"]
    write_registered(tmp_path / "none", [], rejected=["c"])
    with pytest.raises(ValueError, match="no pair with status 'ok'"):
        read_accepted_pairs(tmp_path / "none")


def test_real_register_output_has_the_schema_the_readers_expect(tmp_path, ray_local):
    """The register stage's own manifest (not a hand-made one) is what crop and stats read."""
    tno = shared_dataset("TNO")
    stems = registered_from_dataset(tno, tmp_path / "reg", 2, rejected=["lonely"])
    table = pq.read_table(tmp_path / "reg" / "manifest.parquet")
    assert table.schema.equals(MANIFEST_SCHEMA)
    accepted = read_accepted_pairs(tmp_path / "reg")
    assert [r["pair_id"] for r in accepted] == sorted(stems)
    statuses = dict(zip(table.column("pair_id").to_pylist(), table.column("status").to_pylist()))
    assert statuses["lonely"] == "rejected"
    ir, vi = read_registered_pair(tmp_path / "reg", stems[0])
    assert ir.dtype == np.uint8 and ir.ndim == 2 and vi.shape[:2] == ir.shape
    assert (accepted[0]["height"], accepted[0]["width"]) == ir.shape


def test_registered_pair_errors_name_the_file(tmp_path):
    write_image(tmp_path / "ir" / "p.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(ImageError, match=r"vi/p.png"):
        read_registered_pair(tmp_path, "p")
    write_image(tmp_path / "vi" / "p.png", np.zeros((10, 14, 3), np.uint8))
    with pytest.raises(ImageError, match=r"vi/p.png: size 14x10 differs from IR"):
        read_registered_pair(tmp_path, "p")


def test_read_split(tmp_path):
    path = tmp_path / "split.json"
    with pytest.raises(FileNotFoundError, match="split file not found.*run the crop stage"):
        read_split(path)
    path.write_text(json.dumps({"train": ["a"], "val": [], "test": ["b"], "seed": 0}))
    assert read_split(path)["test"] == ["b"]
    path.write_text(json.dumps({"train": ["a"], "test": ["b"]}))
    with pytest.raises(ValueError, match="list of pair ids under 'val'"):
        read_split(path)
    path.write_text(json.dumps({"train": ["a"], "val": [1], "test": []}))
    with pytest.raises(ValueError, match="'val'"):
        read_split(path)


def test_decode_patches_round_trip_and_errors():
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    np.testing.assert_array_equal(decode_patches([p.tobytes() for p in patches], 8), patches)
    assert decode_patches([], 8).shape == (0, 8, 8)
    with pytest.raises(ValueError, match="expected 2 x 8x8"):
        decode_patches([patches[0].tobytes(), b"short"], 8)
