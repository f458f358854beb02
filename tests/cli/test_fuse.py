"""``mda fuse`` end to end on real pairs (small crops to save CPU), odd sizes and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.data.images import read_ir, read_raw, read_visible, write_image
from pipeline.model.inference import Fuser
from pipeline.model.network import build_model
from pipeline.model.weights import save_checkpoint
from conftest import shared_dataset, shared_file


@pytest.fixture(scope="module")
def official():
    return str(shared_file("models", "mda_official", "fusion_model.pth"))


def _crop_pair(dataset: str, name_ir: str, name_vi: str, box, ir_dir, vi_dir, stem: str) -> None:
    root = shared_dataset(dataset)
    y0, y1, x0, x1 = box
    write_image(ir_dir / f"{stem}.png", read_ir(root / "ir" / name_ir)[y0:y1, x0:x1])
    write_image(vi_dir / f"{stem}.png", read_visible(root / "vi" / name_vi)[y0:y1, x0:x1])


def test_fuse_msrs_640x480_colour_pair(tmp_path, official, capsys):
    root = shared_dataset("MSRS")
    out = tmp_path / "fused.png"
    rc = main(["fuse", str(root / "ir" / "00001D.png"), str(root / "vi" / "00001D.png"),
               "-o", str(out), "--weights", official, "--threads", "2"])
    assert rc == 0, capsys.readouterr().err
    fused = read_raw(out)
    assert fused.shape == (480, 640, 3) and fused.dtype == np.uint8
    assert fused.min() == 0 or fused.max() == 255  # authors' weights: min-max stretch by default
    assert "1 fused, 0 failed" in capsys.readouterr().err


def test_fuse_folders_real_pairs_and_bad_input(tmp_path, official, capsys):
    ir_dir, vi_dir, out_dir = tmp_path / "ir", tmp_path / "vi", tmp_path / "out"
    _crop_pair("TNO", "01.png", "01.png", (200, 261, 300, 383), ir_dir, vi_dir, "tno_odd")  # 61x83 gray
    rs = shared_dataset("RoadScene")
    _crop_pair("RoadScene", "FLIR_00006.jpg", "FLIR_00006.jpg", (40, 104, 60, 156), ir_dir, vi_dir, "road")
    (ir_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    write_image(vi_dir / "corrupt.png", np.zeros((16, 16), np.uint8))
    write_image(ir_dir / "alone.png", np.zeros((16, 16), np.uint8))  # no visible partner
    write_image(ir_dir / "mismatch.png", np.zeros((16, 16), np.uint8))
    write_image(vi_dir / "mismatch.png", np.zeros((16, 24, 3), np.uint8))
    assert read_visible(rs / "vi" / "FLIR_00006.jpg").ndim == 3

    rc = main(["fuse", "--ir", str(ir_dir), "--vi", str(vi_dir), "-o", str(out_dir), "--weights", official])
    err = capsys.readouterr().err
    assert rc == 1
    assert sorted(p.name for p in out_dir.iterdir()) == ["road.png", "tno_odd.png"]  # the good pairs
    assert read_raw(out_dir / "tno_odd.png").shape == (61, 83)  # gray in, gray out, odd size
    road = read_raw(out_dir / "road.png")
    assert road.shape == (64, 96, 3) and not np.array_equal(road[:, :, 0], road[:, :, 2])  # colour kept
    assert "corrupt.png" in err and "cannot decode" in err
    assert "alone.png" in err and "missing visible partner" in err
    assert "mismatch.png" in err and "differs" in err
    assert "2 fused, 3 failed" in err


def test_fuse_our_checkpoint_defaults_to_clip(tmp_path, capsys):
    torch.manual_seed(0)
    args = {"width": 8, "reduction": 2, "up2_channels": 4, "up4_channels": 2}
    model = build_model("mda", **args)
    ckpt = save_checkpoint(tmp_path / "m.pt", model, "mda", args)
    rng = np.random.default_rng(0)
    ir, vi = rng.integers(0, 256, (21, 30), np.uint8), rng.integers(0, 256, (21, 30), np.uint8)
    write_image(tmp_path / "a_ir.png", ir)
    write_image(tmp_path / "a_vi.png", vi)
    out = tmp_path / "o.png"
    assert main(["fuse", str(tmp_path / "a_ir.png"), str(tmp_path / "a_vi.png"), "-o", str(out),
                 "--weights", str(ckpt)]) == 0
    np.testing.assert_array_equal(read_raw(out), Fuser(model.eval(), postprocess="clip")(ir, vi))
    assert main(["fuse", str(tmp_path / "a_ir.png"), str(tmp_path / "a_vi.png"), "-o", str(out),
                 "--weights", str(ckpt), "--postprocess", "minmax"]) == 0
    stretched = read_raw(out)
    assert stretched.min() == 0 and stretched.max() == 255


def test_fuse_usage_errors(tmp_path, capsys, monkeypatch):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    write_image(a, np.zeros((8, 8), np.uint8))
    write_image(b, np.zeros((8, 8), np.uint8))
    monkeypatch.setattr("pipeline.cli.fuse.DEFAULT_WEIGHTS", tmp_path / "no_shipped_model.pt")
    assert main(["fuse", str(a), str(b), "-o", str(tmp_path / "o.png")]) == 1
    assert "no model given" in capsys.readouterr().err
    assert main(["fuse", str(a), str(b), "-o", str(tmp_path / "o.png"), "--model", "models:/mda@champion"]) == 1
    err = capsys.readouterr().err
    assert "cannot resolve 'models:/mda@champion'" in err or "holds no model" in err, err
    assert main(["fuse", str(a), "-o", str(tmp_path / "o.png"), "--weights", str(a)]) == 1
    assert "two files" in capsys.readouterr().err
    assert main(["fuse", str(a), str(b), "-o", str(tmp_path / "o.png"), "--weights", str(a)]) == 1
    assert "a.png: not a readable PyTorch weights file" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()
