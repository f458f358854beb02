"""pipeline.train.driver without a Ray Train fit: failure messages, finished runs never re-exported,
and the MLflow model it logs (the end-to-end fits are in test_cluster.py)."""

from __future__ import annotations

import numpy as np
import pytest
from train_fixtures import TINY_MODEL, fake_ray_run, make_train_inputs, tiny_model, tiny_params, train_paths

from pipeline.common.config import ParamsError
from pipeline.train.driver import _root_cause, run_training


def test_failed_run_message_names_the_worker_error():
    from ray.train.v2.api.exceptions import WorkerGroupError

    inner = ValueError("long traceback line\nValueError: data/stats/patches: no full batch")
    exc = WorkerGroupError("Training failed", {1: inner})
    assert _root_cause(exc) == "ValueError: ValueError: data/stats/patches: no full batch"


def test_explicit_finished_run_without_outputs_is_an_error_not_a_reexport(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'db.sqlite'}")
    inputs = make_train_inputs(tmp_path / "in", n_train=1, n_val=1)
    params = tiny_params(tmp_path, epochs=2, run_name="done-run")
    fake_ray_run(tmp_path / "ray_results" / "done-run", 2)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"train.run_name 'done-run'.*2 epoch\(s\).*raise train.epochs"):
        run_training(params, train_paths(inputs, out))
    assert not (out / "models" / "best.pt").exists(), "nothing may be exported from a run that trained nothing"
    with pytest.raises(ParamsError, match="run_name"):
        run_training(params, train_paths(inputs, out), run_name="it's")


def test_pyfunc_model_loads_by_uri_and_fuses_gray_and_colour(tmp_path, monkeypatch):
    """The model the driver logs (``log_fusion_model``); belongs with tests/model/test_pyfunc.py."""
    import mlflow
    import pandas as pd

    from pipeline.model.pyfunc import log_fusion_model
    from pipeline.model.weights import save_checkpoint

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'db.sqlite'}")
    from pipeline.common.mlflow_store import configure_mlflow

    configure_mlflow(tmp_path, "pyfunc-test")
    ckpt = save_checkpoint(tmp_path / "best.pt", tiny_model(), TINY_MODEL["name"], TINY_MODEL["args"])
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
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="differ in size"):  # a 400 when served
        raw.predict(None, {"ir": ir[:20], "vi": vi_bgr})
    with pytest.raises(MlflowException, match="0-255"):
        raw.predict(None, {"ir": ir.astype(float) * 2, "vi": vi_bgr})
