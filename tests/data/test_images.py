"""Tests of pipeline.data.images: reading conventions, pairing, YCrCb round trip, atomic writes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from conftest import shared_dataset
from pipeline.data.images import (
    ImageError, find_pairs, list_images, merge_luma, read_gray, read_ir, read_raw, read_visible, split_luma,
    to_float, to_uint8, write_image,
)

RNG = np.random.default_rng(0)


def test_read_ir_8bit_and_folding(tmp_path):
    g = RNG.integers(0, 256, (20, 30), dtype=np.uint8)
    write_image(tmp_path / "g.png", g)
    write_image(tmp_path / "g3.png", np.dstack([g, g, g]))
    assert np.array_equal(read_ir(tmp_path / "g.png"), g)
    assert np.array_equal(read_ir(tmp_path / "g3.png"), g)  # 3 identical channels folded
    # nearly gray (compression noise): converted with BGR -> gray
    c = np.clip(np.dstack([g, g.astype(int) + RNG.integers(-3, 4, g.shape), g]), 0, 255).astype(np.uint8)
    write_image(tmp_path / "c.png", c)
    assert np.array_equal(read_ir(tmp_path / "c.png"), cv2.cvtColor(c, cv2.COLOR_BGR2GRAY))


def test_false_colour_ir_is_refused(tmp_path):
    """A JET-coloured 'IR' image is not monotonic in temperature: refused, naming the file (issue 22)."""
    from pipeline.data.images import ImageError

    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (16, 1))
    write_image(tmp_path / "jet.png", cv2.applyColorMap(ramp, cv2.COLORMAP_JET))
    with pytest.raises(ImageError, match=r"jet\.png.*false-colour palette"):
        read_ir(tmp_path / "jet.png")


def test_read_16bit(tmp_path):
    raw = (RNG.normal(30000, 200, (40, 40))).clip(0, 65535).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "t.png"), raw)
    ir = read_ir(tmp_path / "t.png")
    assert ir.dtype == np.uint8 and ir.min() == 0 and ir.max() == 255  # percentile stretch
    vis = read_visible(tmp_path / "t.png")
    assert abs(int(vis.mean()) - round(30000 / 257)) <= 1  # full-range /257


def test_alpha_dropped_and_visible_colour_kept(tmp_path):
    c = RNG.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    write_image(tmp_path / "a.png", np.dstack([c, np.full((10, 12), 128, np.uint8)]))
    assert np.array_equal(read_visible(tmp_path / "a.png"), c)
    g = c[:, :, 0]
    write_image(tmp_path / "g3.png", np.dstack([g, g, g]))
    assert read_visible(tmp_path / "g3.png").shape == (10, 12)
    assert np.array_equal(read_gray(tmp_path / "a.png"), cv2.cvtColor(c, cv2.COLOR_BGR2GRAY))


def test_corrupt_missing_and_float_files(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name in ("bad.png", "empty.jpg", "absent.png"):
        with pytest.raises(ImageError) as err:
            read_raw(tmp_path / name)
        assert name in str(err.value)
    cv2.imwrite(str(tmp_path / "f.tiff"), RNG.random((8, 8)).astype(np.float32))
    with pytest.raises(ImageError, match="unsupported bit depth"):
        read_ir(tmp_path / "f.tiff")


def test_ycrcb_round_trip():
    c = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    y, crcb = split_luma(c)
    assert np.array_equal(y, cv2.cvtColor(c, cv2.COLOR_BGR2YCrCb)[:, :, 0])
    assert np.abs(merge_luma(y, crcb).astype(int) - c).max() <= 3  # 8-bit YCrCb rounding
    g = c[:, :, 0]
    assert split_luma(g)[1] is None and merge_luma(g, None) is g
    with pytest.raises(ValueError, match="sizes differ"):
        merge_luma(y[:8], crcb)
    assert np.array_equal(to_uint8(to_float(c)), c)


def test_find_pairs_missing_partners_and_empty(tmp_path):
    for d in ("ir", "vi"):
        (tmp_path / d).mkdir()
    with pytest.raises(ValueError, match="no images found"):
        find_pairs(tmp_path / "ir", tmp_path / "vi")
    img = np.zeros((4, 4), np.uint8)
    for name in ("ir/a.png", "ir/b.png", "vi/a.jpg", "vi/c.bmp"):
        write_image(tmp_path / name, img)
    (tmp_path / "vi/notes.txt").write_text("not an image")
    pairs, unmatched = find_pairs(tmp_path / "ir", tmp_path / "vi")
    assert [(p.stem, p.vi.name) for p in pairs] == [("a", "a.jpg")]
    assert sorted(p.split("/")[-1] for p, _ in unmatched) == ["b.png", "c.bmp"]
    write_image(tmp_path / "vi/a.png", img)
    with pytest.raises(ValueError, match="share the stem"):
        list_images(tmp_path / "vi")
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "missing")


def test_real_files_follow_conventions():
    tno, rs = shared_dataset("TNO"), shared_dataset("RoadScene")
    assert read_ir(tno / "ir/01.png").ndim == 2 and read_visible(tno / "vi/01.png").ndim == 2
    assert read_visible(rs / "vi/FLIR_00006.jpg").shape[2] == 3


def test_write_image_is_atomic_and_leaves_no_temp(tmp_path):
    write_image(tmp_path / "x/y.png", np.ones((3, 3), np.uint8))
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["y.png"]


def test_duplicate_stem_rejects_that_pair_only(tmp_path):
    """Issue 13: a.png and a.jpg in ir/ used to abort the whole pairing."""
    img = np.zeros((4, 4), np.uint8)
    for name in ("ir/a.png", "ir/a.jpg", "ir/b.png", "vi/a.png", "vi/b.png"):
        write_image(tmp_path / name, img)
    pairs, unmatched = find_pairs(tmp_path / "ir", tmp_path / "vi")
    assert [p.stem for p in pairs] == ["b"]
    reasons = dict(unmatched)
    assert reasons[str(tmp_path / "ir" / "a")].startswith("duplicate_stem:")
    assert "a.jpg and a.png" in reasons[str(tmp_path / "ir" / "a")]
    assert reasons[str(tmp_path / "vi" / "a.png")].endswith("(its partner)")


def test_symlink_loop_is_unreadable_not_a_missing_partner(tmp_path):
    img = np.zeros((4, 4), np.uint8)
    for name in ("ir/b.png", "vi/a.png", "vi/b.png"):
        write_image(tmp_path / name, img)
    (tmp_path / "ir" / "a.png").symlink_to(tmp_path / "ir" / "a.png")  # loops on itself
    (tmp_path / "ir" / "c.png").symlink_to(tmp_path / "nowhere.png")
    pairs, unmatched = find_pairs(tmp_path / "ir", tmp_path / "vi")
    assert [p.stem for p in pairs] == ["b"]
    reasons = dict(unmatched)
    assert reasons[str(tmp_path / "ir" / "a")] == f"unreadable: {tmp_path / 'ir' / 'a.png'}: symbolic link loop"
    assert "dangling symbolic link" in reasons[str(tmp_path / "ir" / "c")]
    assert not any(r.startswith("missing_partner") for r in reasons.values())
    with pytest.raises(ValueError, match="symbolic link loop"):
        list_images(tmp_path / "ir")
