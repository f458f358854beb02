"""Tests of the register step: modes (off/check/correct) on real pairs, validation, outputs, report, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import shared_dataset
from pipeline.data import align
from pipeline.data.contracts import MANIFEST_SCHEMA, read_accepted_pairs
from pipeline.data.demo import generate_demo, synth_pair
from pipeline.data.images import read_ir, read_visible, write_image
from pipeline.data.register import (
    REPORT_METRICS,
    REPORT_PICTURE,
    NoPairsError,
    register_dataset,
    register_pair,
)
from pipeline.data.register_options import AlignOptions


def _link_pairs(raw: Path, name: str, stems: list[str], prefix: str = "") -> None:
    """Symlink real pairs of ``../shared/data/<name>`` into ``raw/{ir,vi}`` (nothing is copied)."""
    root = shared_dataset(name)
    for stem in stems:
        for sub in ("ir", "vi"):
            src = next((root / sub).glob(f"{stem}.*"))
            (raw / sub).mkdir(parents=True, exist_ok=True)
            os.symlink(src.resolve(), raw / sub / f"{prefix}{src.name}")


def _manifest(out: Path) -> dict[str, dict]:
    return {r["pair_id"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}


def _same_as_decoded(out: Path, raw: Path, pair_id: str) -> bool:
    ir_src = next((raw / "ir").glob(f"{pair_id}.*"))
    vi_src = next((raw / "vi").glob(f"{pair_id}.*"))
    return np.array_equal(read_ir(out / "ir" / f"{pair_id}.png"), read_ir(ir_src)) and np.array_equal(
        read_visible(out / "vi" / f"{pair_id}.png"), read_visible(vi_src)
    )


def test_default_check_moves_no_tno_pair(tmp_path, ray_local):
    """Defaults (``align: check``) on TNO's 42 pairs: every pair checked, none moved, every written
    image pixel-identical to the decoded source; the metric and the picture are written."""
    root = shared_dataset("TNO")
    summary = register_dataset(root / "ir", root / "vi", tmp_path / "out", progress=False)
    assert summary.accepted == 42 and summary.corrected == 0 and summary.align == "check"
    rows = _manifest(tmp_path / "out")
    assert all(r["align_mode"] == "check" and not r["corrected"] and r["confident"] is not None for r in rows.values())
    for pair_id in rows:
        assert _same_as_decoded(tmp_path / "out", root, pair_id), pair_id
    metrics = json.loads((tmp_path / "out" / REPORT_METRICS).read_text())
    assert metrics["pairs_checked"] == 42 and metrics["corrected"] == 0
    assert metrics["confident"] + sum(metrics["refused"].values()) == 42
    assert 0 < metrics["median_shift_px"] <= metrics["max_shift_px"] <= AlignOptions().search_px * 2
    assert cv2.imread(str(tmp_path / "out" / REPORT_PICTURE)).shape[1] > 0
    # the known real offsets: TNO 12 agreed (recorded, not applied), TNO 01 refused
    assert rows["12"]["confident"] and rows["12"]["align_reason"].startswith("agree:")
    assert not rows["01"]["confident"] and rows["01"]["align_error"] == rows["01"]["align_reason"]


def test_correct_moves_only_confident_pairs(tmp_path, ray_local):
    """``correct``: a real pair with a known shift is put back; refused pairs (night MSRS, TNO 01
    whose estimates disagree, two unrelated images) keep their decoded pixels."""
    raw = tmp_path / "raw"
    _link_pairs(raw, "MSRS", ["00009N"])
    _link_pairs(raw, "TNO", ["01"])
    tno = shared_dataset("TNO")
    ir, vi = read_ir(tno / "ir/08.png"), read_visible(tno / "vi/08.png")
    h, w = ir.shape
    shift = np.array([[1.0, 0.0, -4.0], [0.0, 1.0, 6.0]])  # moved(x) = vi(x - 4, y + 6)
    write_image(raw / "ir" / "moved08.png", ir)
    write_image(raw / "vi" / "moved08.png", align.warp_visible(vi, shift, h, w))
    write_image(raw / "ir" / "unrelated.png", ir)
    write_image(raw / "vi" / "unrelated.png", cv2.resize(read_visible(tno / "vi/42.png"), (w, h)))
    options = AlignOptions(align="correct", report_dir=str(tmp_path / "report"))
    summary = register_dataset(raw / "ir", raw / "vi", tmp_path / "out", options, progress=False)
    rows = _manifest(tmp_path / "out")
    moved = rows["moved08"]
    assert moved["corrected"] and moved["confident"] and summary.corrected == 1
    # the applied warp undoes the known shift up to the pair's own small offset (TNO 08: ~0.5 px)
    undone = align.apply_warp(np.asarray(moved["transform"]).reshape(2, 3), [[w / 2, h / 2]]) - [[w / 2, h / 2]]
    assert np.allclose(undone, [[4.0, -6.0]], atol=1.0)
    for pair_id in ("00009N", "01", "unrelated"):
        assert not rows[pair_id]["confident"] and not rows[pair_id]["corrected"], rows[pair_id]["align_reason"]
        assert rows[pair_id]["align_reason"].split(":")[0] in align.REFUSALS
        assert _same_as_decoded(tmp_path / "out", raw, pair_id)
    metrics = json.loads((tmp_path / "report" / REPORT_METRICS).read_text())
    assert (metrics["pairs_checked"], metrics["confident"], metrics["corrected"]) == (4, 1, 1)
    picture = cv2.imread(str(tmp_path / "report" / REPORT_PICTURE))
    assert picture is not None and picture.shape[0] > 4 * 26  # legend + one row per flagged pair
    assert not (tmp_path / "out" / REPORT_METRICS).exists()


def test_off_skips_the_estimate_and_readers_still_work(tmp_path):
    generate_demo(tmp_path / "raw", num_pairs=1, height=96, width=128, seed=3)
    row = register_pair("demo_000", tmp_path / "raw/ir/demo_000.png", tmp_path / "raw/vi/demo_000.png",
                        tmp_path / "out", AlignOptions(align="off"))
    assert row["status"] == "ok" and row["align_mode"] == "off"
    assert row["confident"] is None and row["transform"] is None and not row["corrected"]
    assert _same_as_decoded(tmp_path / "out", tmp_path / "raw", "demo_000")


def test_align_options_from_params():
    from pipeline.common.config import ParamsError

    assert AlignOptions.from_params({"align": "correct", "search_px": 8}).search_px == 8.0
    assert AlignOptions.from_params({"raw_dir": "x"}) == AlignOptions()
    assert AlignOptions.from_params(yaml.safe_load("align: off")).align == "off"  # YAML reads off as false
    for cfg, key in (({"align": "fix"}, "register.align"), ({"min_score": 2}, "register.min_score"),
                     ({"max_disagreement_px": -1}, "register.max_disagreement_px"), ({"motion": "affine"}, "register.motion"),
                     ({"align": True}, "register.align")):
        with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
            AlignOptions.from_params(cfg)
    with pytest.raises(ValueError, match="register.align"):
        AlignOptions(align="fix")


def _bad_inputs(root: Path) -> dict[str, str]:
    """One good pair and one pair per rejection reason."""
    p = synth_pair(5, 0, 64, 80)
    ir, vi = root / "ir", root / "vi"
    write_image(ir / "good.png", p.ir)
    write_image(vi / "good.png", p.vi)
    write_image(ir / "corrupt.png", p.ir)
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
        assert rows[stem]["align_mode"] is None and rows[stem]["confident"] is None
    assert read_accepted_pairs(tmp_path / "out") == [{"pair_id": "good", "height": 64, "width": 80}]
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


def test_cli_and_stage(tmp_path, ray_local, capsys):
    from pipeline.cli import main
    from stages.register import main as stage_main

    raw = tmp_path / "raw"
    _link_pairs(raw, "RoadScene", ["FLIR_00018", "FLIR_04302"])
    generate_demo(raw, num_pairs=1, height=160, width=224, seed=2024)
    assert main(["register", "--ir", str(raw / "ir"), "--vi", str(raw / "vi"), "-o", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "3 pairs found, 3 accepted" in out and "alignment (check)" in out and "0 corrected" in out
    rows = _manifest(tmp_path / "out")
    assert rows["FLIR_00018"]["vi_channels"] == 3 and all(r["align_mode"] == "check" for r in rows.values())
    assert (tmp_path / "out" / REPORT_METRICS).is_file()
    assert main(["register", "--ir", str(raw / "ir"), "--vi", str(raw / "vi"), "-o", str(tmp_path / "off"),
                 "--align", "off", "--report", str(tmp_path / "rep"), "--no-progress"]) == 0
    assert "not checked" in capsys.readouterr().out
    assert json.loads((tmp_path / "rep" / REPORT_METRICS).read_text())["pairs_checked"] == 0
    # CLI: no pair survives -> exit 1 with a one-line error
    (tmp_path / "bad/ir").mkdir(parents=True)
    (tmp_path / "bad/vi").mkdir()
    write_image(tmp_path / "bad/ir/x.png", np.zeros((8, 8), np.uint8))
    write_image(tmp_path / "bad/vi/x.png", np.zeros((8, 8), np.uint8))
    assert main(["register", "--ir", str(tmp_path / "bad/ir"), "--vi", str(tmp_path / "bad/vi"),
                 "-o", str(tmp_path / "bad/out"), "--no-progress"]) == 1
    assert "constant_image" in capsys.readouterr().err
    # stage script: raw folder and mode from params, report outside the output folder
    params = tmp_path / "params.yaml"
    params.write_text(f"ray: {{}}\nregister:\n  raw_dir: {raw}\n  align: correct\n  report_dir: {tmp_path / 'reports'}\n")
    assert stage_main(["--params", str(params), "--out", str(tmp_path / "stage"), "--no-progress"]) == 0
    assert all(r["align_mode"] == "correct" for r in _manifest(tmp_path / "stage").values())
    assert (tmp_path / "reports" / REPORT_METRICS).is_file() and (tmp_path / "reports" / REPORT_PICTURE).is_file()
    params.write_text(f"ray: {{}}\nregister:\n  raw_dir: {raw}\n  motion: euclidean\n")
    assert stage_main(["--params", str(params), "--out", str(tmp_path / "stage2"), "--no-progress"]) == 1
    assert "register.motion" in capsys.readouterr().err


def test_register_refuses_to_replace_a_foreign_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not a register output")
    with pytest.raises(ValueError, match="no manifest.parquet"):
        register_dataset(tmp_path / "ir", tmp_path / "vi", out)
    assert (out / "notes.txt").read_text() == "not a register output"


def test_outputs_do_not_depend_on_the_checkout_folder(tmp_path, ray_local, monkeypatch):
    """The same inputs registered in two checkouts (as ``dvc repro`` runs it: relative paths, cwd
    at the project root) give byte-identical outputs (images, manifest, report); sources are
    recorded relative to the working folder, and a source outside it stays absolute."""
    outputs = {}
    for name in ("a", "deeper/b"):
        project = tmp_path / name
        generate_demo(project / "raw", num_pairs=2, height=64, width=80, seed=7)
        (project / "raw/vi/demo_001.png").write_bytes(b"not an image")
        monkeypatch.chdir(project)
        register_dataset("raw/ir", str(project / "raw/vi"), "registered", AlignOptions(align="correct"), progress=False)
        outputs[name] = {str(f.relative_to(project)): f.read_bytes() for f in (project / "registered").rglob("*") if f.is_file()}
        rows = _manifest(project / "registered")
        assert (rows["demo_000"]["ir_src"], rows["demo_000"]["vi_src"]) == ("raw/ir/demo_000.png", "raw/vi/demo_000.png")
        assert rows["demo_001"]["reason"].startswith("unreadable: visible raw/vi/demo_001.png:")
    assert len(outputs["a"]) == 7 and outputs["a"] == outputs["deeper/b"]  # images, manifest, report, rejections, counts
    from pipeline.data.register import recorded_path

    assert recorded_path(tmp_path / "a/raw/ir/x.png", tmp_path / "deeper") == str(tmp_path / "a/raw/ir/x.png")
    assert recorded_path("raw/../raw/ir/x.png", tmp_path / "a") == "raw/ir/x.png"
    (tmp_path / "a/linked").symlink_to(tmp_path / "deeper")  # a dataset linked into the project
    assert recorded_path(tmp_path / "a/linked/b/raw/ir/x.png", tmp_path / "a") == "linked/b/raw/ir/x.png"
