"""Loading the authors' weights (strict, faithful) and our checkpoints (round trip, bad files)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.images import read_ir, read_visible, split_luma
from pipeline.model.inference import Fuser
from pipeline.model.network import build_model
from pipeline.model.weights import (
    OFFICIAL_UNUSED_KEYS,
    _read,
    load_model,
    map_official_state_dict,
    resolve_model_source,
    save_checkpoint,
)
from conftest import shared_dataset, shared_file

OFFICIAL = ("models", "mda_official", "fusion_model.pth")


@pytest.fixture(scope="module")
def official_path():
    return shared_file(*OFFICIAL)


@pytest.fixture(scope="module")
def official_state(official_path) -> dict[str, torch.Tensor]:
    return dict(_read(official_path)["model"])


@pytest.fixture(scope="module")
def official(official_path):
    return load_model(official_path)


@pytest.fixture(scope="module")
def tno_pair():
    """The smallest TNO pair (37: 247x359, not a multiple of 8): IR and visible luma, uint8."""
    root = shared_dataset("TNO")
    ir = read_ir(root / "ir" / "37.png")
    y, _ = split_luma(read_visible(root / "vi" / "37.png"))
    return ir, y


def reference_forward(sd: dict[str, torch.Tensor], ir: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """Straightforward re-statement of the authors' forward from ARCHITECTURE.md, on THEIR keys.

    Independent of our module tree and key mapping; like their code it upsamples by comparing
    heights and evaluates the attention modules once per output.
    """

    def conv(x, k, stride=1):
        w = sd[k + ".weight"]
        return F.conv2d(x, w, sd[k + ".bias"], stride=stride, padding=w.shape[-1] // 2)

    def tconv(x, k):
        return F.conv_transpose2d(x, sd[k + ".weight"], sd[k + ".bias"], stride=2, padding=1, output_padding=1)

    def prelu(x, k):
        return F.prelu(x, sd[k + ".weight"])

    def res_down(x, p, s):
        r = prelu(conv(x, p + ".res.0"), p + ".res.1")
        r = prelu(conv(r, p + ".res.2"), p + ".res.3")
        r = conv(conv(r, p + ".res.4", s), p + ".res.5")
        return r + prelu(conv(conv(x, p + ".down_conv.0"), p + ".down_conv.1", s), p + ".down_conv.2")

    def res_up(x, p):
        r = prelu(conv(x, p + ".res.0"), p + ".res.1")
        r = prelu(conv(r, p + ".res.2"), p + ".res.3")
        r = conv(tconv(r, p + ".res.4"), p + ".res.5")
        return r + prelu(tconv(conv(x, p + ".up_conv.0"), p + ".up_conv.1"), p + ".up_conv.2")

    def channel_map(x, y, p):
        if x.shape[2] < y.shape[2]:
            x = prelu(tconv(x, p + ".up.0"), p + ".up.1")
        z = prelu(conv(F.adaptive_avg_pool2d(x + y, 1), p + ".channel_down.0"), p + ".channel_down.1")
        return [torch.sigmoid(conv(z, p + ".channel_up1.0")), torch.sigmoid(conv(z, p + ".channel_up2.0"))]

    def spatial_map(x, y, p):
        if x.shape[2] < y.shape[2]:
            x = prelu(tconv(x, p + ".trans_conv.0"), p + ".trans_conv.1")
        f = prelu(conv(torch.cat([x, y], 1), p + ".conv_fusion.0"), p + ".conv_fusion.1")
        f = prelu(conv(f, p + ".down.0", 2), p + ".down.1")
        return [torch.sigmoid(tconv(f, p + ".up1.0")), torch.sigmoid(tconv(f, p + ".up2.0"))]

    def fusion(x, y, p):
        x_up = torch.relu(tconv(x, p + ".up.0")) if x.shape[2] < y.shape[2] else x
        return (x_up * channel_map(x, y, p + ".channel_map")[0] * spatial_map(x, y, p + ".spatial_map")[0]
                + y * channel_map(x, y, p + ".channel_map")[1] * spatial_map(x, y, p + ".spatial_map")[1])

    def enc(x):
        x0 = conv(x, "input")
        x4 = res_down(res_down(x0, "downsample_4x.0", 2), "downsample_4x.1", 2)
        return res_down(x0, "downsample_1x", 1), res_down(x0, "downsample_2x", 2), x4

    ir1, ir2, ir4 = enc(ir)
    vi1, vi2, vi4 = enc(vis)
    cat = torch.cat([
        fusion(ir1, vi1, "fusion_1x"), fusion(ir2, vi1, "fusion_2x"),
        res_up(fusion(ir2, vi2, "fusion_1x"), "upsample_2x"), res_up(fusion(ir4, vi2, "fusion_2x"), "upsample_2x"),
        res_up(res_up(fusion(ir4, vi4, "fusion_1x"), "upsample_4x.0"), "upsample_4x.1"),
    ], 1)
    return torch.tanh(conv(conv(cat, "output.0"), "output.1")) / 2 + 0.5


def test_official_weights_load_strictly(official, official_state):
    model, info = official
    assert info["kind"] == "official" and info["postprocess"] == "minmax" and info["name"] == "mda"
    assert info["args"] == {"width": 32, "reduction": 8, "up2_channels": 16, "up4_channels": 8}
    assert len(official_state) == 165
    assert set(OFFICIAL_UNUSED_KEYS) <= set(official_state)
    mapped = map_official_state_dict(official_state, model)
    assert set(mapped) == set(model.state_dict())  # every one of our tensors comes from the file
    assert len(mapped) + len(OFFICIAL_UNUSED_KEYS) == len(official_state)  # and every file tensor is used
    unused = sum(official_state[k].numel() for k in OFFICIAL_UNUSED_KEYS)
    assert unused == 31_906


def test_matches_independent_reference_of_authors_forward(official, official_state, tno_pair):
    model, _ = official
    ir_u8, y_u8 = tno_pair
    ir = torch.from_numpy(ir_u8[64:112, 120:184]).float()[None, None] / 255
    vi = torch.from_numpy(y_u8[64:112, 120:184]).float()[None, None] / 255
    with torch.no_grad():
        ours = model(ir, vi)
        ref = reference_forward(official_state, ir, vi)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_official_fusion_is_plausible_on_tno(official, tno_pair):
    model, _ = official
    ir, y = tno_pair
    fuser = Fuser(model, postprocess="minmax")
    raw = fuser.fuse_luma(ir, y)
    assert raw.shape == ir.shape
    # documented raw range of the released weights on TNO (ARCHITECTURE.md section 3)
    assert 0.29 <= raw.min() <= 0.46 and 0.50 <= raw.max() <= 0.61
    from pipeline.model.inference import postprocess

    fused = postprocess(raw, "minmax").astype(np.float64)
    a, b = ir.astype(np.float64).ravel(), y.astype(np.float64).ravel()
    c_ab = np.corrcoef(a, b)[0, 1]
    assert np.corrcoef(fused.ravel(), a)[0, 1] > c_ab
    assert np.corrcoef(fused.ravel(), b)[0, 1] > c_ab
    hot = ir >= np.percentile(ir, 99)  # bright IR targets stay bright in the fused image
    assert np.median(fused[hot]) > np.percentile(fused, 75)


def _save_official_variant(tmp_path, state, name):
    path = tmp_path / name
    torch.save({"model": state, "lr": 1e-5}, path)
    return path


def test_official_missing_extra_or_misshaped_key_fails_clearly(tmp_path, official_state):
    missing = dict(official_state)
    del missing["fusion_2x.spatial_map.up1.0.weight"]
    with pytest.raises(ValueError, match="lack.*fusion_2x.spatial_map.up1.0.weight"):
        load_model(_save_official_variant(tmp_path, missing, "missing.pth"))
    extra = dict(official_state, **{"fusion_2x.extra.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="unexpected.*fusion_2x.extra.weight"):
        load_model(_save_official_variant(tmp_path, extra, "extra.pth"))
    no_unused = dict(official_state)
    del no_unused["fusion_1x.one.bias"]
    with pytest.raises(ValueError, match="known-unused.*fusion_1x.one.bias"):
        load_model(_save_official_variant(tmp_path, no_unused, "unused.pth"))
    shaped = dict(official_state, **{"output.1.weight": torch.zeros(1, 32, 1, 1)})
    with pytest.raises(ValueError, match="output.1.weight.*shape"):
        load_model(_save_official_variant(tmp_path, shaped, "shape.pth"))


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(3)
    args = {"width": 16, "reduction": 4, "up2_channels": 8, "up4_channels": 4}
    model = build_model("mda", **args).eval()
    path = save_checkpoint(tmp_path / "sub" / "best.pt", model, "mda", args, extra={"epoch": 7, "run_id": "abc"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.pt"]  # atomic: no temp file left
    loaded, info = load_model(path)
    assert info["kind"] == "checkpoint" and info["args"] == args and info["postprocess"] == "clip"
    assert info["meta"]["epoch"] == 7 and info["meta"]["run_id"] == "abc"
    x, y = torch.rand(1, 1, 16, 24), torch.rand(1, 1, 16, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, y), model(x, y), atol=0, rtol=0)
    # a checkpoint can record its own default post-processing
    save_checkpoint(path, model, "mda", args, extra={"postprocess": "minmax"})
    assert load_model(path)[1]["postprocess"] == "minmax"
    # DDP-wrapped models are unwrapped on save: keys never carry "module."
    obj = torch.load(path, weights_only=True)
    assert not any(k.startswith("module.") for k in obj["state_dict"])
    # a channels-last (training) model saves plain NCHW tensors with the same values
    plain = {k: v.clone() for k, v in model.state_dict().items()}  # NCHW, before the in-place conversion
    save_checkpoint(path, model.to(memory_format=torch.channels_last), "mda", args)
    assert any(not v.is_contiguous() for v in model.state_dict().values())  # the model is channels-last now
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert all(t.is_contiguous() for t in saved.values())
    assert saved.keys() == plain.keys() and all(torch.equal(saved[k], v) for k, v in plain.items())
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(path, model, "mda", args, extra={"bad": object()})


def test_bad_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_model(tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt: not a readable PyTorch weights file"):
        load_model(corrupt)
    unknown = tmp_path / "unknown.pt"
    torch.save({"weights": [1, 2, 3]}, unknown)
    with pytest.raises(ValueError, match="unknown.pt: unknown weights content"):
        load_model(unknown)
    ddp = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in build_model("mda", width=8, reduction=2).state_dict().items()}, ddp)
    with pytest.raises(ValueError, match="ddp.pt.*'module.' prefix"):
        load_model(ddp)
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"input.weight": torch.zeros(1)}, "x": np.random.default_rng(0)}, evil)
    with pytest.raises(ValueError, match="evil.pt: not a readable"):  # weights_only refuses foreign globals
        load_model(evil)


def test_resolve_model_source(tmp_path, official_path, monkeypatch):
    assert resolve_model_source(str(official_path)) == official_path
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/absent.db")
    with pytest.raises(FileNotFoundError, match="no MLflow store at .*absent.db"):  # resolution: tests/test_serving.py
        resolve_model_source("models:/mda-fusion@champion")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        resolve_model_source(tmp_path / "missing.pt")


def test_checkpoint_with_non_finite_weights_is_refused(tmp_path):
    """What a diverged run saves: refused at load, naming the file (issue 22)."""
    import torch

    from pipeline.model.network import build_model
    from pipeline.model.weights import load_model, save_checkpoint

    model = build_model("mda", width=8, reduction=2, up2_channels=4, up4_channels=4)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    path = save_checkpoint(tmp_path / "diverged.pt", model, "mda", {"width": 8, "reduction": 2,
                                                                     "up2_channels": 4, "up4_channels": 4})
    with pytest.raises(ValueError, match=r"diverged\.pt: 1 tensor\(s\) hold NaN or infinite"):
        load_model(path)


def test_non_finite_network_output_is_not_an_image():
    import numpy as np

    from pipeline.model.inference import postprocess

    raw = np.full((4, 4), 0.5)
    raw[1, 2] = np.nan
    for mode in ("clip", "minmax"):
        with pytest.raises(ValueError, match="1 NaN or infinite"):
            postprocess(raw, mode)
