"""``mda fuse`` without --weights/--model uses the shipped pretrained model (issue 10)."""

from __future__ import annotations

import logging

import numpy as np

from pipeline.cli import main
from pipeline.cli.fuse import DEFAULT_WEIGHTS
from pipeline.data.images import read_raw, write_image
from conftest import REPO


def _pair(tmp_path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:56]
    ir = np.clip(60 + 150 * np.exp(-((yy - 20) ** 2 + (xx - 28) ** 2) / 60.0), 0, 255).astype(np.uint8)
    vi = np.clip(100 + 60 * np.sin(xx / 3.0) + rng.normal(0, 5, (40, 56)), 0, 255).astype(np.uint8)
    write_image(tmp_path / "ir.png", ir)
    write_image(tmp_path / "vi.png", vi)
    return tmp_path / "ir.png", tmp_path / "vi.png"


def test_default_weights_are_the_shipped_model():
    assert DEFAULT_WEIGHTS == REPO / "models" / "pretrained" / "mda_cpu.pt"
    assert DEFAULT_WEIGHTS.is_file()


def test_fuse_without_a_model_uses_the_shipped_one(tmp_path, caplog, capsys):
    ir, vi = _pair(tmp_path)
    with caplog.at_level(logging.INFO, logger="pipeline.cli.fuse"):
        assert main(["fuse", str(ir), str(vi), "-o", str(tmp_path / "default.png"), "--threads", "1"]) == 0
    assert "mda_cpu.pt" in caplog.text
    assert main(["fuse", str(ir), str(vi), "-o", str(tmp_path / "explicit.png"), "--threads", "1",
                 "--weights", str(DEFAULT_WEIGHTS)]) == 0
    default, explicit = read_raw(tmp_path / "default.png"), read_raw(tmp_path / "explicit.png")
    assert default.shape == (40, 56) and np.array_equal(default, explicit)
