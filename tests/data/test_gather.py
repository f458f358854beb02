"""The gather stage: one raw folder of relative links from several datasets (the recipe's first step)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipeline.common.config import ParamsError
from pipeline.data.gather import GatherConfig, gather, read_datasets
from pipeline.data.images import find_pairs, write_image


def _dataset(root, name, stems):
    for m in ("ir", "vi"):
        for s in stems:
            write_image(root / name / m / f"{s}.png", np.full((8, 8), len(s), np.uint8))


def test_gather_links_every_pair_relatively_and_records_the_dataset(tmp_path):
    _dataset(tmp_path / "src", "A", ["a1", "a2"])
    _dataset(tmp_path / "src", "B", ["b1"])
    cfg = GatherConfig(root=str(tmp_path / "src"), datasets=("A", "B"))
    assert cfg.check_inputs() == {"A": 2, "B": 1}
    assert gather(cfg, tmp_path / "raw") == {"A": 2, "B": 1}
    link = tmp_path / "raw" / "ir" / "b1.png"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))  # the same hash in every checkout
    assert [p.stem for p in find_pairs(tmp_path / "raw" / "ir", tmp_path / "raw" / "vi")[0]] == ["a1", "a2", "b1"]
    assert read_datasets(tmp_path / "raw") == {"a1": "A", "a2": "A", "b1": "B"}
    assert json.loads((tmp_path / "raw" / "datasets.json").read_text())["b1"] == "B"


def test_gather_refuses_missing_empty_or_clashing_datasets(tmp_path):
    _dataset(tmp_path, "A", ["x"])
    _dataset(tmp_path, "B", ["x"])
    (tmp_path / "E" / "ir").mkdir(parents=True)
    (tmp_path / "E" / "vi").mkdir(parents=True)
    with pytest.raises(ParamsError, match="gather.datasets.*C/ir is not a folder"):
        GatherConfig(root=str(tmp_path), datasets=("A", "C")).check_inputs()
    with pytest.raises(ParamsError, match="no IR/visible pair"):
        GatherConfig(root=str(tmp_path), datasets=("E",)).check_inputs()
    with pytest.raises(ValueError, match="'x' is in both A and B"):
        gather(GatherConfig(root=str(tmp_path), datasets=("A", "B")), tmp_path / "raw")
    with pytest.raises(ParamsError, match="names a dataset twice"):
        GatherConfig.from_params({"datasets": ["A", "A"]})
