"""The training driver: ``run_training`` checks the inputs, finds or creates the run
(``pipeline.train.runs``), runs ``TorchTrainer.fit()`` over ``pipeline.train.worker`` and writes
the stage outputs.

Outputs: the best checkpoint -> ``models/best.pt`` + an MLflow ``pyfunc`` model, ``models/train.json``,
``metrics/train.json`` and ``plots/train_*.csv`` (from the MLflow metric histories that world
rank 0 logged: they span every restart of the run).

Resuming: the Ray Train run lives in ``<storage_path>/<run name>``; launching again with the same
name resumes from its latest checkpoint (Ray Train V2 restores its checkpoint manager from the run
folder, the workers read ``ray.train.get_checkpoint()``). Run names and the reuse of finished runs:
``pipeline.train.runs``.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import socket
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping

import mlflow
from mlflow.tracking import MlflowClient
from ray.data import ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, Result, RunConfig, TrainingFailedError
from ray.train.torch import TorchConfig, TorchTrainer

import pipeline
from pipeline.common.atomic_io import atomic_writer, copy_atomic, write_json
from pipeline.common.config import ParamsError, section
from pipeline.common.log_filter import (
    RAY_ACTOR_ARGS_NOTICE,
    RAY_DATA_NOTICES,
    RAY_TRAIN_CONTROLLER_NOISE,
    RAY_TRAIN_START_NOTICES,
    VERBOSE_ENV,
    drop_lines,
)
from pipeline.common.ray_runtime import ray_options, ray_session, resolve_address
from pipeline.data.contracts import read_split
from pipeline.model.network import build_model, model_config
from pipeline.model.weights import load_model
from pipeline.model.pyfunc import log_fusion_model
from pipeline.train.data import count_train_patches, load_val_pairs, train_dataset
from pipeline.train.losses import FusionLoss, loss_section
from pipeline.train.runs import (
    CONFIG_TAG,
    MODEL_FILE,
    SUMMARY_ARTIFACT,
    TrainPaths,
    _best_checkpoint,
    _find_mlflow_run,
    headline_train_metrics,
    _new_mlflow_run,
    _reuse_finished_run,
    data_digest,
    default_run_name,
    resumable_epochs,
)
from pipeline.train.settings import TrainSettings, check_run_name, init_weights_digest, scaling_config
from pipeline.train.worker import train_loop_per_worker

log = logging.getLogger(__name__)


def run_training(params: Mapping[str, Any], paths: TrainPaths, run_name: str | None = None) -> dict[str, Any]:
    """Train with Ray Train, log to MLflow, write the stage outputs.

    Args:
        params: the whole ``params.yaml`` (``model``, ``loss``, ``train``, ``ray`` sections used;
            every key is logged to MLflow flattened).
        paths: stage inputs/outputs.
        run_name: overrides ``train.run_name``.

    Returns:
        The summary also written to ``paths.summary_json``.

    Raises:
        FileNotFoundError / ValueError / ParamsError: bad inputs or parameters (named).
        RuntimeError: training failed after ``train.max_failures`` restarts.
    """
    t_start = time.perf_counter()
    settings = TrainSettings.from_params(params)
    root = Path(paths.root).resolve()
    config = _worker_config(params, settings, paths)  # inputs checked before Ray starts
    explicit = check_run_name(run_name, "run_name (--run-name)") or settings.run_name
    config_id = default_run_name(params, data_digest(paths.patches_dir) + init_weights_digest(settings.init_weights))
    name = explicit or config_id
    storage = Path(settings.storage_path)
    storage = storage if storage.is_absolute() else root / storage
    uri, experiment_id, run_id, previous_status = _find_mlflow_run(settings, name, root)
    client = MlflowClient(tracking_uri=uri)
    if run_id is not None and previous_status == "FINISHED":
        reused = _reuse_finished_run(client, run_id, name, settings, paths, config_id)
        if reused is not None:
            _write_plots(client, run_id, paths)
            client.set_terminated(run_id, status="FINISHED")
            return reused
    done = resumable_epochs(storage / name, settings, explicit=bool(explicit))
    if run_id is None or done == 0:  # a fresh Ray Train run gets a fresh MLflow run (no second model in an old one)
        run_id = _new_mlflow_run(params, uri, experiment_id, name)
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, CONFIG_TAG, config_id)
    log.info("training run %s (MLflow run %s at %s), %d steps/epoch", name, run_id, uri, config["steps_per_epoch"])
    config.update(mlflow_uri=uri, mlflow_run_id=run_id, driver_host=socket.gethostname())
    try:
        with ray_session(**ray_options(params)) as resources:
            trainer = build_trainer(train_loop_per_worker, config, settings, paths.patches_dir,
                                    _run_config(params, settings, name, storage), resources)
            t_fit = time.perf_counter()
            try:
                noise = [RAY_TRAIN_CONTROLLER_NOISE]
                if not os.environ.get(VERBOSE_ENV):
                    # and Ray Data's notices from the dataset's split coordinator actor
                    noise += [RAY_ACTOR_ARGS_NOTICE, *RAY_TRAIN_START_NOTICES, *RAY_DATA_NOTICES.values()]
                with drop_lines(*noise) as filters:  # Ray Train V2 noise, see log_filter
                    result = fit_keeping_ctrl_c(trainer)
            except TrainingFailedError as exc:
                raise RuntimeError(f"training run {name} failed: {_root_cause(exc)}") from exc
            fit_s = time.perf_counter() - t_fit
            if sum(f.dropped for f in filters):
                log.info("hid %d line(s) of Ray's known notices (harmless; MDA_VERBOSE=1 shows them)",
                         sum(f.dropped for f in filters))
    except BaseException as exc:
        client.set_terminated(run_id, status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    summary = _export(result, settings, paths, client, run_id, name, uri, fit_s, t_start)
    client.set_terminated(run_id, status="FINISHED")
    return summary


def fit_keeping_ctrl_c(trainer: TorchTrainer) -> Result:
    """``trainer.fit()`` in a helper thread, the main thread waiting on it.

    Called from the main thread, Ray Train V2's ``fit()`` replaces the SIGINT handler with its own,
    which aborts the run and lets the process end with status 1 and no message. From another thread
    it leaves the handler alone, so Ctrl-C stays the stage's (``KeyboardInterrupt`` in the main
    thread, one line, exit 130; the Ray session's shutdown ends the run). Errors of ``fit()`` are
    re-raised here unchanged.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in box:
        raise box["error"]
    return box["result"]


def _worker_config(params: Mapping[str, Any], settings: TrainSettings, paths: TrainPaths) -> dict[str, Any]:
    """The workers' config from the checked inputs (``pipeline.train.worker.train_loop_per_worker``
    lists its keys; the driver adds the MLflow ones). Fails fast, naming the file or key, before
    any worker starts.

    Raises:
        ValueError / FileNotFoundError / ParamsError: no val pairs, too few training patches,
            bad model or loss parameters.
    """
    model_name, model_args = model_config(section(params, "model"))
    loss_cfg = loss_section(params)
    if loss_cfg.get("vgg_weights"):  # the workers' folder may differ from the driver's
        loss_cfg = {**loss_cfg, "vgg_weights": str(Path(loss_cfg["vgg_weights"]).resolve())}
    FusionLoss.from_params(loss_cfg)  # fail fast on bad loss params, before any worker starts
    val_kwargs = {"registered_dir": str(Path(paths.registered_dir).resolve()),
                  "split_json": str(Path(paths.split_json).resolve()),
                  "images_parquet": str(Path(paths.images_parquet).resolve()),
                  "max_pairs": settings.val_max_pairs}
    if not load_val_pairs(**val_kwargs):  # fail fast (and with the file's name) before Ray starts
        raise ValueError(f"{paths.split_json}: no 'val' pairs; training validates on them (raise crop.fractions.val)")
    init = settings.init_weights
    if init is not None:
        check_init_weights(init, model_name, model_args)
    train_pairs = {"registered_dir": val_kwargs["registered_dir"], "split_json": val_kwargs["split_json"],
                   "images_parquet": val_kwargs["images_parquet"]}
    steps_per_epoch, total_steps = plan_steps(settings, paths)
    return {"settings": asdict(settings), "model_name": model_name, "model_args": model_args, "loss": loss_cfg,
            "val": val_kwargs, "train_pairs": train_pairs, "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps, "init_weights": str(Path(init).resolve()) if init is not None else None}


def plan_steps(settings: TrainSettings, paths: TrainPaths) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)``: with ``train.steps``, that many optimiser steps in
    ``train.epochs`` rounds; without it, ``train.epochs`` passes over the training patches.

    Raises:
        ValueError: too few training patches or pairs for one batch per worker (named).
    """
    if settings.sampler == "crops":
        n_pairs = len(read_split(paths.split_json)["train"])
        if n_pairs == 0:
            raise ValueError(f"{paths.split_json}: no 'train' pairs (train.sampler: crops draws crops of them)")
        if settings.steps is None:
            raise ParamsError("params: 'train.steps' must be set with train.sampler: crops (it has no epochs of data)")
    else:
        n_train = count_train_patches(paths.patches_dir)
        if settings.max_train_patches is not None:
            n_train = min(n_train, settings.max_train_patches)
        if n_train < settings.batch_size * settings.num_workers:
            raise ValueError(
                f"{paths.patches_dir}: {n_train} training patches are fewer than train.batch_size "
                f"({settings.batch_size}) x train.num_workers ({settings.num_workers})"
            )
        if settings.steps is None:
            per_epoch = n_train // (settings.batch_size * settings.num_workers)
            return per_epoch, per_epoch * settings.epochs
    return math.ceil(settings.steps / settings.epochs), settings.steps


def check_init_weights(path: str, model_name: str, model_args: Mapping[str, Any]) -> None:
    """``train.init_weights`` exists, loads (finite) and fits ``model:``; checked before Ray starts.

    Raises:
        ParamsError: one line naming ``train.init_weights``, the two models and the way out.
    """
    if not Path(path).is_file():
        raise ParamsError(f"params: 'train.init_weights': {path} not found")
    restored, info = load_model(path)
    probe = build_model(model_name, **model_args)
    try:
        if info["name"] != model_name:
            raise RuntimeError(f"architecture {info['name']}")
        if info["args"].get("base", "none") != model_args.get("base", "none"):  # no tensor tells them apart
            raise RuntimeError(f"model.args.base {info['args'].get('base', 'none')!r} in the file")
        probe.load_state_dict(restored.state_dict())
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
        raise ParamsError(
            f"params: 'train.init_weights': {path} holds {info['name']} {dict(info['args'])}, which does not fit "
            f"model: {model_name} {dict(model_args)} ({first[:200]}); set train.init_weights: null to train "
            "from scratch, or change model: back") from exc


def _run_config(params: Mapping[str, Any], settings: TrainSettings, name: str, storage: Path) -> RunConfig:
    """Ray Train's run: ``<storage>/<name>`` (the same name resumes), checkpoints kept and scored
    by ``train.checkpoint_metric``, ``train.max_failures`` worker-group restarts."""
    return RunConfig(
        name=name,
        storage_path=str(storage),
        worker_runtime_env=_worker_runtime_env(params),
        checkpoint_config=CheckpointConfig(
            num_to_keep=settings.keep_checkpoints,
            checkpoint_score_attribute=settings.checkpoint_metric,
            checkpoint_score_order=settings.checkpoint_mode,
        ),
        failure_config=FailureConfig(max_failures=settings.max_failures),
    )


def build_trainer(train_loop: Callable[[dict[str, Any]], None], config: dict[str, Any], settings: TrainSettings,
                  patches_dir: str | Path, run_config: RunConfig, resources: Mapping[str, float]) -> TorchTrainer:
    """The stage's ``TorchTrainer`` over the patch table, around ``train_loop`` (the stage:
    ``train_loop_per_worker``; ``bench/bench_train.py``: its timed loop over the same pieces).
    Call inside the Ray session: the dataset is created here."""
    # ordered driver DataContext (set by train_dataset): limit() and materialize() keep file order
    datasets = None
    if settings.sampler == "patches":
        dataset = train_dataset(patches_dir, settings.max_train_patches, settings.sample_weights, seed=settings.seed)
        if settings.materialize:  # read + filter once; epochs then iterate over the object store
            dataset = dataset.materialize()
        datasets = {"train": dataset}
    return TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=scaling_config(settings, resources),
        torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
        datasets=datasets,
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=run_config,
    )


def _export(result: Result, settings: TrainSettings, paths: TrainPaths, client: MlflowClient, run_id: str,
            name: str, uri: str, fit_s: float, t_start: float) -> dict[str, Any]:
    """Write the stage outputs of a finished fit: best checkpoint, its MLflow model, plots, summary
    and metrics JSON (also logged to the run as ``SUMMARY_ARTIFACT`` for a later reuse).

    Returns:
        The summary.
    """
    best_ckpt, best_metrics = _best_checkpoint(result, settings)
    with best_ckpt.as_directory() as d:
        copy_atomic(Path(d) / MODEL_FILE, Path(paths.best_checkpoint))
    best_value = float(best_metrics[settings.checkpoint_metric])
    final = dict(result.metrics or {})
    with mlflow.start_run(run_id=run_id):
        model_uri = log_fusion_model(Path(paths.best_checkpoint), name="model")
        mlflow.log_metric(f"best_{settings.checkpoint_metric}", best_value)
        mlflow.log_metric("fit_time_s", fit_s)
    run = client.get_run(run_id)
    vgg_source = run.data.tags.get("loss.vgg_source", "")
    _write_plots(client, run_id, paths)
    summary = {
        "run_id": run_id,
        "run_name": name,
        "model_uri": model_uri,
        "tracking_uri": uri,
        "checkpoint": str(paths.best_checkpoint),
        "ray_checkpoint": best_ckpt.path,
        "best_metric": {"name": settings.checkpoint_metric, "value": best_value,
                        "epoch": int(best_metrics["epoch"])},
        "epochs": int(final.get("epoch", settings.epochs)),
        "steps": int(final.get("global_step", 0)),
        "stopped_by": "time" if final.get("stopped_by_time") else "steps",
        "fit_time_s": round(fit_s, 1),
        "vgg_source": vgg_source,
        "worker_nodes": final.get("worker_nodes", ""),
    }
    metric_keys = [k for k in final if k.startswith(("train_", "val_")) and isinstance(final[k], (int, float))]
    metrics_out = {k: float(final[k]) for k in sorted(metric_keys)}
    metrics_out.update({f"best_{settings.checkpoint_metric}": best_value, "epochs": summary["epochs"],
                        "steps": summary["steps"],
                        "fit_time_s": round(fit_s, 2), "stage_time_s": round(time.perf_counter() - t_start, 2)})
    summary["metrics"] = metrics_out
    write_json(paths.metrics_json, headline_train_metrics(metrics_out))
    write_json(paths.summary_json, summary)
    client.log_dict(run_id, {"summary": summary, "metrics": metrics_out}, SUMMARY_ARTIFACT)
    return summary


def _write_plots(client: MlflowClient, run_id: str, paths: TrainPaths) -> None:
    """The DVC plots: per-step ``train/*`` and per-epoch ``epoch/*`` metric histories of the run."""
    _write_curves(client, run_id, "train", "step", Path(paths.loss_csv))
    _write_curves(client, run_id, "epoch", "epoch", Path(paths.val_csv))


def _write_curves(client: MlflowClient, run_id: str, prefix: str, x: str, path: Path) -> list[str]:
    """Write the MLflow metric histories ``<prefix>/*`` as a CSV (one row per step). Returns the columns."""
    run = client.get_run(run_id)
    keys = sorted(k for k in run.data.metrics if k.startswith(prefix + "/"))
    rows: dict[int, dict[str, float]] = {}
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            rows.setdefault(int(m.step), {})[key.split("/", 1)[1]] = m.value
    cols = [k.split("/", 1)[1] for k in keys]
    with atomic_writer(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([x, *cols])
        for step in sorted(rows):
            writer.writerow([step, *[rows[step].get(c, "") for c in cols]])
    return cols


def _root_cause(exc: BaseException) -> str:
    """The innermost worker error of a failed Ray Train run, as one short line."""
    cause: BaseException = exc
    seen = set()
    while True:
        inner = getattr(cause, "worker_failures", None)
        if isinstance(inner, dict) and inner:
            cause = next(iter(inner.values()))
        elif isinstance(getattr(cause, "controller_failure", None), BaseException):
            cause = cause.controller_failure
        elif cause.__cause__ is not None and id(cause.__cause__) not in seen:
            seen.add(id(cause))
            cause = cause.__cause__
        else:
            break
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


def _worker_runtime_env(params: Mapping[str, Any]) -> dict[str, Any] | None:
    """When joining an existing cluster, ship this ``pipeline`` package to the training workers
    (its nodes need torch/ray/mlflow installed, not our code)."""
    if resolve_address(ray_options(params)["address"]) is None:
        return None
    return {"py_modules": [str(Path(pipeline.__file__).parent)]}
