"""The MDA architecture: construction, shapes, value range, features, gradients, attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.common.config import ParamsError
from pipeline.model.inference import Fuser, pad_to_multiple, postprocess
from pipeline.model.network import DualAttentionFusion, available_models, build_model, model_config


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("mda").eval()


def test_registry_and_paper_defaults(model):
    assert "mda" in available_models()
    # 516,120 in the authors' file minus their 31,906 never-used parameters (SOURCE.md)
    assert sum(p.numel() for p in model.parameters()) == 484_214
    assert model.head[0].in_channels == 104
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model("nope")
    with pytest.raises(ValueError, match="unknown argument.*'depth'"):
        build_model("mda", depth=3)
    with pytest.raises(ValueError, match="divisible"):
        build_model("mda", width=30, reduction=8)
    small = build_model("mda", width=16, reduction=4, up2_channels=8, up4_channels=4)
    assert small.head[0].in_channels == 2 * 16 + 2 * 8 + 4


def test_model_config_reads_params():
    assert model_config({}) == ("mda", {})
    assert model_config({"name": "mda", "args": {"width": 16}}) == ("mda", {"width": 16})
    with pytest.raises(ParamsError, match="model.args.depth"):
        model_config({"args": {"depth": 2}})
    with pytest.raises(ParamsError, match="model.args.width"):
        model_config({"args": {"width": 0}})


def test_forward_shapes_features_and_range(model):
    ir, vi = torch.rand(2, 1, 32, 48), torch.rand(2, 1, 32, 48)
    with torch.no_grad():
        fused, feats = model(ir, vi, return_features=True)
    assert fused.shape == (2, 1, 32, 48)
    assert fused.min() > 0 and fused.max() < 1
    assert [f.shape[-2:] for f in feats["ir"]] == [(32, 48), (16, 24), (8, 12)]
    assert [f.shape for f in feats["vi"]] == [f.shape for f in feats["ir"]]
    assert [tuple(f.shape) for f in feats["fusion"]] == [
        (2, 32, 32, 48), (2, 32, 32, 48), (2, 32, 16, 24), (2, 32, 16, 24), (2, 32, 8, 12)]
    # the siamese encoder runs IR and VIS as one batch: each sample must match a lone run
    with torch.no_grad():
        alone = model(ir[1:], vi[1:])
    torch.testing.assert_close(alone, fused[1:], atol=1e-5, rtol=0)


def test_forward_rejects_unpadded_sizes(model):
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.rand(1, 1, 36, 48), torch.rand(1, 1, 36, 48))
    with pytest.raises(ValueError, match="equal shape"):
        model(torch.rand(1, 1, 32, 48), torch.rand(1, 1, 32, 40))


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


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = build_model("mda").train()
    fused, feats = net(torch.rand(2, 1, 16, 24), torch.rand(2, 1, 16, 24), return_features=True)
    fused.mean().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert dead == []


@pytest.mark.parametrize("cross_scale", [False, True])
def test_attention_maps_in_open_unit_interval(cross_scale):
    torch.manual_seed(0)
    block = DualAttentionFusion(32, 8, cross_scale=cross_scale)
    ir = torch.randn(2, 32, 8 if cross_scale else 16, 12 if cross_scale else 24)
    vi = torch.randn(2, 32, 16, 24)
    with torch.no_grad():
        w_ir, w_vi, m_ir, m_vi = block.attention(ir, vi)
        out = block(ir, vi)
    assert w_ir.shape == w_vi.shape == (2, 32, 1, 1)
    assert m_ir.shape == m_vi.shape == (2, 32, 16, 24) == out.shape
    for a in (w_ir, w_vi, m_ir, m_vi):
        assert a.min() > 0 and a.max() < 1
