"""Tests of the register step: alignment accuracy on real data, validation, outputs, CLI."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import shared_dataset
from pipeline.data.demo import generate_demo, synth_pair
from pipeline.data.images import read_ir, read_visible, split_luma, write_image
from pipeline.data.contracts import MANIFEST_SCHEMA
from pipeline.data.register import (
    AlignOptions,
    NoPairsError,
    displacement_px,
    estimate_alignment,
    register_dataset,
    register_pair,
    warp_visible,
)


def _h(m: np.ndarray) -> np.ndarray:
    return np.vstack([m, [0.0, 0.0, 1.0]])


def _known(h: int, w: int, dx: float, dy: float, deg: float) -> np.ndarray:
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), deg, 1.0)
    m[:, 2] += (dx, dy)
    return m


def _real_pair(name: str, stem: str, ext: str):
    root = shared_dataset(name)
    return read_ir(root / "ir" / f"{stem}{ext}"), read_visible(root / "vi" / f"{stem}{ext}")


@pytest.mark.parametrize("name,stem,ext", [("RoadScene", "FLIR_00018", ".jpg"), ("RoadScene", "FLIR_00233", ".jpg")])
def test_recovers_known_shift_and_rotation(name, stem, ext):
    ir, vi = _real_pair(name, stem, ext)
    h, w = ir.shape
    y, _ = split_luma(vi)
    base = estimate_alignment(ir, y)  # the pair's own residual misalignment (a few px at most)
    assert base.error is None and base.shift_px < 5
    k = _known(h, w, 3.5, -2.25, 1.0)  # warped(x) = vi(k x)
    warped = warp_visible(vi, k, h, w)
    est = estimate_alignment(ir, split_luma(warped)[0])
    assert est.error is None
    truth = np.linalg.inv(_h(k)) @ _h(base.warp)  # warped(truth x) = vi(base x)
    err = displacement_px((np.linalg.inv(truth) @ _h(est.warp))[:2], h, w)
    assert err < 0.5, f"transform error {err:.2f} px over corners/centre"
    # correcting with the estimate gives a pair that re-registers to (near) identity
    again = estimate_alignment(ir, split_luma(warp_visible(warped, est.warp, h, w))[0])
    assert again.shift_px < 0.5


def test_aligned_demo_pair_gives_identity_and_is_left_unchanged(tmp_path):
    generate_demo(tmp_path / "raw", num_pairs=2, height=160, width=224, seed=2024)
    for stem in ("demo_000", "demo_001"):
        row = register_pair(stem, tmp_path / "raw/ir" / f"{stem}.png", tmp_path / "raw/vi" / f"{stem}.png",
                            tmp_path / "out", AlignOptions())
        assert row["status"] == "ok" and not row["corrected"] and row["shift_px"] < 1.0
        for sub, reader in (("ir", read_ir), ("vi", read_visible)):
            src, out = reader(tmp_path / "raw" / sub / f"{stem}.png"), reader(tmp_path / "out" / sub / f"{stem}.png")
            assert np.array_equal(src, out)


def test_misaligned_demo_pair_is_corrected(tmp_path):
    p = synth_pair(2024, 1, 160, 224)
    h, w = p.ir.shape
    k = _known(h, w, 3.5, -2.25, 0.0)
    write_image(tmp_path / "ir.png", p.ir)
    write_image(tmp_path / "vi.png", warp_visible(p.vi, k, h, w))
    row = register_pair("x", tmp_path / "ir.png", tmp_path / "vi.png", tmp_path / "out", AlignOptions())
    assert row["corrected"] and row["align_error"] is None
    err = displacement_px((_h(k) @ _h(np.reshape(row["transform"], (2, 3))))[:2], h, w)
    assert err < 1.0
    fixed = read_visible(tmp_path / "out/vi/x.png")
    inner = (slice(10, -10), slice(10, -10))
    assert fixed.shape == p.vi.shape
    assert np.abs(fixed[inner].astype(int) - p.vi[inner]).mean() < np.abs(
        read_visible(tmp_path / "vi.png")[inner].astype(int) - p.vi[inner]).mean() / 2


def test_implausible_estimate_leaves_pair_unchanged(tmp_path):
    p = synth_pair(2024, 1, 160, 224)
    h, w = p.ir.shape
    write_image(tmp_path / "ir.png", p.ir)
    shifted = warp_visible(p.vi, _known(h, w, 4.0, 0.0, 0.0), h, w)
    write_image(tmp_path / "vi.png", shifted)
    row = register_pair("x", tmp_path / "ir.png", tmp_path / "vi.png", tmp_path / "out",
                        AlignOptions(max_correction_px=2.0))
    assert row["status"] == "ok" and not row["corrected"] and "max_correction_px" in row["align_error"]
    assert np.array_equal(read_visible(tmp_path / "out/vi/x.png"), shifted)


def test_align_options_from_params():
    from pipeline.common.config import ParamsError

    assert AlignOptions.from_params({"motion": "affine", "max_shift_px": 2}).max_shift_px == 2.0
    with pytest.raises(ParamsError, match="register.motion"):
        AlignOptions.from_params({"motion": "homography"})
    with pytest.raises(ParamsError, match="register.max_shift_px"):
        AlignOptions.from_params({"max_shift_px": -1})


def _bad_inputs(root):
    """One good pair and one pair per rejection reason."""
    p = synth_pair(5, 0, 64, 80)
    ir, vi = root / "ir", root / "vi"
    write_image(ir / "good.png", p.ir)
    write_image(vi / "good.png", p.vi)
    write_image(ir / "corrupt.png", p.ir)
    (vi).mkdir(parents=True, exist_ok=True)
    (vi / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    write_image(ir / "size.png", p.ir)
    write_image(vi / "size.jpg", p.vi[:, :70])
    write_image(ir / "flat_ir.png", np.full_like(p.ir, 9))
    write_image(vi / "flat_ir.png", p.vi)
    write_image(ir / "flat_vi.png", p.ir)
    write_image(vi / "flat_vi.png", np.full_like(p.vi, 200))
    write_image(ir / "lonely_ir.png", p.ir)
    write_image(vi / "lonely_vi.bmp", p.vi)
    cv2.imwrite(str(ir / "float.tiff"), p.ir.astype(np.float32) / 255.0)
    write_image(vi / "float.png", p.vi)
    return {
        "corrupt": "unreadable", "size": "size_mismatch", "flat_ir": "constant_image", "flat_vi": "constant_image",
        "lonely_ir": "missing_partner", "lonely_vi": "missing_partner", "float": "unsupported_format",
    }


def test_each_rejection_reason(tmp_path, ray_local):
    expected = _bad_inputs(tmp_path / "raw")
    summary = register_dataset(tmp_path / "raw/ir", tmp_path / "raw/vi", tmp_path / "out", progress=False)
    assert (summary.found, summary.accepted) == (8, 1)
    assert summary.rejected == {"constant_image": 2, "missing_partner": 2, "size_mismatch": 1,
                                "unreadable": 1, "unsupported_format": 1}
    table = pq.read_table(tmp_path / "out/manifest.parquet")
    assert table.schema.equals(MANIFEST_SCHEMA)
    rows = {r["pair_id"]: r for r in table.to_pylist()}
    assert rows["good"]["status"] == "ok" and rows["good"]["reason"] is None
    assert len(rows["good"]["transform"]) == 6 and rows["good"]["vi_channels"] == 3
    for stem, code in expected.items():
        assert rows[stem]["status"] == "rejected" and rows[stem]["reason"].startswith(code + ":"), rows[stem]
    rejected = {r["pair_id"]: r for r in json.loads((tmp_path / "out/rejected.json").read_text())}
    assert set(rejected) == set(expected)
    assert "corrupt.png" in rejected["corrupt"]["reason"] and rejected["lonely_ir"]["vi"] is None
    assert sorted(p.name for p in (tmp_path / "out/ir").iterdir()) == ["good.png"]
    assert sorted(p.name for p in (tmp_path / "out/vi").iterdir()) == ["good.png"]
    assert not list((tmp_path / "out").glob(".*")) and not list(tmp_path.glob(".out.*"))  # no staging left


def test_no_survivor_fails_and_keeps_previous_outputs(tmp_path, ray_local):
    generate_demo(tmp_path / "raw", num_pairs=1, height=48, width=48, seed=0)
    register_dataset(tmp_path / "raw/ir", tmp_path / "raw/vi", tmp_path / "out", progress=False)
    before = (tmp_path / "out/manifest.parquet").read_bytes()
    (tmp_path / "raw/vi/demo_000.png").write_bytes(b"garbage")
    with pytest.raises(NoPairsError, match="demo_000: unreadable"):
        register_dataset(tmp_path / "raw/ir", tmp_path / "raw/vi", tmp_path / "out", progress=False)
    assert (tmp_path / "out/manifest.parquet").read_bytes() == before
    assert (tmp_path / "out/vi/demo_000.png").is_file()


def test_empty_and_missing_folders(tmp_path, ray_local):
    (tmp_path / "ir").mkdir()
    (tmp_path / "vi").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        register_dataset(tmp_path / "ir", tmp_path / "vi", tmp_path / "out", progress=False)
    write_image(tmp_path / "ir/a.png", synth_pair(0, 0, 32, 32).ir)  # only IR: every pair lacks a partner
    with pytest.raises(NoPairsError, match="missing_partner"):
        register_dataset(tmp_path / "ir", tmp_path / "vi", tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="nope"):
        register_dataset(tmp_path / "nope", tmp_path / "vi", tmp_path / "out", progress=False)


def test_real_pairs_and_demo_through_cli_and_stage(tmp_path, ray_local, capsys):
    from pipeline.cli import main
    from stages.register import main as stage_main

    raw = tmp_path / "raw"
    for name, stems in (("TNO", ["01.png", "06.png"]), ("RoadScene", ["FLIR_00018.jpg", "FLIR_00060.jpg"])):
        root = shared_dataset(name)
        for s in stems:
            for sub in ("ir", "vi"):
                (raw / sub).mkdir(parents=True, exist_ok=True)
                (raw / sub / f"{name}_{s}").write_bytes((root / sub / s).read_bytes())
    generate_demo(raw, num_pairs=2, height=160, width=224, seed=2024)  # the default demo
    assert main(["register", "--ir", str(raw / "ir"), "--vi", str(raw / "vi"), "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "6 pairs found, 6 accepted" in out
    rows = {r["pair_id"]: r for r in pq.read_table(tmp_path / "out/manifest.parquet").to_pylist()}
    assert rows["TNO_01"]["vi_channels"] == 1 and rows["RoadScene_FLIR_00018"]["vi_channels"] == 3
    # TNO pair 01 is visibly misaligned (~8-11 px, checked by eye on edge overlays): corrected
    assert rows["TNO_01"]["corrected"] and rows["TNO_01"]["shift_px"] > 5
    assert not rows["demo_000"]["corrected"]
    vi = read_visible(tmp_path / "out/vi/RoadScene_FLIR_00018.png")
    assert vi.shape == read_ir(tmp_path / "out/ir/RoadScene_FLIR_00018.png").shape + (3,)
    # CLI: no pair survives -> exit 1 with a one-line error
    (tmp_path / "bad/ir").mkdir(parents=True)
    (tmp_path / "bad/vi").mkdir()
    write_image(tmp_path / "bad/ir/x.png", np.zeros((8, 8), np.uint8))
    write_image(tmp_path / "bad/vi/x.png", np.zeros((8, 8), np.uint8))
    assert main(["register", "--ir", str(tmp_path / "bad/ir"), "--vi", str(tmp_path / "bad/vi"),
                 "-o", str(tmp_path / "bad/out"), "--no-progress"]) == 1
    assert "constant_image" in capsys.readouterr().err
    # stage script: raw folder from params
    params = tmp_path / "params.yaml"
    params.write_text(f"ray: {{}}\nregister:\n  raw_dir: {raw}\n  motion: translation\n")
    assert stage_main(["--params", str(params), "--out", str(tmp_path / "stage"), "--no-progress"]) == 0
    assert len(list((tmp_path / "stage/ir").iterdir())) == 6
    params.write_text(f"ray: {{}}\nregister:\n  raw_dir: {tmp_path / 'bad'}\n")
    assert stage_main(["--params", str(params), "--out", str(tmp_path / "stage2"), "--no-progress"]) == 1


def test_register_refuses_to_replace_a_foreign_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not a register output")
    with pytest.raises(ValueError, match="no manifest.parquet"):
        register_dataset(tmp_path / "ir", tmp_path / "vi", out)
    assert (out / "notes.txt").read_text() == "not a register output"
