"""The ship stage: only a champion is shipped, with its card, and a failing ship writes nothing."""

from __future__ import annotations

import json

import pytest
from train_fixtures import TINY_MODEL

from pipeline.evaluate.metrics import HEADLINE
from pipeline.evaluate.ship import ShipConfig, ship, wins


@pytest.fixture()
def inputs(tmp_path):
    from pipeline.model.network import build_model
    from pipeline.model.weights import save_checkpoint

    args = dict(TINY_MODEL["args"])
    ckpt = save_checkpoint(tmp_path / "best.pt", build_model("mda", **args), "mda", args)
    means = {"ours": {m: 2.0 for m in HEADLINE}, "average": {m: 1.0 for m in HEADLINE},
             "official": {**{m: 1.0 for m in HEADLINE}, "SSIM": 3.0}}
    (tmp_path / "means.json").write_text(json.dumps(means))
    (tmp_path / "train.json").write_text(json.dumps({"steps": 6, "stopped_by": "steps", "fit_time_s": 9.5, "run_id": "r1"}))
    (tmp_path / "split.json").write_text(json.dumps({"seed": 0, "train": ["a", "b"], "val": ["c"], "test": ["d"]}))
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "datasets.json").write_text(json.dumps({"a": "X", "b": "Y", "c": "X", "d": "Z"}))
    return tmp_path, ckpt


def _ship(root, ckpt, decision):
    (root / "promotion.json").write_text(json.dumps(decision))
    return ship(ShipConfig(), ckpt, root / "train.json", root / "means.json", root / "promotion.json",
                root / "split.json", root / "out" / "m.pt", root / "out" / "m.json", raw_dir=root / "raw",
                params={"model": {"name": "mda"}, "loss": {"style": {"enabled": True}}})


def test_a_champion_is_shipped_with_its_card(inputs):
    root, ckpt = inputs
    card = _ship(root, ckpt, {"decision": "champion", "model_name": "m", "version": "3", "reasons": []})
    assert (root / "out" / "m.pt").read_bytes() == ckpt.read_bytes()
    assert json.loads((root / "out" / "m.json").read_text()) == card
    assert card["registry"] == {"model_name": "m", "version": "3", "alias": "champion"}
    assert card["data"]["train_pairs"] == {"X": 1, "Y": 1} and card["data"]["test_pairs_total"] == 1
    assert card["train_steps"] == 6 and card["tno25"] == {m: 2.0 for m in HEADLINE}
    assert set(card["tno25_baselines"]) == {"average", "authors' weights"} and "ImageNet" in card["licence"]
    assert wins(card, "authors' weights") == [m for m in HEADLINE if m != "SSIM"]


def test_a_challenger_is_not_shipped_and_nothing_is_written(inputs):
    root, ckpt = inputs
    with pytest.raises(ValueError, match="not promoted .*SSIM fails"):
        _ship(root, ckpt, {"decision": "challenger", "reasons": ["SSIM fails"]})
    assert not (root / "out").exists()
