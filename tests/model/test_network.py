"""The MDA architecture: construction, shapes, value range, features, gradients, attention."""

from __future__ import annotations

import pytest
import torch

from pipeline.common.config import ParamsError
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


# ----------------------------------------------------------------------------- ablation switches
def _n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("fusion", ["attention", "add", "concat"])
@pytest.mark.parametrize("scales", [1, 2, 3])
def test_ablation_switches_build_and_run(fusion, scales):
    torch.manual_seed(0)
    net = build_model("mda", fusion=fusion, scales=scales).eval()
    ir, vi = torch.rand(2, 1, 32, 48), torch.rand(2, 1, 32, 48)
    with torch.no_grad():
        fused, feats = net(ir, vi, return_features=True)
    assert fused.shape == (2, 1, 32, 48) and fused.min() > 0 and fused.max() < 1
    assert len(feats["ir"]) == len(feats["vi"]) == scales
    assert len(feats["fusion"]) == {1: 1, 2: 3, 3: 5}[scales]
    assert all(f.shape[1] == 32 for f in feats["fusion"])
    assert net.head[0].in_channels == {1: 32, 2: 2 * 32 + 16, 3: 104}[scales]
    # every parameter of a reduced network still gets a gradient (no dead modules, DDP-safe)
    net.train()
    net(torch.rand(1, 1, 16, 24), torch.rand(1, 1, 16, 24)).mean().backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []


def test_ablation_parameter_counts_and_default_unchanged():
    full = build_model("mda")
    assert _n_params(full) == _n_params(build_model("mda", fusion="attention", scales=3)) == 484_214
    assert sorted(full.state_dict()) == sorted(build_model("mda", fusion="attention", scales=3).state_dict())
    counts = {(f, s): _n_params(build_model("mda", fusion=f, scales=s))
              for f in ("attention", "add", "concat") for s in (1, 2, 3)}
    # exact figures (C = 32): the attention blocks hold 79,056 parameters, add keeps only the
    # cross-scale up-sampler, concat adds two 1x1 convs (2C -> C)
    assert counts[("add", 3)] == 405_158 and counts[("concat", 3)] == 409_318
    assert counts[("attention", 2)] == 269_210 and counts[("attention", 1)] == 95_627
    for s in (1, 2, 3):
        assert counts[("add", s)] < counts[("concat", s)] < counts[("attention", s)]
    for f in ("attention", "add", "concat"):
        assert counts[(f, 1)] < counts[(f, 2)] < counts[(f, 3)]
    single = build_model("mda", scales=1)
    assert single.enc2 is single.enc4 is single.fuse_cross is single.dec2 is single.dec4 is None
    two = build_model("mda", scales=2)
    assert two.enc4 is None and two.dec4 is None and two.fuse_cross is not None


def test_ablation_switches_are_checked():
    assert model_config({"args": {"fusion": "add", "scales": 1}}) == ("mda", {"fusion": "add", "scales": 1})
    with pytest.raises(ParamsError, match="model.args.fusion"):
        model_config({"args": {"fusion": "max"}})
    with pytest.raises(ParamsError, match="model.args.scales"):
        model_config({"args": {"scales": 4}})
    with pytest.raises(ValueError, match="'fusion'"):
        build_model("mda", fusion="sum")
    with pytest.raises(ValueError, match="'scales'"):
        build_model("mda", scales=0)
