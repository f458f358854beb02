"""pipeline.train.step (optimiser, schedule, train_step, whole-image validation) and the patch and
validation data they consume (pipeline.train.data), without Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from train_fixtures import make_train_inputs, patch_batch, tiny_loss, tiny_model, tiny_params

from pipeline.common.config import ParamsError
from pipeline.data.images import ImageError
from pipeline.train.data import (
    WEIGHT_KEYS,
    count_train_patches,
    decode_patches,
    load_val_pairs,
    weight_columns,
)
from pipeline.train.settings import TrainSettings, train_settings
from pipeline.train.step import build_optimizer, build_scheduler, lr_factor, train_step, validate


def test_decode_patches_shapes_range_and_values():
    raw, ir, vi = patch_batch(n=3, s=8)
    out = decode_patches(raw)
    assert out["ir"].shape == (3, 1, 8, 8) and out["ir"].dtype == np.float32
    np.testing.assert_allclose(out["ir"][:, 0] * 255, ir, atol=1e-4)
    np.testing.assert_allclose(out["vi"][:, 0] * 255, vi, atol=1e-4)
    assert 0.0 <= out["vi"].min() and out["vi"].max() <= 1.0
    for k in WEIGHT_KEYS:
        assert out[k].shape == (3,) and out[k].dtype == np.float32
    np.testing.assert_allclose(out["int_ir"] + out["int_vi"], 1.0, atol=1e-6)


def test_decode_patches_rejects_bad_rows():
    raw, _, _ = patch_batch(n=2, s=8)
    bad = dict(raw, size=np.array([8, 16], np.int32))
    with pytest.raises(ValueError, match="mixes patch sizes"):
        decode_patches(bad)
    bad = dict(raw, ir=np.array([b"\x00" * 10, b"\x00" * 64], dtype=object))
    with pytest.raises(ValueError, match="'ir'"):
        decode_patches(bad)
    bad = {k: v for k, v in raw.items() if k != "w_det_vi"}
    with pytest.raises(ValueError, match="w_det_vi"):
        decode_patches(bad, "patch")
    decode_patches(bad)  # the default (image weights) does not read w_*
    with pytest.raises(ValueError, match="img_w_det_vi"):
        decode_patches({k: v for k, v in raw.items() if k != "img_w_det_vi"})


@pytest.mark.parametrize("mode, prefix", [("image", "img_w_"), ("patch", "w_")])
def test_sample_weights_choose_the_columns_that_reach_the_loss(tmp_path, mode, prefix):
    from pipeline.train.data import PatchCollate

    assert weight_columns(mode) == tuple(prefix + k for k in WEIGHT_KEYS)
    params = tiny_params(tmp_path, sample_weights=mode)
    assert train_settings(params).sample_weights == mode
    raw, _, _ = patch_batch(n=4, s=16)
    batch = PatchCollate("cpu", train_settings(params).sample_weights)(raw)  # what a training worker gets
    loss = tiny_loss(params)
    seen = {}

    def recording_loss(fused, ir, vi, weights, features=None):
        seen.update({k: v.clone() for k, v in weights.items()})
        return loss(fused, ir, vi, weights, features=features)

    model = tiny_model()
    out = train_step(model, batch, recording_loss, build_optimizer(model, TrainSettings()))
    assert set(seen) == set(WEIGHT_KEYS)
    for k in WEIGHT_KEYS:
        np.testing.assert_allclose(seen[k].numpy(), raw[prefix + k].astype(np.float32), rtol=1e-6)
    # the two choices are different numbers, so they give different losses on the same batch
    other = "patch" if mode == "image" else "image"
    fused = tiny_model()(batch["ir"], batch["vi"]).detach()
    w_other = {k: torch.from_numpy(v) for k, v in decode_patches(raw, other).items() if k in WEIGHT_KEYS}
    assert float(loss(fused, batch["ir"], batch["vi"], w_other)[0]) != pytest.approx(
        float(loss(fused, batch["ir"], batch["vi"], {k: batch[k] for k in WEIGHT_KEYS})[0]), rel=1e-6)
    assert math.isfinite(out["loss"])
    with pytest.raises(ParamsError, match="train.sample_weights"):
        train_settings(tiny_params(tmp_path, sample_weights="pixel"))


def test_lr_schedule_warms_up_then_decays_per_step():
    f = [lr_factor(i, 20, 4, 0.1) for i in range(21)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(f[3:], f[4:]))
    assert f[20] == pytest.approx(0.1) and f[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    model = torch.nn.Linear(2, 1)
    s = TrainSettings(lr=1.0, warmup_steps=2, min_lr_ratio=0.0)
    opt = build_optimizer(model, s)
    sched = build_scheduler(opt, s, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0) and lrs[2] == pytest.approx(1.0) and lrs[-1] < lrs[3] < lrs[2]


def test_train_step_updates_clips_and_reports_every_term(tmp_path):
    params = tiny_params(tmp_path)
    loss_fn = tiny_loss(params)
    model = tiny_model()
    raw, _, _ = patch_batch(n=4, s=16)
    batch = {k: torch.from_numpy(v) for k, v in decode_patches(raw).items()}
    s = TrainSettings(lr=1e-3, warmup_steps=0)
    opt = build_optimizer(model, s)
    before = [p.detach().clone() for p in model.parameters()]
    out = train_step(model, batch, loss_fn, opt, build_scheduler(opt, s, 10), grad_clip=1e-3)
    assert set(loss_fn.term_weights) <= set(out) and out["lr"] == pytest.approx(1e-3)
    assert math.isfinite(out["loss"]) and out["grad_norm"] > 1e-3
    total = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in model.parameters() if p.grad is not None))
    assert total == pytest.approx(1e-3, rel=1e-3)  # clipped to grad_clip
    assert all(p.grad is not None for p in model.parameters()), "every parameter must get a gradient (DDP)"
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_validate_scores_whole_images_and_keeps_colour_samples(tmp_path):
    inputs = make_train_inputs(tmp_path, n_train=1, n_val=2, size=(44, 60))
    assert count_train_patches(inputs["patches"]) == inputs["n_train_patches"]
    pairs = load_val_pairs(inputs["registered"], inputs["split"], inputs["images"])
    assert [p.stem for p in pairs] == ["v00", "v01"] and pairs[0].vi_crcb is not None
    sums, samples = validate(tiny_model(), pairs, tiny_loss(tiny_params(tmp_path)), keep=1)
    assert sums["count"] == 2
    for k in ("val_loss", "val_ssim", "val_qabf", "val_intensity"):
        assert math.isfinite(sums[k])
    assert 0 < sums["val_qabf"] / 2 < 1
    assert len(samples) == 1 and samples[0][1].shape == (44, 60, 3) and samples[0][1].dtype == np.uint8


def test_validation_fuses_whole_images_as_the_fuser_does(tmp_path):
    """Validation and ``Fuser`` share one pad/fuse/crop (``pipeline.model.inference.fuse_padded``)."""
    from pipeline.model.inference import Fuser, postprocess
    from pipeline.train.step import _score_pair

    inputs = make_train_inputs(tmp_path, n_train=1, n_val=1, size=(44, 60))  # no multiple of 8: padded
    pair = load_val_pairs(inputs["registered"], inputs["split"], inputs["images"])[0]
    with torch.inference_mode():
        _, fused = _score_pair(tiny_model().eval(), pair, tiny_loss(tiny_params(tmp_path)), "cpu")
    raw = Fuser(tiny_model(), postprocess="clip", channels_last=False).fuse_luma(pair.ir, pair.vi_y)
    expected = postprocess(raw, "clip")
    assert fused.shape == expected.shape == (44, 60) and fused.dtype == np.uint8
    assert np.abs(fused.astype(int) - expected).max() <= 1 and (fused == expected).mean() > 0.99


def test_val_inputs_errors_name_the_file(tmp_path):
    inputs = make_train_inputs(tmp_path, n_train=1, n_val=1)
    with pytest.raises(FileNotFoundError, match="split.json"):
        load_val_pairs(inputs["registered"], tmp_path / "nope" / "split.json", inputs["images"])
    (inputs["registered"] / "vi" / "v00.png").unlink()
    with pytest.raises(ImageError, match="v00"):  # pipeline.data.contracts.read_registered_pair
        load_val_pairs(inputs["registered"], inputs["split"], inputs["images"])
    with pytest.raises(FileNotFoundError, match="Parquet"):
        count_train_patches(tmp_path / "empty")
    import pandas as pd

    pd.DataFrame({"pair_id": ["v00"], "split": ["val"], "w_int_ir": [0.5]}).to_parquet(inputs["images"])
    (inputs["registered"] / "vi" / "v00.png").write_bytes((inputs["registered"] / "ir" / "v00.png").read_bytes())
    with pytest.raises(ValueError, match="images.parquet.*w_int_vi"):
        load_val_pairs(inputs["registered"], inputs["split"], inputs["images"])


def test_step_clock_times_every_phase_of_a_step(tmp_path):
    from pipeline.train.step import StepClock

    params = tiny_params(tmp_path)
    model, loss_fn = tiny_model(), tiny_loss(params)
    raw, _, _ = patch_batch(n=2, s=16)
    batch = {k: torch.from_numpy(v) for k, v in decode_patches(raw).items()}
    opt = build_optimizer(model, TrainSettings())
    clock = StepClock()
    for _ in range(3):
        clock.restart()
        train_step(model, batch, loss_fn, opt, clock=clock)
        clock.mark("log")
        clock.end_step()
    assert len(clock.steps) == 3 and clock.first_mark_at is not None
    assert list(clock.steps[0]) == ["forward", "loss", "backward", "clip", "optimiser", "log"]
    summary = clock.summary(skip=1)
    assert set(summary) == {"forward", "loss", "backward", "clip", "optimiser", "log", "step"}
    assert summary["backward"]["wall_s"] > 0 and summary["forward"]["cpu_s"] > 0
    total = [sum(w for w, _ in st.values()) for st in clock.steps[1:]]
    assert summary["step"]["wall_s"] == pytest.approx(float(np.median(total)))


def test_channels_last_and_fused_adamw_keep_the_maths(tmp_path):
    """The stage's speed-ups (prepare_for_training of the model and the loss, the fused AdamW of
    build_optimizer) give the losses, gradients and updated weights of the plain NCHW model and
    loss with the for-loop AdamW."""
    from pipeline.train.step import prepare_for_training

    params = tiny_params(tmp_path)
    for term in ("patch", "style", "feature"):  # every term, the VGG of the style term too
        params["loss"][term] = {**params["loss"][term], "enabled": True}
    loss_fn, fast_loss = tiny_loss(params), prepare_for_training(tiny_loss(params), "cpu")
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in fast_loss.parameters() if p.dim() == 4)
    raw, _, _ = patch_batch(n=4, s=16)
    batch = {k: torch.from_numpy(v) for k, v in decode_patches(raw).items()}
    s = TrainSettings(lr=1e-2, warmup_steps=0)
    plain_model = tiny_model()
    fast_model = prepare_for_training(tiny_model(), "cpu")
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in fast_model.parameters() if p.dim() == 4)
    assert all(torch.equal(a, b) for a, b in zip(plain_model.state_dict().values(), fast_model.state_dict().values()))
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=s.lr, weight_decay=s.weight_decay, foreach=False)
    fast_opt = build_optimizer(fast_model, s)
    assert fast_opt.param_groups[0]["fused"] is True
    for _ in range(3):
        a = train_step(plain_model, batch, loss_fn, plain_opt, grad_clip=1.0)
        b = train_step(fast_model, batch, fast_loss, fast_opt, grad_clip=1.0)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # Float noise: where a gradient is ~0, the two kernels' rounding can flip its sign, and Adam turns
    # that into a whole step of +-lr; everywhere else the weights agree to 1e-3 relative.
    p = torch.cat([t.detach().flatten() for t in plain_model.parameters()])
    q = torch.cat([t.detach().flatten() for t in fast_model.parameters()])
    off = (q - p).abs() > 1e-5 + 1e-3 * p.abs()
    assert off.float().mean() < 1e-3, f"{int(off.sum())} of {p.numel()} weights differ"
    assert float((q - p).abs().max()) <= 2 * 3 * s.lr + 1e-6


def test_schedule_follows_whichever_budget_runs_out_first():
    """train.steps and train.max_seconds: the cosine decay runs on the larger share used, and the
    run stops on the first budget that ends, saying which (issue 19)."""
    model = torch.nn.Linear(2, 1)
    s = TrainSettings(lr=1.0, warmup_steps=0, min_lr_ratio=0.0, max_seconds=100.0)
    opt = build_optimizer(model, s)
    sched = build_scheduler(opt, s, total_steps=1000)
    assert sched.update(0.0) == pytest.approx(1.0)
    assert sched.update(50.0) == pytest.approx(0.5)  # half the time used, almost no steps: the time leads
    assert sched.done(50.0) is None and sched.done(100.0) == "time"
    for _ in range(1000):
        sched.step()
    assert sched.done(1.0) == "steps"
    state = sched.state_dict()
    resumed = build_scheduler(build_optimizer(model, s), s, total_steps=1000)
    resumed.load_state_dict(state)
    assert resumed.steps_done == 1000 and resumed.done(0.0) == "steps"
    no_clock = TrainSettings(lr=1.0, warmup_steps=0, min_lr_ratio=0.0)
    plain = build_scheduler(build_optimizer(model, no_clock), no_clock, total_steps=10)
    assert plain.update(1e9) == pytest.approx(1.0) and plain.done(1e9) is None  # no time budget
