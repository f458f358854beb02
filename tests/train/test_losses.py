"""The adaptive fusion loss: SSIM, weight maps, each term's minimum, robustness, params."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.common.config import ParamsError, load_params, section
from pipeline.train.losses import (
    FusionLoss,
    PAPER_PROFILE,
    apply_profile,
    feature_loss,
    gram_distance,
    loss_section,
    max_target,
    patch_weight_maps,
    mean_ssim,
    ssim_map,
)
from conftest import REPO, shared_dataset

H = W = 32
IR_ONLY = {"int_ir": 1.0, "int_vi": 0.0, "det_ir": 1.0, "det_vi": 0.0}


def _textured(seed: int, b: int = 2, h: int = H, w: int = W) -> torch.Tensor:
    """Smooth random texture in [0.1, 0.9], (b, 1, h, w)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, h // 4, w // 4, generator=gen)
    x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)
    x = x + 0.1 * torch.rand(b, 1, h, w, generator=gen)
    x = (x - x.amin()) / (x.amax() - x.amin())
    return 0.1 + 0.8 * x


@pytest.fixture(scope="module")
def loss_fn() -> FusionLoss:
    logging.getLogger("pipeline.model.vgg").setLevel(logging.ERROR)
    try:
        return FusionLoss()
    finally:
        logging.getLogger("pipeline.model.vgg").setLevel(logging.NOTSET)


def _features(b: int, seed: int) -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    sizes = (16, 8, 4)
    fir = [torch.rand(b, 4, s, s, generator=gen) for s in sizes]
    fvi = [torch.rand(b, 4, s, s, generator=gen) for s in sizes]
    fus = [torch.rand(b, 4, s, s, generator=gen) for s in (16, 16, 8, 8, 4)]
    return {"ir": fir, "vi": fvi, "fusion": fus}


# ---------------------------------------------------------------- SSIM
def test_ssim_identical_is_one_and_symmetric():
    x, y = _textured(0), _textured(1)
    torch.testing.assert_close(mean_ssim(x, x), torch.ones(2))
    torch.testing.assert_close(mean_ssim(x, y), mean_ssim(y, x))
    const = torch.full((1, 1, H, W), 0.3)
    torch.testing.assert_close(mean_ssim(const, const), torch.ones(1))
    s = ssim_map(x, y)
    assert s.shape == (2, 1, H - 10, W - 10)
    assert (s <= 1 + 1e-6).all() and (s >= -1 - 1e-6).all()
    noisy = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    noisier = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    assert (mean_ssim(x, noisier) < mean_ssim(x, noisy)).all() and (mean_ssim(x, noisy) < 1).all()
    assert torch.isfinite(mean_ssim(const, x)).all()


def test_ssim_matches_scikit_image_gaussian_reference():
    from skimage.metrics import structural_similarity

    x, y = _textured(4, b=1, h=40, w=48), _textured(5, b=1, h=40, w=48)
    ref = structural_similarity(
        x[0, 0].double().numpy(), y[0, 0].double().numpy(),
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
    )
    assert float(mean_ssim(x, y)) == pytest.approx(ref, abs=1e-5)


# ---------------------------------------------------------------- weight maps
def test_patch_maps_favour_the_informative_input():
    tex = _textured(6)
    flat = torch.full_like(tex, 0.5)
    m = patch_weight_maps(tex, flat)  # IR textured, visible constant
    assert (m["int"][:, 0] > 0.95).all() and (m["det"][:, 0] > 0.95).all()
    m = patch_weight_maps(flat, tex)  # IR constant, visible textured
    assert (m["int"][:, 1] > 0.95).all() and (m["det"][:, 1] > 0.95).all()
    m = patch_weight_maps(flat, flat)
    torch.testing.assert_close(m["det"], torch.full_like(m["det"], 0.5))
    for maps in m.values():
        torch.testing.assert_close(maps.sum(1), torch.ones(2, H, W))


def test_patch_maps_vary_per_pixel():
    """Left half: IR textured / visible flat; right half: the reverse -> the maps switch sides."""
    tex = _textured(7, b=1, h=32, w=64)
    flat = torch.full_like(tex, 0.5)
    ir = torch.cat([tex[..., :32], flat[..., 32:]], dim=-1)
    vi = torch.cat([flat[..., :32], tex[..., 32:]], dim=-1)
    det_ir = patch_weight_maps(ir, vi, window=11)["det"][0, 0]
    assert (det_ir[:, :20] > 0.9).all() and (det_ir[:, 44:] < 0.1).all()


def test_fixed_weighting_flattens_the_maps_and_follows_stats_weighting():
    tex = _textured(9)
    flat = torch.full_like(tex, 0.5)
    for maps in patch_weight_maps(tex, flat, weighting="fixed").values():
        assert torch.equal(maps, torch.full_like(maps, 0.5))
    with pytest.raises(ValueError, match="weighting"):
        patch_weight_maps(tex, flat, weighting="flat")
    params = load_params(REPO / "params.yaml")
    assert FusionLoss.from_params(loss_section(params)).patch_weighting == "adaptive"
    fixed = {**params, "stats": {**params["stats"], "weighting": "fixed"}}
    cfg = loss_section(fixed)
    assert cfg["patch"]["weighting"] == "fixed" and params["loss"]["patch"].get("weighting") is None  # no mutation
    assert FusionLoss.from_params(cfg).patch_weighting == "fixed"
    # the weighting reaches the patch terms: flat IR beside textured visible weighs differently
    half = {k: 0.5 for k in ("int_ir", "int_vi", "det_ir", "det_vi")}
    fused = tex.clone()  # equal to IR: only the visible error counts, weighted by the VIS map
    terms = {w: FusionLoss(patch_enabled=True, style_enabled=False, feature_enabled=False, patch_weighting=w)(
        fused, tex, flat, half)[1]["patch_intensity"] for w in ("adaptive", "fixed")}
    assert float(terms["fixed"]) > 5 * float(terms["adaptive"]) > 0  # adaptive: VIS (flat) weighs ~0
    with pytest.raises(ParamsError, match="loss.patch.weighting"):
        FusionLoss.from_params(loss_section({**params, "stats": {"weighting": "flat"}}))


def test_patch_maps_spread_on_a_real_pair():
    from pipeline.data.images import find_pairs, read_ir, read_visible, split_luma, to_float

    root = shared_dataset("TNO")
    pairs, _ = find_pairs(root / "ir", root / "vi")
    pair = pairs[0]
    ir = torch.from_numpy(to_float(read_ir(pair.ir)))[None, None]
    vi = torch.from_numpy(to_float(split_luma(read_visible(pair.vi))[0]))[None, None]
    m = patch_weight_maps(ir, vi)
    for name in ("int", "det"):
        p5, p95 = np.percentile(m[name][0, 0].numpy(), [5, 95])
        assert p95 - p5 > 0.3, (name, p5, p95)  # not the authors' near-0.5 constant


# ---------------------------------------------------------------- terms
def test_each_term_zero_at_its_target_positive_otherwise(loss_fn):
    ir = _textured(8)
    vi_flat = torch.full_like(ir, 0.5)  # the patch maps then give IR the weight everywhere
    feats = _features(2, 0)
    feats["fusion"] = [  # exactly the IR-weighted target
        F.interpolate(feats["ir"][i], size=f.shape[-2:], mode="bilinear", align_corners=False)
        for f, i in zip(feats["fusion"], (0, 1, 1, 2, 2))
    ]
    total, terms = loss_fn(ir, ir, vi_flat, IR_ONLY, feats)
    assert set(terms) == {"intensity", "ssim", "gradient", "patch_intensity", "patch_ssim",
                          "patch_gradient", "style", "feature"}
    for name, value in terms.items():
        assert float(value) == pytest.approx(0.0, abs=1e-4), name
    assert float(total) == pytest.approx(0.0, abs=1e-3)

    other = _textured(9)
    total, terms = loss_fn(other, ir, vi_flat, IR_ONLY, _features(2, 1))
    for name, value in terms.items():
        assert float(value) > 1e-3, name
    expected = sum(loss_fn.term_weights[k] * v for k, v in terms.items())
    torch.testing.assert_close(total.detach(), expected)


def test_intensity_uses_per_sample_weights(loss_fn):
    fused, ir, vi = _textured(10), _textured(11), _textured(12)
    w = {"int_ir": torch.tensor([0.8, 0.3]), "int_vi": torch.tensor([0.2, 0.7]),
         "det_ir": torch.tensor([0.5, 0.5]), "det_vi": torch.tensor([0.5, 0.5])}
    _, terms = loss_fn(fused, ir, vi, w)
    mse = lambda a, b: ((a - b) ** 2).mean(dim=(1, 2, 3))  # noqa: E731
    expected = (w["int_ir"] * mse(fused, ir) + w["int_vi"] * mse(fused, vi)).mean()
    torch.testing.assert_close(terms["intensity"], expected)
    # visible weight 1: minimum at fused == vi
    w_vi = {"int_ir": 0.0, "int_vi": 1.0, "det_ir": 0.0, "det_vi": 1.0}
    _, terms = loss_fn(vi, ir, vi, w_vi)
    for name in ("intensity", "ssim", "gradient"):
        assert float(terms[name]) == pytest.approx(0.0, abs=1e-5), name


def test_gram_and_feature_terms():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 8, 6, 6, generator=gen), torch.rand(2, 8, 6, 6, generator=gen) ** 3
    assert torch.equal(gram_distance(x, x), torch.zeros(2))
    d = gram_distance(x, y)
    assert (d > 0).all() and (d <= 1).all()  # non-negative features -> at most 1 per layer
    torch.testing.assert_close(gram_distance(3 * x, 3 * y), d)  # scale-free
    feats = _features(2, 2)
    feats["fusion"] = [f.requires_grad_() for f in feats["fusion"]]
    for t in feats["ir"] + feats["vi"]:
        t.requires_grad_()
    loss = feature_loss(feats, torch.tensor([0.6, 0.2]), torch.tensor([0.4, 0.8]))
    loss.backward()
    assert float(loss.detach()) > 0
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats["fusion"])
    assert all(t.grad is None for t in feats["ir"] + feats["vi"])  # target is detached
    with pytest.raises(ValueError, match="lacks 'fusion'"):
        feature_loss({"ir": feats["ir"], "vi": feats["vi"]}, torch.ones(2), torch.zeros(2))


# ---------------------------------------------------------------- robustness
@pytest.mark.parametrize("values", [(0.5, 0.0, 1.0), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)])
def test_finite_loss_and_gradients_for_constant_inputs(loss_fn, values):
    f0, a0, b0 = values
    fused = torch.full((2, 1, H, W), f0, requires_grad=True)
    ir, vi = torch.full((2, 1, H, W), a0), torch.full((2, 1, H, W), b0)
    feats = _features(2, 3)
    total, terms = loss_fn(fused, ir, vi, None, feats)
    total.backward()
    assert torch.isfinite(total)
    assert all(torch.isfinite(v) for v in terms.values())
    assert torch.isfinite(fused.grad).all()


def test_gradients_flow_to_fused_for_any_size(loss_fn):
    for h, w in ((11, 13), (37, 50)):
        fused = torch.rand(1, 1, h, w, requires_grad=True)
        total, terms = loss_fn(fused, torch.rand(1, 1, h, w), torch.rand(1, 1, h, w), None)
        assert all(not v.requires_grad for v in terms.values())
        total.backward()
        assert torch.isfinite(fused.grad).all() and fused.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="smaller than 11 px"):
        loss_fn(torch.rand(1, 1, 10, 20), torch.rand(1, 1, 10, 20), torch.rand(1, 1, 10, 20), None)
    with pytest.raises(ValueError, match="weights dict lacks 'det_vi'"):
        x = torch.rand(1, 1, 16, 16)
        loss_fn(x, x, x, {"int_ir": 1.0, "int_vi": 0.0, "det_ir": 1.0})


# ---------------------------------------------------------------- params
def test_from_params_repo_file_and_key_errors(caplog):
    cfg = section(load_params(REPO / "params.yaml"), "loss")
    FusionLoss.from_params(cfg)  # the repository's loss as configured
    cfg = {**cfg, "style": {**cfg["style"], "enabled": True}}  # the VGG checks need the style term
    with caplog.at_level(logging.WARNING, logger="pipeline.model.vgg"):
        loss = FusionLoss.from_params(cfg)
    if cfg.get("vgg_weights") is None:
        assert loss.vgg_source.startswith("random-init(seed=")
        assert any("random initialisation" in r.getMessage() for r in caplog.records)
    no_style = {**cfg, "style": {**cfg["style"], "enabled": False}}
    assert FusionLoss.from_params(no_style).vgg_source.startswith("none")

    missing = {**cfg, "ssim": {"enabled": True}}
    with pytest.raises(ParamsError, match=r"loss\.ssim\.weight"):
        FusionLoss.from_params(missing)
    bad_kind = {**cfg, "intensity": {"weight": 1.0, "kind": "huber"}}
    with pytest.raises(ParamsError, match=r"loss\.intensity\.kind"):
        FusionLoss.from_params(bad_kind)
    bad_temp = {**cfg, "patch": {**cfg["patch"], "temperature": 0}}
    with pytest.raises(ParamsError, match=r"loss\.patch\.temperature"):
        FusionLoss.from_params(bad_temp)
    bad_path = {**cfg, "vgg_weights": str(REPO / "no_such_vgg.pth")}
    with pytest.raises(FileNotFoundError, match="no_such_vgg.pth"):
        FusionLoss.from_params(bad_path)


# ---------------------------------------------------------------- loss targets (blend / max; issue 10)
def _target_loss(**kw) -> FusionLoss:
    base = dict(ssim_enabled=False, patch_enabled=False, style_enabled=False, feature_enabled=False,
                intensity_kind="l1")
    base.update(kw)
    return FusionLoss(**base)


def test_max_target_hand_made():
    a = torch.tensor([[[[0.2, 0.8], [0.5, 0.1]]]])
    b = torch.tensor([[[[0.6, 0.3], [0.5, 0.4]]]])
    target, r = max_target(a, b, torch.tensor(0.8), torch.tensor(0.2))
    torch.testing.assert_close(target, torch.tensor([[[[0.6, 0.8], [0.5, 0.4]]]]))
    # weight 2*w of the source that supplies the target (ties: a)
    torch.testing.assert_close(r, torch.tensor([[[[0.4, 1.6], [1.6, 0.4]]]]))


def test_max_intensity_is_zero_at_the_pixel_max_and_blend_is_not():
    a = torch.zeros(1, 1, 16, 16)
    a[..., :8] = 0.9                     # IR bright on the left
    b = torch.full((1, 1, 16, 16), 0.4)  # flat visible
    fmax = torch.maximum(a, b)
    w = {"int_ir": 0.5, "int_vi": 0.5, "det_ir": 0.5, "det_vi": 0.5}
    lmax = _target_loss(intensity_target="max", gradient_enabled=False)
    lblend = _target_loss(intensity_target="blend", gradient_enabled=False)
    assert float(lmax(fmax, a, b, w)[1]["intensity"]) == 0.0
    # hand computation: the blend term at the pixel max is 0.5*mean|max-a| + 0.5*mean|max-b|
    expected = 0.5 * float((fmax - a).abs().mean()) + 0.5 * float((fmax - b).abs().mean())
    assert float(lblend(fmax, a, b, w)[1]["intensity"]) == pytest.approx(expected, rel=1e-6)
    # the average of the inputs is penalised by max: |avg - max| with weight 2*0.5 = 1
    favg = (a + b) / 2
    assert float(lmax(favg, a, b, w)[1]["intensity"]) == pytest.approx(float((favg - fmax).abs().mean()), rel=1e-6)


def test_max_gradient_keeps_an_edge_present_only_in_ir():
    a = torch.zeros(1, 1, 16, 16)
    a[..., 8:] = 1.0                     # vertical edge in IR only
    b = torch.full((1, 1, 16, 16), 0.5)  # flat visible
    w = {"int_ir": 0.5, "int_vi": 0.5, "det_ir": 0.25, "det_vi": 0.75}
    lmax = _target_loss(gradient_target="max", intensity_weight=0.0)
    lblend = _target_loss(gradient_target="blend", intensity_weight=0.0)
    # f = a has the full IR edge: zero under max; blend asks for 0.25 of the edge and penalises it
    assert float(lmax(a, a, b, w)[1]["gradient"]) == 0.0
    assert float(lblend(a, a, b, w)[1]["gradient"]) > 0.0
    # an edge at 0.25 strength (what blend asks for) is penalised under max
    f = 0.5 + 0.25 * (a - 0.5)
    assert float(lmax(f, a, b, w)[1]["gradient"]) > 0.0
    assert float(lblend(f, a, b, w)[1]["gradient"]) == pytest.approx(0.0, abs=1e-6)


def test_max_adaptive_weights_shape_the_loss():
    a = torch.zeros(1, 1, 16, 16)
    a[..., :8] = 0.9                     # IR supplies the max on the left half
    b = torch.full((1, 1, 16, 16), 0.4)  # visible on the right half
    f = torch.full((1, 1, 16, 16), 0.4)  # misses the IR target (error 0.5 on the left), exact on the right
    lmax = _target_loss(intensity_target="max", gradient_enabled=False)
    def term(w_ir):
        w = {"int_ir": w_ir, "int_vi": 1 - w_ir, "det_ir": 0.5, "det_vi": 0.5}
        return float(lmax(f, a, b, w)[1]["intensity"])
    # mean over pixels of 2*w_ir*0.5 on the left half = 0.5 * w_ir
    assert term(0.5) == pytest.approx(0.25, rel=1e-6)
    assert term(0.9) == pytest.approx(0.45, rel=1e-6)
    assert term(0.1) == pytest.approx(0.05, rel=1e-6)


def test_patch_level_max_uses_the_weight_maps():
    a, b = _textured(3), _textured(4)
    f = (a + b) / 2
    lf = _target_loss(intensity_target="max", gradient_target="max", patch_enabled=True)
    total, terms = lf(f, a, b, None)
    assert {"intensity", "gradient", "patch_intensity", "patch_gradient"} <= set(terms)
    assert all(torch.isfinite(v) and v > 0 for v in terms.values())
    total.backward() if total.requires_grad else None


def test_gradients_flow_with_max_targets():
    a, b = _textured(5), _textured(6)
    f = ((a + b) / 2).clone().requires_grad_(True)
    total, _ = _target_loss(intensity_target="max", gradient_target="max")(f, a, b, None)
    total.backward()
    assert f.grad is not None and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


def test_unknown_target_is_rejected():
    with pytest.raises(ValueError, match="intensity_target"):
        _target_loss(intensity_target="min")


def test_paper_profile_is_one_parameter():
    params = section(load_params(REPO / "params.yaml"), "loss")
    ours = FusionLoss.from_params(params)
    assert params.get("profile", "ours") == "ours"
    assert (ours.intensity_target, ours.gradient_target) == ("max", "max")   # the default: our extension
    paper = FusionLoss.from_params({**params, "profile": "paper"})
    assert (paper.intensity_target, paper.gradient_target) == ("blend", "blend")
    assert paper.intensity_kind == "mse"
    assert set(paper.term_weights) == {"intensity", "ssim", "gradient", "patch_intensity", "patch_ssim",
                                       "patch_gradient", "style", "feature"}
    assert paper.term_weights["gradient"] == 1.0 and paper.term_weights["patch_gradient"] == 2.0
    cfg = apply_profile({**params, "profile": "paper"})
    assert all(cfg[k][kk] == v for k, d in PAPER_PROFILE.items() for kk, v in d.items())
    assert cfg["patch"]["window"] == params["patch"]["window"]  # keys the profile does not set are kept
    with pytest.raises(ParamsError, match="loss.profile"):
        FusionLoss.from_params({**params, "profile": "seafusion"})
    with pytest.raises(ParamsError, match="loss.intensity.target"):
        FusionLoss.from_params({**params, "intensity": {**params["intensity"], "target": "min"}})


def test_switches_that_keep_bright_regions_bright():
    """loss.ssim.luminance: false drops SSIM's pull towards the darker input's local mean (the cause
    of darkened day scenes); loss.intensity.adaptive: false is the plain max loss (issue 20)."""
    import torch

    from pipeline.train.losses import ssim_map

    sky_vi = torch.full((1, 1, 16, 16), 0.8) + 0.05 * torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    sky_ir = 0.1 + (sky_vi - 0.8)  # same texture, dark
    for fused, name in ((sky_vi, "kept"), (sky_vi - 0.35, "darkened")):
        full = float(ssim_map(fused, sky_ir).mean())
        cs = float(ssim_map(fused, sky_ir, luminance=False).mean())
        if name == "kept":
            kept_full, kept_cs = full, cs
    # with the luminance factor, darkening the sky raises SSIM to IR; without it nothing changes
    assert full > kept_full + 0.1 and abs(cs - kept_cs) < 1e-4
