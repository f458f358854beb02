"""Inference: the Fuser (any size, colour in/out, post-processing, channels-last, from a file)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.model.inference import Fuser, pad_to_multiple, postprocess
from pipeline.model.network import build_model
from pipeline.model.weights import save_checkpoint


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("mda").eval()


@pytest.mark.parametrize("size", [(40, 56), (37, 53), (5, 7), (1, 9)])
def test_fuser_any_size(model, size):
    h, w = size
    rng = np.random.default_rng(1)
    ir = rng.integers(0, 256, size, dtype=np.uint8)
    vis = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    fuser = Fuser(model, postprocess="clip")
    raw = fuser.fuse_luma(ir, vis[:, :, 1])
    assert raw.shape == size and raw.dtype == np.float32
    assert raw.min() > 0 and raw.max() < 1
    out = fuser(ir, vis)
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    assert fuser(ir, vis[:, :, 0]).shape == size  # gray in, gray out


def test_padding_is_reflection_and_crops_back():
    x = torch.arange(5 * 6, dtype=torch.float32).reshape(1, 1, 5, 6)
    p = pad_to_multiple(x)
    assert p.shape == (1, 1, 8, 8)
    torch.testing.assert_close(p[..., :5, :6], x)
    torch.testing.assert_close(p[..., 5, :6], x[..., 3, :])  # reflected row (5 -> 3)


def test_postprocess_modes():
    raw = np.array([[0.25, 0.375], [0.75, 0.5]], dtype=np.float32)
    mm = postprocess(raw, "minmax")
    assert mm.min() == 0 and mm.max() == 255
    assert mm[0, 1] == 64  # 0.25 * 255 = 63.75: rounded (the authors truncate to 63)
    np.testing.assert_array_equal(postprocess(raw, "clip"), np.round(raw * 255).astype(np.uint8))
    np.testing.assert_array_equal(postprocess(np.full((2, 2), 0.4), "minmax"), np.full((2, 2), 102))
    with pytest.raises(ValueError, match="postprocess"):
        postprocess(raw, "stretch")


def test_channels_last_path_matches_plain_eager(model):
    ir, vi = torch.rand(1, 1, 48, 64), torch.rand(1, 1, 48, 64)
    with torch.no_grad():
        plain = model(ir, vi)
    fast = Fuser(build_model("mda"), channels_last=True)
    fast.model.load_state_dict(model.state_dict())
    torch.testing.assert_close(fast.fuse_tensor(ir, vi), plain, atol=1e-4, rtol=0)


def test_from_file_is_the_weights_to_fuser_path(tmp_path, model):
    """A saved checkpoint fuses like the in-memory model, with the checkpoint's own post-processing."""
    path = save_checkpoint(tmp_path / "m.pt", model, "mda", {})
    fuser = Fuser.from_file(path)
    assert fuser.postprocess == "clip" and fuser.info["kind"]
    rng = np.random.default_rng(3)
    ir = rng.integers(0, 256, (40, 52), dtype=np.uint8)
    vi = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
    np.testing.assert_array_equal(fuser(ir, vi), Fuser(model, postprocess="clip")(ir, vi))
    assert Fuser.from_file(path, postprocess="minmax").postprocess == "minmax"
    assert Fuser.from_file(path, device="cpu").model is not None
