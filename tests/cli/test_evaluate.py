"""``mda evaluate``: CSV contract, mixed formats, Ray Data vs plain loop, bad input."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.data.images import read_gray, write_image
from pipeline.evaluate.metrics import METRICS, compute_all
from pipeline.evaluate.score import evaluate_folder
from conftest import shared_dataset, shared_file

HEADER = ["name", "EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM", "CC", "PSNR", "VIgap", "IRgap"]
NAMES = ("01", "02", "03")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == HEADER
        return list(reader)


@pytest.fixture()
def sdnet_subset(tmp_path: Path) -> Path:
    """Three SDNet fused images of TNO pairs, one re-encoded as BMP (lossless) to pair by stem."""
    src = shared_file("reference", "TNO_fused", "SDNet")
    fused = tmp_path / "fused"
    fused.mkdir()
    for name in NAMES[:2]:
        shutil.copy(src / f"{name}.png", fused / f"{name}.png")
    write_image(fused / f"{NAMES[2]}.bmp", read_gray(src / f"{NAMES[2]}.png"))
    return fused


def _synthetic_folders(root: Path, n: int = 2, size: tuple[int, int] = (48, 56)) -> tuple[Path, Path, Path]:
    """Small IR (.tif), colour visible (.jpg) and fused (.png) images named s0, s1, ..."""
    rng = np.random.default_rng(0)
    dirs = [root / d for d in ("ir", "vi", "fused")]
    for i in range(n):
        ir = rng.integers(0, 256, size, dtype=np.uint8)
        vi = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        write_image(dirs[0] / f"s{i}.tif", ir)
        write_image(dirs[1] / f"s{i}.jpg", vi)
        write_image(dirs[2] / f"s{i}.png", ((ir.astype(int) + vi[:, :, 1]) // 2).astype(np.uint8))
    return dirs[0], dirs[1], dirs[2]


def test_scores_reference_images_in_a_plain_loop(sdnet_subset: Path, tmp_path: Path, capsys) -> None:
    tno = shared_dataset("TNO")
    out = tmp_path / "scores.csv"
    rc = main(["evaluate", "--ir", str(tno / "ir"), "--vi", str(tno / "vi"), "--fused", str(sdnet_subset),
               "-o", str(out), "--no-ray", "--allow-missing"])  # 3 of TNO's pairs
    assert rc == 0
    rows = _read_csv(out)
    assert [r["name"] for r in rows] == list(NAMES)
    for row in rows:  # the CSV holds what compute_all gives for the same files (6 decimals)
        name = row["name"]
        fused_file = next(sdnet_subset.glob(f"{name}.*"))
        expected = compute_all(read_gray(tno / "ir" / f"{name}.png"), read_gray(tno / "vi" / f"{name}.png"),
                               read_gray(fused_file))
        for m in METRICS:
            assert float(row[m]) == pytest.approx(expected[m], abs=2e-6), (name, m)
    printed = capsys.readouterr().out
    assert "means over 3 image(s)" in printed
    mean_en = np.mean([float(r["EN"]) for r in rows])
    assert re.search(rf"^EN\s+{mean_en:.4f}\s", printed, re.MULTILINE)


def test_ray_data_gives_the_same_rows_as_the_loop(ray_local, tmp_path: Path) -> None:
    ir_dir, vi_dir, fused_dir = _synthetic_folders(tmp_path, n=3)
    out = tmp_path / "ray.csv"
    rc = main(["evaluate", "--ir", str(ir_dir), "--vi", str(vi_dir), "--fused", str(fused_dir), "-o", str(out)])
    assert rc == 0  # through Ray Data (the default)
    rows = _read_csv(out)
    serial = evaluate_folder(ir_dir, vi_dir, fused_dir, parallel=False)
    assert list(serial.columns) == HEADER
    assert [r["name"] for r in rows] == list(serial["name"]) == ["s0", "s1", "s2"]
    ray_values = np.array([[float(r[m]) for m in METRICS] for r in rows])
    np.testing.assert_allclose(ray_values, serial[list(METRICS)].to_numpy(), rtol=0, atol=2e-6)


def test_orphan_corrupt_and_mismatched_images_are_reported(tmp_path: Path, capsys) -> None:
    ir_dir, vi_dir, fused_dir = _synthetic_folders(tmp_path, n=2)
    write_image(fused_dir / "orphan.png", np.zeros((48, 56), np.uint8))  # no sources
    (ir_dir / "bad.png").write_bytes(b"\x89PNG not really")  # corrupt source
    write_image(vi_dir / "bad.png", np.zeros((48, 56), np.uint8))
    write_image(fused_dir / "bad.png", np.zeros((48, 56), np.uint8))
    write_image(ir_dir / "small.png", np.zeros((40, 40), np.uint8))  # size mismatch
    write_image(vi_dir / "small.png", np.zeros((40, 40), np.uint8))
    write_image(fused_dir / "small.png", np.zeros((48, 56), np.uint8))
    out = tmp_path / "scores.csv"

    rc = main(["evaluate", "--ir", str(ir_dir), "--vi", str(vi_dir), "--fused", str(fused_dir),
               "-o", str(out), "--no-ray"])
    assert rc == 1  # incomplete results are an error for scripts ...
    assert [r["name"] for r in _read_csv(out)] == ["s0", "s1"]  # ... but the rest is scored and written
    err = capsys.readouterr().err
    assert "not scored (3 of 5)" in err
    assert f"{fused_dir / 'orphan.png'}: no source image" in err
    assert f"{ir_dir / 'bad.png'}: cannot decode image" in err
    assert f"{fused_dir / 'small.png'}: size 56x48 (WxH) does not match its sources" in err


def test_nothing_scored_keeps_an_existing_csv(tmp_path: Path, capsys) -> None:
    ir_dir, vi_dir, fused_dir = _synthetic_folders(tmp_path, n=1)
    other = tmp_path / "other"
    other.mkdir()
    write_image(other / "x.png", np.zeros((48, 56), np.uint8))
    out = tmp_path / "scores.csv"
    out.write_text("previous results\n")
    rc = main(["evaluate", "--ir", str(ir_dir), "--vi", str(vi_dir), "--fused", str(other), "-o", str(out),
               "--no-ray"])
    assert rc == 1
    assert out.read_text() == "previous results\n"
    assert "could be scored" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: ["--fused", str(d / "missing")], "image folder not found"),
        (lambda d: ["--fused", str(d / "empty")], "no fused images found"),
        (lambda d: ["-o", str(d / "scores.txt")], "expected a .csv file name"),
    ],
)
def test_bad_arguments_give_one_line_errors(tmp_path: Path, capsys, change, message) -> None:
    ir_dir, vi_dir, fused_dir = _synthetic_folders(tmp_path, n=1)
    (tmp_path / "empty").mkdir()
    args = {"--ir": str(ir_dir), "--vi": str(vi_dir), "--fused": str(fused_dir), "-o": str(tmp_path / "s.csv")}
    extra = change(tmp_path)
    args[extra[0]] = extra[1]
    rc = main(["evaluate", *[x for kv in args.items() for x in kv], "--no-ray"])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith("mda evaluate: error:") and message in err


def test_help_documents_the_exit_status(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--no-ray" in text and "Exit status" in text and "name,EN,...,PSNR" in text


def test_source_pairs_without_a_fused_image_are_named(tmp_path: Path, capsys) -> None:
    """Issue 13: means over fewer images than the sources used to exit 0 silently."""
    ir_dir, vi_dir, fused_dir = _synthetic_folders(tmp_path, n=4)
    for stem in ("s1", "s3"):
        (fused_dir / f"{stem}.png").unlink()
    args = ["evaluate", "--ir", str(ir_dir), "--vi", str(vi_dir), "--fused", str(fused_dir),
            "-o", str(tmp_path / "s.csv"), "--no-ray"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "for 2 source pair(s) (--allow-missing to accept): s1, s3" in err
    assert [r["name"] for r in _read_csv(tmp_path / "s.csv")] == ["s0", "s2"]
    assert main([*args, "--allow-missing"]) == 0
    out = capsys.readouterr()
    assert "2 source pair(s) have no fused image" in out.err and "means over 2 image(s)" in out.out


@pytest.mark.parametrize("where", ["under_file", "folder"])
def test_unusable_output_fails_before_scoring_in_one_line(tmp_path: Path, capsys, where) -> None:
    ir_dir, vi_dir, fused_dir = _synthetic_folders(tmp_path, n=1)
    (tmp_path / "plain").write_text("x")
    (tmp_path / "dir.csv").mkdir()
    out = {"under_file": tmp_path / "plain" / "s.csv", "folder": tmp_path / "dir.csv"}[where]
    # --fused does not exist: only a check made before reading any image reports the output first
    args = ["evaluate", "--ir", str(ir_dir), "--vi", str(vi_dir), "--fused", str(tmp_path / "nope"), "-o", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mda evaluate: error: --output {out}:")
    with pytest.raises(ValueError):  # --debug: the exception itself, with its traceback
        main(["--debug", *args])
