"""Ray Train end to end: determinism, resume, a killed worker, DDP gradient averaging, MLflow
against a real ``mlflow server``, and a real two-node Ray cluster on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from pipeline.train.settings import TrainSettings
from train_fixtures import TINY_MODEL, make_train_inputs, tiny_params, train_paths

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, step: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture()
def mlflow_server(tmp_path, monkeypatch):
    """A real ``mlflow server`` on a free loopback port (sqlite store, proxied artifacts)."""
    import urllib.request

    port = _free_port()
    log = open(tmp_path / "mlflow_server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server_artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy():
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(tmp_path / 'mlflow_server.log').read_text()[-2000:]}")
        try:
            return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        _wait(healthy, 90, "mlflow server /health")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its gunicorn/uvicorn workers (own session)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _train(tmp_path, inputs, out, name, **train):
    from pipeline.train.driver import run_training

    return run_training(tiny_params(tmp_path, **train), train_paths(inputs, out), run_name=name)


def test_deterministic_resumable_and_tracked_on_mlflow_server(tmp_path, ray_local, mlflow_server, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.common.config import flatten
    from pipeline.model.weights import load_model

    inputs = make_train_inputs(tmp_path / "in")
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    first = _train(tmp_path, inputs, out_a, "run-a", epochs=1)
    second = _train(tmp_path, inputs, out_b, "run-b", epochs=1)
    loss_a = json.loads((out_a / "models" / "train.json").read_text())["metrics"]["train_loss"]
    loss_b = json.loads((out_b / "models" / "train.json").read_text())["metrics"]["train_loss"]
    assert loss_a == pytest.approx(loss_b, rel=1e-6, abs=1e-7), "same params and seed must give the same epoch-1 loss"

    # re-launching run-a with more epochs resumes it from its epoch-1 checkpoint, same MLflow run
    resumed = _train(tmp_path, inputs, out_a, "run-a", epochs=2)
    final = json.loads((out_a / "models" / "train.json").read_text())["metrics"]
    assert resumed["run_id"] == first["run_id"] != second["run_id"]
    assert resumed["epochs"] == 2
    client = MlflowClient(mlflow_server)
    history = client.get_metric_history(first["run_id"], "epoch/resumed_from_epoch")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 0.0), (2, 1.0)]
    assert final["train_loss"] != loss_a

    # the same finished run launched again: its outputs are reused, nothing is trained or logged twice
    out_c = tmp_path / "c"
    again = _train(tmp_path, inputs, out_c, "run-a", epochs=2)
    assert again["run_id"] == first["run_id"] and again["model_uri"] == resumed["model_uri"]
    assert json.loads((out_c / "models" / "train.json").read_text())["metrics"] == final
    assert json.loads((out_c / "metrics" / "train.json").read_text()) == {k: final[k] for k in ("steps", "fit_time_s", "val_ssim", "val_qabf")}
    assert (out_c / "models" / "best.pt").read_bytes() == (out_a / "models" / "best.pt").read_bytes()
    assert len(MlflowClient(mlflow_server).search_logged_models(
        experiment_ids=[MlflowClient(mlflow_server).get_run(first["run_id"]).info.experiment_id],
        filter_string=f"source_run_id = '{first['run_id']}'")) == 2  # epoch-1 model and the resumed run's

    # MLflow content: every param, per-step/epoch metrics per loss term, images, VGG source, model
    run = client.get_run(first["run_id"])
    params = tiny_params(tmp_path, epochs=1)
    assert set(flatten(params)) <= set(run.data.params)
    assert run.data.tags["loss.vgg_source"] == resumed["vgg_source"] != ""
    for key in ("train/loss", "train/lr", "train/patches_per_s", "train/w_int_ir_mean", "train/intensity",
                "train/ssim", "train/gradient", "epoch/val_ssim", "epoch/val_qabf", "epoch/val_loss"):
        assert key in run.data.metrics, key
    lrs = [m.value for m in client.get_metric_history(first["run_id"], "train/lr")]
    assert len(set(lrs)) > 2, "the learning rate must change step by step"
    images = [a.path for a in client.list_artifacts(first["run_id"], "val_samples/epoch_001")]
    assert images and images[0].endswith(".png")
    assert run.info.status == "FINISHED"

    summary = json.loads((out_a / "models" / "train.json").read_text())
    assert summary["run_id"] == first["run_id"] and summary["best_metric"]["name"] == TrainSettings().checkpoint_metric
    model, info = load_model(summary["checkpoint"])
    assert info["kind"] == "checkpoint" and info["args"] == TINY_MODEL["args"]
    pyfunc = mlflow.pyfunc.load_model(summary["model_uri"])
    ir = np.full((24, 40), 30, np.uint8)
    vi = np.tile(np.arange(40, dtype=np.uint8) * 6, (24, 1))
    fused = pyfunc.unwrap_python_model().predict(None, {"ir": ir, "vi": vi})
    assert fused.shape == (24, 40) and fused.dtype == np.uint8
    header = (out_a / "plots" / "train_loss.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "step" and {"loss", "intensity", "lr"} <= set(header)
    rows = (out_a / "plots" / "train_val.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,") and len(rows) == 3

    # the finished Ray Train run without its MLflow record (another tracking store): an error naming
    # train.run_name, never a zero-epoch "resume" that re-exports the old weights
    with monkeypatch.context() as m:
        m.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
        with pytest.raises(ValueError, match=r"train.run_name 'run-a'.*already trained 2 epoch"):
            _train(tmp_path, inputs, tmp_path / "d", "run-a", epochs=2)
    mlflow.set_tracking_uri(mlflow_server)  # configure_mlflow set the other store process-wide
    assert not (tmp_path / "d" / "models" / "best.pt").exists()


def _ray_train_worker_pids() -> list[int]:
    """PIDs of the Ray Train worker processes of *this* test session's Ray (our descendants)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            continue
    return out


def _registered_checkpoints(run_dir: Path) -> int:
    """Checkpoints that Ray Train's checkpoint manager has registered (its snapshot file)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return 0
    return len(snapshot.get("checkpoint_results") or [])


def test_killed_worker_resumes_from_last_checkpoint(tmp_path, ray_local):
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.model.weights import load_model

    inputs = make_train_inputs(tmp_path / "in", n_train=6)
    out = tmp_path / "out"
    storage = tmp_path / "ray_results" / "faulty"
    earlier = set(_ray_train_worker_pids())  # workers of an earlier test that may still be exiting
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(_train, tmp_path, inputs, out, "faulty", epochs=4, num_workers=2, max_failures=2,
                             batch_size=2)
        _wait(lambda: future.done() or _registered_checkpoints(storage) >= 1, 300, "the first registered checkpoint",
              step=0.2)
        assert not future.done(), f"training ended before the fault could be injected: {future.exception()}"
        pids = _wait(lambda: [p for p in _ray_train_worker_pids() if p not in earlier], 30,
                     "a Ray Train worker process of this run", step=0.2)
        os.kill(pids[-1], signal.SIGKILL)
        summary = future.result(timeout=400)
    final = json.loads((out / "models" / "train.json").read_text())["metrics"]
    assert summary["epochs"] == 4 and final["epochs"] == 4
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(summary["tracking_uri"]).get_run(summary["run_id"]).data.tags
    assert any(t.startswith("train.resumed_at_epoch_") for t in tags), "the worker group must restart from a checkpoint"
    model, info = load_model(out / "models" / "best.pt")
    assert info["kind"] == "checkpoint" and info["meta"]["epoch"] >= 1


def _ddp_loop(config):
    """Worker function: k SGD steps of DDP on this worker's half of each global batch."""
    import ray.train
    import ray.train.torch

    from pipeline.train.losses import FusionLoss
    from pipeline.model.network import build_model
    from pipeline.train.step import train_step

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(build_model(TINY_MODEL["name"], **TINY_MODEL["args"]))
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"])
    loss_fn = FusionLoss.from_params(config["loss"])
    for batch in config["batches"]:
        b = len(batch["ir"]) // world
        mine = {k: torch.from_numpy(v[rank * b:(rank + 1) * b].copy()) for k, v in batch.items()}
        train_step(model, mine, loss_fn, opt, grad_clip=1.0)
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in model.module.state_dict().items()}, config["out"])
    ray.train.report({"done": 1})


def test_ddp_two_workers_match_one_process_with_double_batch(tmp_path, ray_local):
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train.losses import FusionLoss
    from pipeline.model.network import build_model
    from pipeline.train.step import train_step

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    params = tiny_params(tmp_path)
    rng = np.random.default_rng(3)
    batches = []
    for _ in range(3):  # k = 3 steps, global batch 2b = 4, patches 16x16
        a, d = rng.uniform(0.2, 0.8, 4).astype(np.float32), rng.uniform(0.2, 0.8, 4).astype(np.float32)
        batches.append({"ir": rng.random((4, 1, 16, 16), dtype=np.float32),
                        "vi": rng.random((4, 1, 16, 16), dtype=np.float32),
                        "int_ir": a, "int_vi": 1 - a, "det_ir": d, "det_vi": 1 - d})
    cfg = {"batches": batches, "lr": 0.5, "loss": params["loss"], "out": str(tmp_path / "ddp.pt")}
    trainer = TorchTrainer(
        _ddp_loop, train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="ddp", storage_path=str(tmp_path / "ray_results")),
    )
    result = trainer.fit()
    assert result.error is None
    ddp = torch.load(cfg["out"], weights_only=True)

    torch.manual_seed(0)
    ref = build_model(TINY_MODEL["name"], **TINY_MODEL["args"])
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    opt = torch.optim.SGD(ref.parameters(), lr=cfg["lr"])
    loss_fn = FusionLoss.from_params(params["loss"])
    for batch in batches:
        train_step(ref, {k: torch.from_numpy(v) for k, v in batch.items()}, loss_fn, opt, grad_clip=1.0)
    moved = max(float((ref.state_dict()[k] - init[k]).abs().max()) for k in init)
    assert moved > 1e-3, "the steps must move the parameters"
    worst = max(float((ddp[k] - v).abs().max()) for k, v in ref.state_dict().items())
    print(f"DDP vs single process: max |diff| {worst:.2e}, max move {moved:.2e}")
    assert worst < 1e-5, f"DDP and single-process parameters differ by {worst} (moved {moved})"


def _ray_cli(*args: str) -> None:
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)


def test_two_node_cluster_gets_one_worker_per_node(tmp_path, ray_fresh):
    ray = ray_fresh
    tmp_root = Path(f"/tmp/rayE{uuid.uuid4().hex[:6]}")  # short: Ray's socket paths have a length limit
    port = _free_port()
    try:
        _ray_cli("start", "--head", "--port", str(port), "--num-cpus", "2", "--temp-dir", str(tmp_root),
                 "--include-dashboard=false", "--disable-usage-stats")
        _ray_cli("start", "--address", f"127.0.0.1:{port}", "--num-cpus", "1", "--disable-usage-stats")
        ray.init(address=f"127.0.0.1:{port}", logging_level="WARNING")
        _wait(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, 60, "two alive nodes")
        inputs = make_train_inputs(tmp_path / "in")
        summary = _train(tmp_path, inputs, tmp_path / "out", "two-nodes", epochs=1, num_workers=2,
                         cpus_per_worker=0.5, placement_strategy="STRICT_SPREAD")
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        used = set(summary["worker_nodes"].split(","))
        assert used == alive and len(used) == 2
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _kill_cluster(str(tmp_root), port)
        shutil.rmtree(tmp_root, ignore_errors=True)


def _kill_cluster(temp_dir: str, port: int) -> None:
    """Kill only the processes of the cluster this test started (never a global ``ray stop``)."""
    mine = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if temp_dir in cmd or f"127.0.0.1:{port}" in cmd or f"--gcs-address=127.0.0.1:{port}" in cmd \
                or f"gcs_server_port={port}" in cmd:
            mine.append(p)
    for p in mine:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(mine, timeout=10)
