"""Tests of the synthetic demo dataset: determinism, layout and complementarity."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.data.demo import generate_demo, synth_pair
from pipeline.data.images import find_pairs, read_ir, read_visible


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = generate_demo(tmp_path / "a", num_pairs=3, height=64, width=96, seed=7)
    generate_demo(tmp_path / "b", num_pairs=3, height=64, width=96, seed=7)
    generate_demo(tmp_path / "c", num_pairs=3, height=64, width=96, seed=8)
    assert a == ["demo_000", "demo_001", "demo_002"]
    for sub in ("ir", "vi"):
        for stem in a:
            ba = (tmp_path / "a" / sub / f"{stem}.png").read_bytes()
            assert ba == (tmp_path / "b" / sub / f"{stem}.png").read_bytes()
            assert ba != (tmp_path / "c" / sub / f"{stem}.png").read_bytes()


def test_layout_is_readable_pairs(tmp_path):
    generate_demo(tmp_path, num_pairs=2, height=48, width=64, seed=1)
    pairs, unmatched = find_pairs(tmp_path / "ir", tmp_path / "vi")
    assert [p.stem for p in pairs] == ["demo_000", "demo_001"] and unmatched == []
    assert read_ir(pairs[0].ir).shape == (48, 64)
    assert read_visible(pairs[0].vi).shape == (48, 64, 3)


@pytest.mark.parametrize("index", range(4))
def test_modalities_are_complementary(index):
    p = synth_pair(2024, index, 160, 224)
    m = p.targets
    assert m.sum() > 100
    ring = cv2.dilate(m.astype(np.uint8), np.ones((11, 11), np.uint8)).astype(bool) & ~m
    ir = p.ir.astype(np.float64)
    y = cv2.cvtColor(p.vi, cv2.COLOR_BGR2GRAY).astype(np.float64)
    # warm targets: far brighter than their surroundings in IR ...
    assert ir[m].mean() - ir[ring].mean() > 40
    # ... and camouflaged in the visible image
    assert abs(y[m].mean() - y[ring].mean()) < 12
    # visible: texture and edges (far more gradient energy than the smooth IR), colour, dark regions
    grad = lambda img: np.abs(np.diff(img, axis=1)).mean() + np.abs(np.diff(img, axis=0)).mean()
    assert grad(y) > 1.2 * grad(ir)
    crcb = cv2.cvtColor(p.vi, cv2.COLOR_BGR2YCrCb)[:, :, 1:].astype(np.float64)
    assert crcb.std(axis=(0, 1)).max() > 5
    assert (y < 40).mean() > 0.10


def test_bad_arguments():
    with pytest.raises(ValueError, match="32x32"):
        synth_pair(0, 0, 16, 64)
    with pytest.raises(ValueError, match="num_pairs"):
        generate_demo("/nonexistent", num_pairs=0)


def test_cli_and_stage(tmp_path):
    from pipeline.cli import main
    from stages.demo import main as stage_main

    assert main(["demo", "-o", str(tmp_path / "cli"), "-n", "2", "--height", "40", "--width", "48"]) == 0
    assert len(list((tmp_path / "cli" / "vi").glob("*.png"))) == 2
    params = tmp_path / "params.yaml"
    params.write_text("demo:\n  num_pairs: 2\n  height: 40\n  width: 40\n  seed: 3\n")
    assert stage_main(["--params", str(params), "--out", str(tmp_path / "stage")]) == 0
    assert read_ir(tmp_path / "stage" / "ir" / "demo_001.png").shape == (40, 40)
    params.write_text("demo:\n  num_pairs: 0\n")
    assert stage_main(["--params", str(params), "--out", str(tmp_path / "bad")]) == 1
