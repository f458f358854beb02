"""The registered champion in use: ``mda fuse --model models:/NAME@champion`` and a real
``mlflow models serve`` process answering JSON requests on loopback.

A small real MDA network is logged through the training's pyfunc wrapper into a temporary sqlite
store, registered and given the ``champion`` alias.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

from pipeline.data.images import read_raw, write_image

NAME = "served"
TINY_ARGS = {"width": 8, "reduction": 4, "up2_channels": 4, "up4_channels": 4}


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """``{"root", "uri", "checkpoint", "model_uri"}`` of a registered champion in a temporary store."""
    import mlflow
    import torch
    from mlflow import MlflowClient

    from pipeline.model.pyfunc import log_fusion_model
    from pipeline.model.network import build_model
    from pipeline.common.mlflow_store import configure_mlflow
    from pipeline.model.weights import save_checkpoint

    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root}/mlflow.db"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    previous = mlflow.get_tracking_uri()
    configure_mlflow(root, experiment="test-serving")
    torch.manual_seed(3)
    ckpt = save_checkpoint(root / "best.pt", build_model("mda", **TINY_ARGS), "mda", TINY_ARGS)
    with mlflow.start_run():
        model_uri = log_fusion_model(ckpt, name="model")
    version = mlflow.register_model(model_uri, NAME)
    MlflowClient().set_registered_model_alias(NAME, "champion", version.version)
    yield {"root": root, "uri": uri, "checkpoint": ckpt, "model_uri": model_uri}
    mp.undo()
    mlflow.set_tracking_uri(previous)


def _pair(h: int = 32, w: int = 48) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:h, 0:w]
    ir = np.clip(60 + 150 * np.exp(-((yy - h / 2) ** 2 + (xx - w / 3) ** 2) / 60.0) + rng.normal(0, 5, (h, w)), 0, 255)
    vi = np.dstack([(xx * 5) % 256, (yy * 7) % 256, rng.integers(0, 256, (h, w))])
    return ir.astype(np.uint8), vi.astype(np.uint8)


def test_logged_from_code_not_pickled(champion):
    """Issue 13: the model is MLflow "models from code" (no cloudpickled python_model.pkl)."""
    import mlflow
    import pandas as pd
    import yaml
    from mlflow import MlflowClient

    from pipeline.model.inference import Fuser

    location = MlflowClient().get_logged_model(champion["model_uri"].split("/")[-1]).artifact_location
    model_dir = Path(urlparse(location).path)
    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor.get("model_code_path", "").endswith("pyfunc_code.py")
    assert not list(model_dir.rglob("*.pkl"))
    ir, vi = _pair()
    frame = pd.DataFrame({"ir": [ir.tolist()], "vi": [vi.tolist()]})
    fused = mlflow.pyfunc.load_model(champion["model_uri"]).predict(frame)["fused"][0]
    np.testing.assert_array_equal(np.asarray(fused, np.uint8), Fuser.from_file(champion["checkpoint"])(ir, vi))


def test_fuse_cli_with_registered_champion(champion, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.model.inference import Fuser

    ir, vi = _pair()
    write_image(tmp_path / "ir.png", ir)
    write_image(tmp_path / "vi.png", vi)
    out = tmp_path / "fused.png"
    assert main(["fuse", str(tmp_path / "ir.png"), str(tmp_path / "vi.png"), "-o", str(out),
                 "--model", f"models:/{NAME}@champion"]) == 0
    expected = Fuser.from_file(champion["checkpoint"])(ir, vi)
    np.testing.assert_array_equal(read_raw(out), expected)

    for uri, message in ((f"models:/{NAME}@nope", "alias nope not found"),
                         ("models:/no-such-model@champion", "no-such-model not found")):
        assert main(["fuse", str(tmp_path / "ir.png"), str(tmp_path / "vi.png"), "-o", str(out), "--model", uri]) == 1
        err = capsys.readouterr().err
        assert f"cannot resolve '{uri}'" in err and message in err and "Traceback" not in err


def test_corrupt_registered_model_is_a_clear_error(champion, tmp_path, capsys):
    """A version whose checkpoint artifact was damaged in the store fails naming the file."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline.cli import main
    from pipeline.model.pyfunc import log_fusion_model

    with mlflow.start_run():
        model_uri = log_fusion_model(champion["checkpoint"], name="model")
    version = mlflow.register_model(model_uri, "damaged")
    MlflowClient().set_registered_model_alias("damaged", "champion", version.version)
    model_dir = MlflowClient().get_logged_model(model_uri.split("/")[-1]).artifact_location
    original = Path(urlparse(model_dir).path) / "artifacts" / champion["checkpoint"].name
    assert original.is_file()
    with open(original, "wb") as fh:
        fh.write(b"not a checkpoint")
    ir_path, vi_path = tmp_path / "ir.png", tmp_path / "vi.png"
    write_image(ir_path, _pair()[0])
    write_image(vi_path, _pair()[0])
    assert main(["fuse", str(ir_path), str(vi_path), "-o", str(tmp_path / "o.png"), "--model", "models:/damaged@champion"]) == 1
    err = capsys.readouterr().err
    assert "best.pt: not a readable PyTorch weights file" in err and "Traceback" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_fused_image(champion):
    import mlflow
    import pandas as pd

    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": champion["uri"], "MDA_SERVE_MAX_PIXELS": str(32 * 48)}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
           "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1", "-w", "1"]
    log_path = champion["root"] / "serve.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"server did not come up (exit {server.poll()}):\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)

        ir, vi = _pair()
        gray = vi[:, :, 1]
        request = {"dataframe_split": {"columns": ["ir", "vi"],
                                       "data": [[ir.tolist(), vi.tolist()], [ir.tolist(), gray.tolist()]]}}
        status, body = _post(f"{base}/invocations", request)
        assert status == 200, body
        fused = [np.asarray(p["fused"]) for p in body["predictions"]]
        assert fused[0].shape == (32, 48, 3) and fused[1].shape == (32, 48)
        assert all(f.min() >= 0 and f.max() <= 255 and np.issubdtype(f.dtype, np.integer) for f in fused)

        local = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
        expected = local.predict(pd.DataFrame({"ir": [ir.tolist(), ir.tolist()], "vi": [vi.tolist(), gray.tolist()]}))
        for got, want in zip(fused, expected["fused"]):
            np.testing.assert_array_equal(got, np.asarray(want))

        status, body = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["ir"], "data": [[ir.tolist()]]}})
        assert status >= 400 and "vi" in json.dumps(body)

        # bad requests: a 400 naming the reason, quickly, with no traceback or server path (issue 22)
        big = np.zeros((40, 48), np.uint8)
        nan_vi = gray.astype(float)
        nan_vi[3, 4] = float("nan")  # the visible column takes any values; IR must be integers (signature)
        small = np.zeros((16, 16), np.uint8)
        for data, reason in (([[ir.tolist(), small.tolist()]], "differ in size"),
                             ([[big.tolist(), big.tolist()]], "over the limit of 1536"),
                             ([[ir.tolist(), nan_vi.tolist()]], "NaN")):
            t0 = time.monotonic()
            status, body = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["ir", "vi"], "data": data}})
            text = json.dumps(body)
            assert status == 400 and reason in body.get("message", ""), (status, text[:2000])
            assert time.monotonic() - t0 < 5
            assert "stack_trace" not in body and "Traceback" not in text and str(champion["root"]) not in text
            assert "site-packages" not in text and "/pipeline/" not in text
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=5)
