"""The Ray Train worker: ``train_loop_per_worker`` and its pieces (resume, one epoch of training,
one of validation, checkpoint and report), the DDP reductions and world rank 0's MLflow tracker.

Every worker trains on its shard of the patch table (``prepare_model``: DDP over gloo on CPU,
NCCL on GPU) and validates on its share of the whole validation pairs; the per-epoch metrics are
summed over the workers. World rank 0 logs to MLflow (per step and per epoch) through
``MlflowClient`` on a run created by the driver, so a restarted worker group keeps logging into
the same run, and writes the checkpoints (``MODEL_FILE`` + ``STATE_FILE``).
"""

from __future__ import annotations

import socket
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline.common.log_filter import quiet_ray_train_worker
from pipeline.common.mlflow_store import log_metrics_batched
from pipeline.data.images import write_image
from pipeline.model.network import build_model
from pipeline.model.weights import load_model, save_checkpoint
from pipeline.train.data import CropSampler, PatchCollate, load_train_pairs, load_val_pairs
from pipeline.train.losses import FusionLoss
from pipeline.train.settings import MODEL_FILE, VAL_METRICS, TrainSettings
from pipeline.train.step import (
    NO_CLOCK,
    StepClock,
    build_optimizer,
    build_scheduler,
    prepare_for_training,
    train_step,
    validate,
)

STATE_FILE = "train_state.pt"  # optimizer/scheduler/progress, beside the model in a checkpoint


# ----------------------------------------------------------------------------------------------
# DDP reductions (no-ops without a process group)
def _all_reduce_sums(sums: dict[str, float], keys: list[str]) -> dict[str, float]:
    """Sum ``sums[k]`` over all workers (missing keys count as 0); no-op without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {k: float(sums.get(k, 0.0)) for k in keys}
    t = torch.tensor([float(sums.get(k, 0.0)) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return dict(zip(keys, t.cpu().tolist()))


def _all_reduce_max(value: float) -> float:
    """The largest ``value`` over all workers."""
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every worker, in rank order (``[obj]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _sum_over_workers(sums: dict[str, float], count: float,
                      always: tuple[str, ...] = ()) -> tuple[dict[str, float], float]:
    """``(totals, total count)``: ``sums`` and ``count`` summed over all workers; ``totals`` has the
    keys of any worker plus ``always`` (0 where a worker lacks one)."""
    keys = sorted(set().union(*_gather_objects(sorted(sums))) | set(always))
    return _all_reduce_sums(sums, keys), _all_reduce_sums({"n": count}, ["n"])["n"]


# ----------------------------------------------------------------------------------------------
# World rank 0's MLflow logger
class _Tracker:
    """World rank 0's MLflow logger: per-step and per-epoch metrics, tags, images (no-op elsewhere).

    The MLflow calls run in order on one background thread, so that neither MLflow's import (1-2 s
    of a worker's start-up on 2 cores) nor a round trip to the store holds up a training step;
    :meth:`flush` (each epoch's end, before its checkpoint is reported) waits for them and
    re-raises the first failure.
    """

    def __init__(self, uri: str | None, run_id: str | None, enabled: bool) -> None:
        self.enabled = bool(enabled and uri and run_id)
        self.run_id = run_id
        self._pending: list[Future[Any]] = []
        if self.enabled:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-tracker")
            self._client = self._pool.submit(_mlflow_client, uri)

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        values, now_ms = dict(values), int(time.time() * 1000)  # the values' time, not the logging time
        self._submit(lambda: log_metrics_batched(self._client.result(), self.run_id, values, step, now_ms))

    def tags(self, values: Mapping[str, Any]) -> None:
        values = {k: str(v) for k, v in values.items()}
        self._submit(lambda: self._client.result().log_batch(
            self.run_id, tags=[_run_tag(k, v) for k, v in values.items()]))

    def image(self, image: np.ndarray, artifact_file: str) -> None:
        def log() -> None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / Path(artifact_file).name
                write_image(path, image)
                self._client.result().log_artifact(self.run_id, str(path), str(Path(artifact_file).parent))

        self._submit(log)

    def flush(self) -> None:
        """Wait for every MLflow call so far; re-raise the first that failed."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def _submit(self, call: Callable[[], Any]) -> None:
        if self.enabled:
            self._pending.append(self._pool.submit(call))


def _mlflow_client(uri: str) -> Any:
    """``MlflowClient`` for ``uri``. MLflow is imported here, on the tracker's thread: only world
    rank 0 needs it, and its import is the largest part of a training worker's imports."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _run_tag(key: str, value: str) -> Any:
    # imported by _mlflow_client already (on the tracker thread, as this is)
    from mlflow.entities import RunTag

    return RunTag(key, value)


def _check_tracking_reachable(uri: str | None, driver_host: str) -> None:
    """A local MLflow store (sqlite/file) only works for a rank 0 on the driver's host."""
    if uri and uri.startswith(("sqlite:", "file:", "/")) and socket.gethostname() != driver_host:
        raise ValueError(
            f"MLflow store {uri} is local to the driver host {driver_host}, but world rank 0 runs on "
            f"{socket.gethostname()}: set MLFLOW_TRACKING_URI to an MLflow server reachable from the cluster"
        )


# ----------------------------------------------------------------------------------------------
# One worker's training job
@dataclass
class Job:
    """What the epoch helpers share on one worker."""

    settings: TrainSettings
    config: dict[str, Any]
    rank: int
    world: int
    device: torch.device
    model: Any  # DDP-wrapped when world > 1
    net: torch.nn.Module  # the unwrapped network (validation, checkpoints)
    loss_fn: FusionLoss
    optimizer: torch.optim.Optimizer
    scheduler: Any
    tracker: _Tracker
    nodes: list[str]
    start_epoch: int
    global_step: int
    clock: StepClock = NO_CLOCK  # a StepClock times every step's phases (the benchmarks)
    started: float = 0.0  # time.perf_counter() when this attempt's training began (the time budget)
    stopped_by: str | None = None  # "steps" or "time" once a budget has run out

    def seconds(self) -> float:
        """Training seconds of this attempt, the largest over the workers when a time budget is
        set (so that every worker stops at the same step, as DDP needs)."""
        elapsed = time.perf_counter() - self.started
        if self.settings.max_seconds and self.world > 1:
            elapsed = _all_reduce_max(elapsed)
        return elapsed


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function (``TorchTrainer(train_loop_per_worker=...)``).

    ``config`` keys: ``settings`` (``TrainSettings`` as a dict), ``model_name``, ``model_args``,
    ``loss`` (the ``loss:`` section), ``val`` (kwargs of ``load_val_pairs``), ``train_pairs``
    (kwargs of ``load_train_pairs``, ``train.sampler: crops``), ``steps_per_epoch``,
    ``total_steps``, ``mlflow_uri``, ``mlflow_run_id``, ``driver_host``.

    An "epoch" is a round of ``steps_per_epoch`` optimiser steps followed by validation and a
    checkpoint; the run ends after ``train.epochs`` rounds, or earlier when the wall-time budget
    (``train.max_seconds``) runs out (then the current round is validated and checkpointed).
    """
    quiet_ray_train_worker()
    s = TrainSettings(**config["settings"])
    # first: Ray Data's split coordinator starts during prepare_job
    shard = ray.train.get_dataset_shard("train") if s.sampler == "patches" else None
    job = prepare_job(config, s)
    pairs = _val_pairs(config, job.rank, job.world)
    batches = epoch_batches(job, shard)
    job.started = time.perf_counter()
    for epoch in range(job.start_epoch, s.epochs + 1):
        t0 = time.perf_counter()
        epoch_metrics = train_epoch(job, batches, epoch)
        val_metrics, samples = validate_epoch(job, pairs)
        epoch_metrics.update(val_metrics)
        epoch_metrics["epoch_time_s"] = time.perf_counter() - t0
        epoch_metrics.update(epoch=epoch, global_step=job.global_step, num_nodes=len(set(job.nodes)),
                             resumed_from_epoch=job.start_epoch - 1, stopped_by_time=float(job.stopped_by == "time"))
        if job.rank == 0:
            _log_epoch(job.tracker, epoch, epoch_metrics, samples)
        job.tracker.flush()  # the epoch's MLflow logging done (or its error raised) before its report
        last = epoch == s.epochs or job.stopped_by is not None
        checkpoint_and_report(job, epoch, epoch_metrics, last=last)
        if last:
            break


def epoch_batches(job: Job, shard: Any) -> Callable[[int], Any]:
    """``batches(epoch)``: an iterator of this worker's training batches for that epoch.

    ``patches``: the shard of the patch table, passed over again as often as the epoch needs
    (shuffled with ``seed + epoch`` and the pass); ``crops``: one endless :class:`CropSampler`
    over the training pairs, seeded with ``train.seed`` and the worker's rank.
    """
    s = job.settings
    if s.sampler == "crops":
        pairs = load_train_pairs(**job.config["train_pairs"])
        seed = s.seed * 1000 + job.rank + 100 * job.start_epoch  # a resumed run does not repeat its first crops
        sampler = CropSampler(pairs, s.crop_size, s.batch_size, s.pair_sampling, seed=seed, device=job.device)
        return lambda epoch: sampler
    collate = PatchCollate(job.device, s.sample_weights)

    def passes(epoch: int) -> Any:
        for n in range(1_000_000):
            seed = s.seed + epoch + 7919 * n
            yield from shard.iter_torch_batches(
                batch_size=s.batch_size, collate_fn=collate, drop_last=True,
                local_shuffle_buffer_size=s.shuffle_buffer or None,
                local_shuffle_seed=seed if s.shuffle_buffer else None)

    return passes


def prepare_job(config: dict[str, Any], s: TrainSettings) -> Job:
    """Seeds, model (restored from ``ray.train.get_checkpoint()`` if any, then ``prepare_model``),
    loss, optimiser and schedule, MLflow tracker and the run's tags."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0:
        _check_tracking_reachable(config.get("mlflow_uri"), config.get("driver_host", ""))
    tracker = _Tracker(config.get("mlflow_uri"), config.get("mlflow_run_id"), rank == 0)  # first: MLflow loads meanwhile
    if s.torch_threads:
        torch.set_num_threads(s.torch_threads)
    torch.manual_seed(s.seed)
    np.random.seed(s.seed)
    device = ray.train.torch.get_device()
    model = build_model(config["model_name"], **config["model_args"])
    loss_fn = prepare_for_training(FusionLoss.from_params(config["loss"]), device)  # its VGG channels-last too
    checkpoint = ray.train.get_checkpoint()
    state = _restore(checkpoint, model, s) if checkpoint is not None else None
    if checkpoint is None and config.get("init_weights"):  # fine-tune (train.init_weights); a resume wins
        init_from_weights(model, config["init_weights"], config["model_name"], config["model_args"])
    model = prepare_for_training(model, device)  # channels-last on its device (faster convolutions, same maths)
    model = ray.train.torch.prepare_model(model)  # DDP (gloo on CPU, NCCL on GPU) when world > 1
    optimizer = build_optimizer(model, s)
    scheduler = build_scheduler(optimizer, s, int(config["total_steps"]))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    start_epoch, global_step = (int(state["epoch"]) + 1, int(state["global_step"])) if state else (1, 0)
    nodes = _gather_objects(ray.get_runtime_context().get_node_id())
    if rank == 0:
        tags = {"loss.vgg_source": loss_fn.vgg_source, "train.worker_nodes": ",".join(nodes), "train.world_size": world}
        if checkpoint is not None:
            tags[f"train.resumed_at_epoch_{start_epoch}"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        tracker.tags(tags)
    net = model.module if hasattr(model, "module") else model
    return Job(s, config, rank, world, device, model, net, loss_fn, optimizer, scheduler, tracker, nodes,
               start_epoch, global_step)


def init_from_weights(model: torch.nn.Module, path: str, model_name: str, model_args: Mapping[str, Any]) -> None:
    """Start from the weights of ``path`` (``train.init_weights``: our checkpoint, e.g. the shipped
    ``models/pretrained/mda_cpu.pt``, or the authors' ``fusion_model.pth``).

    Raises:
        ValueError: the file holds another architecture than ``model:`` of params.yaml (named).
    """
    restored, info = load_model(path)
    try:
        if info["name"] != model_name:
            raise RuntimeError(f"architecture {info['name']}")
        model.load_state_dict(restored.state_dict())  # strict: every tensor name and shape must match
    except RuntimeError as exc:
        raise ValueError(f"train.init_weights {path}: its model ({info['name']} {dict(info['args'])}) does not fit "
                         f"params.yaml model: {model_name} {dict(model_args)}: {str(exc)[:300]}") from exc


def _restore(checkpoint: Any, model: torch.nn.Module, s: TrainSettings) -> dict[str, Any]:
    """Load a checkpoint's weights into ``model``; return its optimiser/scheduler/progress state.

    Raises:
        ValueError: the checkpoint already reached ``train.epochs`` (the driver checks this first;
            a 0-epoch "resume" is never reported).
    """
    with checkpoint.as_directory() as ckpt_dir:
        restored, _ = load_model(Path(ckpt_dir) / MODEL_FILE)
        model.load_state_dict(restored.state_dict())
        state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=True)
    if int(state["epoch"]) + 1 > s.epochs:
        raise ValueError(f"the restored checkpoint is at epoch {int(state['epoch'])}, train.epochs is {s.epochs}: "
                         "nothing to train (raise train.epochs or choose a new train.run_name)")
    return state


def _val_pairs(config: dict[str, Any], rank: int, world: int) -> list[Any]:
    """This worker's share of the whole validation pairs."""
    pairs = load_val_pairs(**config["val"])
    if not pairs:
        raise ValueError(f"no validation pairs in {config['val']['split_json']} (the split needs val pairs)")
    return pairs[rank::world]


def train_epoch(job: Job, batches: Callable[[int], Any], epoch: int) -> dict[str, float]:
    """One round of ``steps_per_epoch`` optimiser steps (the same count on every worker, as DDP
    needs; fewer when the run's step or time budget runs out first, on every worker alike); rank
    0 logs ``train/*`` every ``log_every_steps`` steps.

    Returns:
        ``train_<key>`` means over all workers' steps, ``train_patches_per_s`` and ``lr``.
    """
    s, steps_per_epoch = job.settings, int(job.config["steps_per_epoch"])
    bf16 = job.device.type == "cuda"
    t0 = time.perf_counter()
    sums: dict[str, float] = {}
    steps = 0
    t_step = time.perf_counter()
    clock = job.clock
    clock.restart()
    for batch in batches(epoch):
        if steps >= steps_per_epoch:  # equal step counts on every worker (DDP needs it)
            break
        if s.max_seconds:
            job.scheduler.update(job.seconds())
        job.stopped_by = job.scheduler.done(job.scheduler.seconds)
        if job.stopped_by is not None:
            break
        clock.mark("data")
        out = train_step(job.model, batch, job.loss_fn, job.optimizer, job.scheduler, s.grad_clip, bf16, clock)
        steps += 1
        job.global_step += 1
        now = time.perf_counter()
        out["patches_per_s"] = s.batch_size * job.world / max(now - t_step, 1e-9)
        t_step = now
        out["w_int_ir_mean"] = float(batch["int_ir"].mean())
        out["w_det_ir_mean"] = float(batch["det_ir"].mean())
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + v
        if job.rank == 0 and (job.global_step % s.log_every_steps == 0 or steps == 1):
            job.tracker.metrics({f"train/{k}": v for k, v in out.items()}, job.global_step)
        clock.mark("log")
        clock.end_step()
    if job.stopped_by is None:
        job.stopped_by = job.scheduler.done(job.scheduler.seconds)
    if steps == 0 and job.stopped_by is None:
        raise ValueError("a training worker received no full batch: too few training patches for "
                         f"train.batch_size={s.batch_size} x {job.world} workers")
    train_time = time.perf_counter() - t0
    totals, n_steps = _sum_over_workers(sums, steps)
    out = {f"train_{k}": v / max(n_steps, 1) for k, v in totals.items() if k not in ("patches_per_s",)}
    out["train_patches_per_s"] = n_steps * s.batch_size / train_time
    out["lr"] = job.optimizer.param_groups[0]["lr"]
    return out


def validate_epoch(job: Job, pairs: list[Any]) -> tuple[dict[str, float], list[tuple[str, np.ndarray]]]:
    """Whole-image validation of this worker's pairs (``pipeline.train.step.validate``), averaged
    over all workers' pairs.

    Returns:
        ``(metrics, samples)``: ``val_<key>`` means (``VAL_METRICS`` always present) and
        ``val_time_s``; rank 0's ``train.val_samples`` fused images ``[(stem, image)]``.
    """
    t1 = time.perf_counter()
    keep = job.settings.val_samples if job.rank == 0 else 0
    vsums, samples = validate(job.net, pairs, job.loss_fn, job.device, keep=keep)
    count = vsums.pop("count")
    vtot, count = _sum_over_workers(vsums, count, always=VAL_METRICS)
    out = {k: v / max(count, 1.0) for k, v in vtot.items()}
    out["val_time_s"] = time.perf_counter() - t1
    return out, samples


def _log_epoch(tracker: _Tracker, epoch: int, epoch_metrics: Mapping[str, float],
               samples: list[tuple[str, np.ndarray]]) -> None:
    """Rank 0: the epoch's metrics as ``epoch/<key>`` at step ``epoch``, the fused samples as images."""
    tracker.metrics({f"epoch/{k}": v for k, v in epoch_metrics.items() if k != "epoch"}, epoch)
    for stem, image in samples:
        tracker.image(image, f"val_samples/epoch_{epoch:03d}/{stem}.png")


def checkpoint_and_report(job: Job, epoch: int, epoch_metrics: dict[str, Any], last: bool = False) -> None:
    """``ray.train.report`` on every worker, with a checkpoint (written by rank 0: the unwrapped
    model as ``MODEL_FILE``, optimiser/scheduler/progress as ``STATE_FILE``) every
    ``checkpoint_every`` epochs and at the last one (``last``, or epoch ``train.epochs``)."""
    s = job.settings
    report = {**epoch_metrics, "worker_nodes": ",".join(sorted(set(job.nodes)))}
    if not (epoch % s.checkpoint_every == 0 or epoch == s.epochs or last):
        ray.train.report(report)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if job.rank == 0:
            save_checkpoint(Path(tmp) / MODEL_FILE, job.net, job.config["model_name"], job.config["model_args"],
                            extra={"epoch": epoch, "global_step": job.global_step,
                                   "mlflow_run_id": job.config.get("mlflow_run_id"),
                                   **{k: epoch_metrics[k] for k in VAL_METRICS}})
            torch.save({"epoch": epoch, "global_step": job.global_step,
                        "optimizer": job.optimizer.state_dict(), "scheduler": job.scheduler.state_dict()},
                       Path(tmp) / STATE_FILE)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(report, checkpoint=ckpt)
