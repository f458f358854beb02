"""``mda fuse`` never overwrites its inputs and replaces only its own outputs (issue 22): every
case is refused before the model loads, and the sources are byte-identical afterwards."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.cli.fuse_outputs import mark_png, written_by_us
from pipeline.data.images import read_raw, write_image


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def pair(tmp_path):
    d = tmp_path / "d"
    rng = np.random.default_rng(0)
    for sub in ("ir", "vi"):
        write_image(d / sub / "p.png", rng.integers(0, 255, (24, 32), dtype=np.uint8))
    write_image(d / "ir.png", rng.integers(0, 255, (24, 32), dtype=np.uint8))
    write_image(d / "vi.png", rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    return d


@pytest.mark.parametrize("out", ["ir.png", "vi.png", "."])
def test_single_pair_output_onto_an_input_is_refused(pair, out, capsys):
    before = _digest(pair)
    rc = main(["fuse", str(pair / "ir.png"), str(pair / "vi.png"), "-o", str(pair / out)])
    err = capsys.readouterr().err
    assert rc != 0 and "over the input" in err, err
    assert _digest(pair) == before


@pytest.mark.parametrize("out", ["vi", "ir", "ir/sub"])
def test_folder_output_inside_an_input_folder_is_refused(pair, out, capsys):
    before = _digest(pair)
    rc = main(["fuse", "--ir", str(pair / "ir"), "--vi", str(pair / "vi"), "-o", str(pair / out)])
    err = capsys.readouterr().err
    assert rc != 0 and "input folder" in err, err
    assert _digest(pair) == before


def test_same_source_twice_and_unknown_extension_are_refused(pair, capsys):
    assert main(["fuse", str(pair / "ir.png"), str(pair / "ir.png"), "-o", str(pair / "f.png")]) != 0
    assert "both IR and visible" in capsys.readouterr().err
    assert main(["fuse", "--ir", str(pair / "ir"), "--vi", str(pair / "ir"), "-o", str(pair / "o")]) != 0
    assert "both IR and visible" in capsys.readouterr().err
    assert main(["fuse", str(pair / "ir.png"), str(pair / "vi.png"), "-o", str(pair / "f.xyz")]) != 0
    err = capsys.readouterr().err
    assert "cannot write '.xyz'" in err and not (pair / "f.xyz").exists()


def test_foreign_file_needs_overwrite_our_own_output_does_not(pair, capsys):
    out = pair / "fused.png"
    write_image(out, np.zeros((24, 32), np.uint8))  # someone else's file
    foreign = out.read_bytes()
    assert main(["fuse", str(pair / "ir.png"), str(pair / "vi.png"), "-o", str(out)]) != 0
    assert "not written by mda fuse" in capsys.readouterr().err and out.read_bytes() == foreign
    assert main(["fuse", str(pair / "ir.png"), str(pair / "vi.png"), "-o", str(out), "--overwrite"]) == 0
    assert written_by_us(out) and read_raw(out).shape == (24, 32, 3)
    capsys.readouterr()
    assert main(["fuse", str(pair / "ir.png"), str(pair / "vi.png"), "-o", str(out)]) == 0  # ours: replaced


def test_png_mark_round_trip():
    import cv2

    ok, buf = cv2.imencode(".png", np.arange(64, dtype=np.uint8).reshape(8, 8))
    marked = mark_png(buf.tobytes())
    assert cv2.imdecode(np.frombuffer(marked, np.uint8), cv2.IMREAD_UNCHANGED).tolist() == \
        np.arange(64, dtype=np.uint8).reshape(8, 8).tolist()
