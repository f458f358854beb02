"""Training pieces without Ray Train: data decoding, settings, schedule, step, validation, pyfunc."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from train_fixtures import TINY_MODEL, make_train_inputs, tiny_params

from pipeline.common.config import ParamsError
from pipeline.train.data import (
    WEIGHT_KEYS,
    count_train_patches,
    decode_patches,
    load_val_pairs,
    weight_columns,
)
from pipeline.train.driver import (
    TrainSettings,
    build_optimizer,
    build_scheduler,
    cpus_per_worker,
    lr_factor,
    train_settings,
    train_step,
    validate,
)


def _loss(params):
    from pipeline.train.losses import FusionLoss

    return FusionLoss.from_params(params["loss"])


def _model():
    from pipeline.model.network import build_model

    torch.manual_seed(0)
    return build_model(TINY_MODEL["name"], **TINY_MODEL["args"])


def _batch(n=4, s=16, seed=0):
    rng = np.random.default_rng(seed)
    ir = rng.integers(0, 256, (n, s, s), dtype=np.uint8)
    vi = rng.integers(0, 256, (n, s, s), dtype=np.uint8)
    a, b = rng.uniform(0.2, 0.8, n), rng.uniform(0.2, 0.8, n)
    c, d = rng.uniform(0.2, 0.8, n), rng.uniform(0.2, 0.8, n)
    raw = {"size": np.full(n, s, np.int32), "ir": np.array([x.tobytes() for x in ir], dtype=object),
           "vi": np.array([x.tobytes() for x in vi], dtype=object),
           "w_int_ir": a, "w_int_vi": 1 - a, "w_det_ir": b, "w_det_vi": 1 - b,
           "img_w_int_ir": c, "img_w_int_vi": 1 - c, "img_w_det_ir": d, "img_w_det_vi": 1 - d}
    return raw, ir, vi


def test_decode_patches_shapes_range_and_values():
    raw, ir, vi = _batch(n=3, s=8)
    out = decode_patches(raw)
    assert out["ir"].shape == (3, 1, 8, 8) and out["ir"].dtype == np.float32
    np.testing.assert_allclose(out["ir"][:, 0] * 255, ir, atol=1e-4)
    np.testing.assert_allclose(out["vi"][:, 0] * 255, vi, atol=1e-4)
    assert 0.0 <= out["vi"].min() and out["vi"].max() <= 1.0
    for k in WEIGHT_KEYS:
        assert out[k].shape == (3,) and out[k].dtype == np.float32
    np.testing.assert_allclose(out["int_ir"] + out["int_vi"], 1.0, atol=1e-6)


def test_decode_patches_rejects_bad_rows():
    raw, _, _ = _batch(n=2, s=8)
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
    raw, _, _ = _batch(n=4, s=16)
    batch = PatchCollate("cpu", train_settings(params).sample_weights)(raw)  # what a training worker gets
    loss = _loss(params)
    seen = {}

    def recording_loss(fused, ir, vi, weights, features=None):
        seen.update({k: v.clone() for k, v in weights.items()})
        return loss(fused, ir, vi, weights, features=features)

    model = _model()
    out = train_step(model, batch, recording_loss, build_optimizer(model, TrainSettings()))
    assert set(seen) == set(WEIGHT_KEYS)
    for k in WEIGHT_KEYS:
        np.testing.assert_allclose(seen[k].numpy(), raw[prefix + k].astype(np.float32), rtol=1e-6)
    # the two choices are different numbers, so they give different losses on the same batch
    other = "patch" if mode == "image" else "image"
    fused = _model()(batch["ir"], batch["vi"]).detach()
    w_other = {k: torch.from_numpy(v) for k, v in decode_patches(raw, other).items() if k in WEIGHT_KEYS}
    assert float(loss(fused, batch["ir"], batch["vi"], w_other)[0]) != pytest.approx(
        float(loss(fused, batch["ir"], batch["vi"], {k: batch[k] for k in WEIGHT_KEYS})[0]), rel=1e-6)
    assert math.isfinite(out["loss"])
    with pytest.raises(ParamsError, match="train.sample_weights"):
        train_settings(tiny_params(tmp_path, sample_weights="pixel"))


def test_code_defaults_match_params_yaml():
    from conftest import REPO

    from pipeline.common.config import load_params

    assert train_settings(load_params(REPO / "params.yaml")) == TrainSettings(), \
        "TrainSettings defaults must equal the train: section of params.yaml"


@pytest.mark.parametrize("bad", ["a'b", "x y", "-lead", "a/b", "", "n\"ame"])
def test_run_names_are_validated(tmp_path, bad):
    with pytest.raises(ParamsError, match="train.run_name"):
        train_settings(tiny_params(tmp_path, run_name=bad))
    assert train_settings(tiny_params(tmp_path, run_name="ok-Run_1.2")).run_name == "ok-Run_1.2"


def test_settings_are_checked_and_name_the_key(tmp_path):
    params = tiny_params(tmp_path)
    s = train_settings(params)
    assert s.num_workers == 1 and s.checkpoint_mode == "max"
    params["train"]["batch_size"] = 0
    with pytest.raises(ParamsError, match="train.batch_size"):
        train_settings(params)
    params["train"]["batch_size"] = 4
    params["train"]["checkpoint_metric"] = "accuracy"
    with pytest.raises(ParamsError, match="train.checkpoint_metric"):
        train_settings(params)
    assert train_settings(dict(params, train={"checkpoint_metric": "val_loss"})).checkpoint_mode == "min"


@pytest.mark.parametrize("cpus, workers, expected", [(2, 2, 0.5), (2, 1, 1.0), (16, 8, 1.0), (4, 2, 1.0), (3, 4, 0.5)])
def test_workers_leave_a_cpu_to_ray_data(cpus, workers, expected):
    got = cpus_per_worker(TrainSettings(num_workers=workers), cpus)
    assert got == expected
    assert cpus - got * workers >= 1 or got == 0.25


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
    loss_fn = _loss(params)
    model = _model()
    raw, _, _ = _batch(n=4, s=16)
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
    sums, samples = validate(_model(), pairs, _loss(tiny_params(tmp_path)), keep=1)
    assert sums["count"] == 2
    for k in ("val_loss", "val_ssim", "val_qabf", "val_intensity"):
        assert math.isfinite(sums[k])
    assert 0 < sums["val_qabf"] / 2 < 1
    assert len(samples) == 1 and samples[0][1].shape == (44, 60, 3) and samples[0][1].dtype == np.uint8


def test_val_inputs_errors_name_the_file(tmp_path):
    inputs = make_train_inputs(tmp_path, n_train=1, n_val=1)
    with pytest.raises(FileNotFoundError, match="split.json"):
        load_val_pairs(inputs["registered"], tmp_path / "nope" / "split.json", inputs["images"])
    (inputs["registered"] / "vi" / "v00.png").unlink()
    with pytest.raises(FileNotFoundError, match="v00"):
        load_val_pairs(inputs["registered"], inputs["split"], inputs["images"])
    with pytest.raises(FileNotFoundError, match="Parquet"):
        count_train_patches(tmp_path / "empty")
    import pandas as pd

    pd.DataFrame({"pair_id": ["v00"], "split": ["val"], "w_int_ir": [0.5]}).to_parquet(inputs["images"])
    (inputs["registered"] / "vi" / "v00.png").write_bytes((inputs["registered"] / "ir" / "v00.png").read_bytes())
    with pytest.raises(ValueError, match="images.parquet.*w_int_vi"):
        load_val_pairs(inputs["registered"], inputs["split"], inputs["images"])


def test_pyfunc_model_loads_by_uri_and_fuses_gray_and_colour(tmp_path, monkeypatch):
    import mlflow
    import pandas as pd

    from pipeline.model.pyfunc import log_fusion_model
    from pipeline.model.weights import save_checkpoint

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'db.sqlite'}")
    from pipeline.common.mlflow_store import configure_mlflow

    configure_mlflow(tmp_path, "pyfunc-test")
    ckpt = save_checkpoint(tmp_path / "best.pt", _model(), TINY_MODEL["name"], TINY_MODEL["args"])
    with mlflow.start_run():
        uri = log_fusion_model(ckpt)
    loaded = mlflow.pyfunc.load_model(uri)
    rng = np.random.default_rng(1)
    ir = rng.integers(0, 256, (21, 30), dtype=np.uint8)
    vi_bgr = rng.integers(0, 256, (21, 30, 3), dtype=np.uint8)
    out = loaded.predict(pd.DataFrame({"ir": [ir.tolist(), ir.tolist()], "vi": [ir.tolist(), vi_bgr.tolist()]}))
    assert list(out.columns) == ["fused"]
    assert np.asarray(out["fused"][0]).shape == (21, 30) and np.asarray(out["fused"][1]).shape == (21, 30, 3)
    # the same weights through pipeline.model.inference give the same pixels
    from pipeline.model.inference import Fuser
    from pipeline.model.weights import load_model

    model, info = load_model(ckpt)
    np.testing.assert_array_equal(np.asarray(out["fused"][1]), Fuser(model, postprocess=info["postprocess"])(ir, vi_bgr))
    raw = loaded.unwrap_python_model()
    arr = raw.predict(None, {"ir": ir, "vi": vi_bgr})
    assert isinstance(arr, np.ndarray) and arr.shape == (21, 30, 3)
    with pytest.raises(ValueError, match="differ in size"):
        raw.predict(None, {"ir": ir[:20], "vi": vi_bgr})
    with pytest.raises(ValueError, match="0-255"):
        raw.predict(None, {"ir": ir.astype(float) * 2, "vi": vi_bgr})


def test_code_digest_changes_the_default_run_name(tmp_path, monkeypatch):
    import pipeline.train.driver as T

    params = tiny_params(tmp_path)
    name = T.default_run_name(params, "data1")
    assert name == T.default_run_name(params, "data1") and name != T.default_run_name(params, "data2")
    monkeypatch.setattr(T, "code_digest", lambda: "other-code")
    assert T.default_run_name(params, "data1") != name, "a code change must start a new run"


def test_failed_run_message_names_the_worker_error():
    from ray.train.v2.api.exceptions import WorkerGroupError

    from pipeline.train.driver import _root_cause

    inner = ValueError("long traceback line\nValueError: data/stats/patches: no full batch")
    exc = WorkerGroupError("Training failed", {1: inner})
    assert _root_cause(exc) == "ValueError: ValueError: data/stats/patches: no full batch"


def _fake_ray_run(run_dir, epochs):
    """A Ray Train V2 run folder whose checkpoint manager registered checkpoints up to ``epochs``."""
    import json

    run_dir.mkdir(parents=True)
    results = [{"checkpoint_dir_name": f"checkpoint_{e}", "metrics": {"epoch": e, "val_qabf": 0.1}}
               for e in range(1, epochs + 1)]
    (run_dir / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"checkpoint_results": results, "latest_checkpoint_result": results[-1]}))


def test_trained_epochs_and_set_aside(tmp_path):
    from pipeline.train.driver import _set_aside, trained_epochs

    assert trained_epochs(tmp_path / "absent") == 0
    _fake_ray_run(tmp_path / "mda-x", 3)
    assert trained_epochs(tmp_path / "mda-x") == 3
    moved = _set_aside(tmp_path / "mda-x")
    assert not (moved.parent / "mda-x").exists() and moved.name.startswith("mda-x.stale-")
    assert trained_epochs(moved) == 3, "the set-aside run is kept whole"


def test_explicit_finished_run_without_outputs_is_an_error_not_a_reexport(tmp_path, monkeypatch):
    from train_fixtures import make_train_inputs, train_paths

    from pipeline.train.driver import run_training

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'db.sqlite'}")
    inputs = make_train_inputs(tmp_path / "in", n_train=1, n_val=1)
    params = tiny_params(tmp_path, epochs=2, run_name="done-run")
    _fake_ray_run(tmp_path / "ray_results" / "done-run", 2)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"train.run_name 'done-run'.*2 epoch\(s\).*raise train.epochs"):
        run_training(params, train_paths(inputs, out))
    assert not (out / "models" / "best.pt").exists(), "nothing may be exported from a run that trained nothing"
    with pytest.raises(ParamsError, match="run_name"):
        run_training(params, train_paths(inputs, out), run_name="it's")
