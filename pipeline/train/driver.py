"""Distributed training of the fusion network with Ray Train (DDP), tracked in MLflow.

Layout (as in Ray's own Train examples):

- ``train_settings(params)``: the ``train:`` section of ``params.yaml``, checked.
- ``train_loop_per_worker(config)``: runs on every Ray Train worker: data shard, model
  (``prepare_model``: DDP over gloo on CPU, NCCL on GPU), then per epoch ``train_epoch`` and
  ``validate`` and one ``ray.train.report`` (with a checkpoint every ``checkpoint_every`` epochs).
  World rank 0 logs to MLflow (per step and per epoch) through ``MlflowClient`` on a run created by
  the driver, so a restarted worker group keeps logging into the same run.
- ``run_training(...)``: the driver: MLflow run (params, tags), ``TorchTrainer.fit()``, best
  checkpoint -> ``models/best.pt`` + an MLflow ``pyfunc`` model, ``models/train.json``,
  ``metrics/train.json`` and ``plots/train_*.csv``.

Resuming: the Ray Train run lives in ``<storage_path>/<run name>``; launching again with the same
name resumes from its latest checkpoint (Ray Train V2 restores its checkpoint manager from the run
folder, the workers read ``ray.train.get_checkpoint()``). With ``train.run_name: null`` the name is
derived from a hash of the model/loss/train parameters, the training data and the ``pipeline``
package's source, so an identical re-launch resumes and any change starts a fresh run.

A run that already trained ``train.epochs`` epochs is never "resumed" for zero epochs and
re-exported: when its MLflow run recorded its outputs they are reused (nothing trained, no second
MLflow model); otherwise a default-named run folder is moved aside (``<name>.stale-<time>``) and
trained afresh, and an explicit ``train.run_name`` is an error (raise ``train.epochs`` or choose a
new name). An explicit name that finished with other parameters, data or code is an error too.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import re
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"  # optimizer/scheduler/progress, beside the model in a checkpoint
MODEL_FILE = "model.pt"  # the unwrapped model in pipeline.model.weights' checkpoint format
RUN_TAG = "mda.train_run"  # MLflow tag holding the Ray Train run name (one MLflow run per name)
CONFIG_TAG = "mda.train_config"  # MLflow tag: default_run_name() of the params/data/code it last trained with
VAL_METRICS = ("val_ssim", "val_qabf", "val_loss")
RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a folder name and a safe MLflow filter value


# ----------------------------------------------------------------------------------------------
# Parameters
@dataclass(frozen=True)
class TrainSettings:
    """The checked ``train:`` section (see ``params.yaml`` for the meaning of each key).

    The defaults are the values of the repository's ``params.yaml`` (a key left out of the file
    takes the same value as the shipped file gives it; ``tests/test_training.py`` checks this).
    """

    epochs: int = 3
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 5
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    seed: int = 2024
    shuffle_buffer: int = 64
    max_train_patches: int | None = 256
    sample_weights: str = "image"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float | None = None
    placement_strategy: str = "PACK"
    torch_threads: int | None = None
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    checkpoint_metric: str = "val_qabf"
    max_failures: int = 1
    run_name: str | None = None
    storage_path: str = "ray_results"
    experiment: str = "mda-fusion"
    log_every_steps: int = 5
    materialize: bool = True
    val_max_pairs: int | None = 4
    val_samples: int = 2

    @property
    def checkpoint_mode(self) -> str:
        """``"min"`` for loss metrics, ``"max"`` for quality metrics."""
        return "min" if self.checkpoint_metric.endswith("loss") else "max"


def train_settings(params: Mapping[str, Any]) -> TrainSettings:
    """Read and check the ``train:`` section.

    Raises:
        pipeline.common.config.ParamsError: naming ``train.<key>``.
    """
    from pipeline.common.config import param, section

    cfg = section(params, "train")
    d = TrainSettings()
    w = "train"

    def p(key: str, kind: Any, **kw: Any) -> Any:
        return param(cfg, key, kind, where=w, default=getattr(d, key), **kw)

    return TrainSettings(
        epochs=p("epochs", int, minimum=1),
        batch_size=p("batch_size", int, minimum=1),
        lr=p("lr", float, minimum=0.0),
        weight_decay=p("weight_decay", float, minimum=0.0),
        warmup_steps=p("warmup_steps", int, minimum=0),
        min_lr_ratio=p("min_lr_ratio", float, minimum=0.0, maximum=1.0),
        grad_clip=p("grad_clip", float, minimum=0.0),
        seed=p("seed", int, minimum=0),
        shuffle_buffer=p("shuffle_buffer", int, minimum=0),
        max_train_patches=p("max_train_patches", int, minimum=1, allow_none=True),
        sample_weights=p("sample_weights", str, choices=("image", "patch")),
        num_workers=p("num_workers", int, minimum=1),
        use_gpu=p("use_gpu", bool),
        cpus_per_worker=p("cpus_per_worker", float, minimum=0.01, allow_none=True),
        placement_strategy=p("placement_strategy", str, choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")),
        torch_threads=p("torch_threads", int, minimum=1, allow_none=True),
        checkpoint_every=p("checkpoint_every", int, minimum=1),
        keep_checkpoints=p("keep_checkpoints", int, minimum=1),
        checkpoint_metric=p("checkpoint_metric", str, choices=VAL_METRICS),
        max_failures=p("max_failures", int, minimum=-1),
        run_name=check_run_name(p("run_name", str, allow_none=True), "train.run_name"),
        storage_path=p("storage_path", str),
        experiment=p("experiment", str),
        log_every_steps=p("log_every_steps", int, minimum=1),
        materialize=p("materialize", bool),
        val_max_pairs=p("val_max_pairs", int, minimum=1, allow_none=True),
        val_samples=p("val_samples", int, minimum=0),
    )


def check_run_name(name: str | None, where: str = "train.run_name") -> str | None:
    """Check a Ray Train run name: 1-128 letters, digits, ``-``, ``_`` or ``.``, starting with a
    letter or digit (it becomes a folder name and a value in MLflow filter strings).

    Raises:
        pipeline.common.config.ParamsError: naming ``where``.
    """
    from pipeline.common.config import ParamsError

    if name is not None and not RUN_NAME_RE.fullmatch(name):
        raise ParamsError(f"{where}: {name!r} is not a valid run name (1-128 letters, digits, '-', '_' or '.', "
                          "starting with a letter or digit)")
    return name


def cpus_per_worker(settings: TrainSettings, cluster_cpus: float) -> float:
    """Logical CPUs reserved by each training worker.

    ``train.cpus_per_worker`` when set; otherwise the cluster's CPUs minus one (left to the Ray
    Data tasks that feed the workers: with every CPU taken by workers, the dataset never starts)
    shared by the workers, at most 1 and at least 0.25. On 2 CPUs: 0.5 for 2 workers, 1 for 1.
    """
    if settings.cpus_per_worker is not None:
        return float(settings.cpus_per_worker)
    share = (float(cluster_cpus) - 1.0) / settings.num_workers
    return float(min(1.0, max(0.25, math.floor(share * 4) / 4)))


def scaling_config(settings: TrainSettings, cluster_resources: Mapping[str, float]):
    """``ray.train.ScalingConfig`` from the settings, sized from ``ray.cluster_resources()``.

    Raises:
        ValueError: GPUs requested on a cluster without GPUs.
    """
    from ray.train import ScalingConfig

    if settings.use_gpu and cluster_resources.get("GPU", 0) < settings.num_workers:
        raise ValueError(
            f"train.use_gpu is true with train.num_workers={settings.num_workers}, but the Ray cluster "
            f"has {cluster_resources.get('GPU', 0)} GPU(s)"
        )
    resources = {"CPU": cpus_per_worker(settings, cluster_resources.get("CPU", 1.0))}
    if settings.use_gpu:
        resources["GPU"] = 1.0
    return ScalingConfig(
        num_workers=settings.num_workers,
        use_gpu=settings.use_gpu,
        resources_per_worker=resources,
        placement_strategy=settings.placement_strategy,
    )


# ----------------------------------------------------------------------------------------------
# Optimisation pieces (plain PyTorch, usable without Ray: the benchmark's plain loop uses them too)
def build_optimizer(model: Any, settings: TrainSettings):
    """AdamW over the trainable parameters."""
    import torch

    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=settings.lr, weight_decay=settings.weight_decay
    )


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based): linear warm-up, then cosine
    decay from 1 to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: Any, settings: TrainSettings, total_steps: int):
    """``LambdaLR`` stepping once per optimiser step with ``lr_factor``."""
    import torch

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, settings.warmup_steps, settings.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_step(
    model: Any,
    batch: Mapping[str, Any],
    loss_fn: Any,
    optimizer: Any,
    scheduler: Any | None = None,
    grad_clip: float = 0.0,
    bf16: bool = False,
) -> dict[str, float]:
    """One optimiser step on a batch.

    Args:
        model: the network (plain or DDP-wrapped), called as ``model(ir, vi, return_features=True)``.
        batch: ``ir``, ``vi`` (B, 1, S, S) float in [0, 1] and the (B,) loss weights ``int_ir``,
            ``int_vi``, ``det_ir``, ``det_vi`` (as ``pipeline.train.data.decode_patches``).
        loss_fn: ``pipeline.train.losses.FusionLoss``.
        optimizer, scheduler: stepped once each (scheduler may be ``None``).
        grad_clip: max global gradient norm, 0 disables clipping.
        bf16: autocast the forward pass to bfloat16 (GPU only; the loss runs in fp32).

    Returns:
        ``loss`` and each loss term (floats, this worker's batch), ``grad_norm`` and ``lr`` (the
        learning rate used for this step).
    """
    import torch

    from pipeline.data.stats import WEIGHT_NAMES as WEIGHT_KEYS

    ir, vi = batch["ir"], batch["vi"]
    weights = {k: batch[k] for k in WEIGHT_KEYS}
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(ir.device.type, dtype=torch.bfloat16, enabled=bf16):
        fused, feats = model(ir, vi, return_features=True)
    total, terms = loss_fn(fused.float(), ir, vi, weights, features=feats)
    if not torch.isfinite(total):
        raise FloatingPointError(f"non-finite training loss {float(total)} (terms: {_floats(terms)})")
    total.backward()
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        norm = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
        )
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    out = {"loss": float(total.detach()), **_floats(terms)}
    out["grad_norm"] = float(norm)
    out["lr"] = float(lr)
    return out


def _floats(terms: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in terms.items()}


# ----------------------------------------------------------------------------------------------
# Validation on whole images
def fuse_luma(model: Any, ir: np.ndarray, vi_y: np.ndarray, device: Any = "cpu"):
    """Fuse one whole image pair with ``model`` (padded with ``pipeline.model.inference.pad_to_multiple``, cropped back).

    Args:
        model: unwrapped network in eval mode.
        ir, vi_y: (H, W) uint8.

    Returns:
        ``(fused, ir_t, vi_t)``: (1, 1, H, W) float tensors in [0, 1] (fused as the model gives it).
    """
    import torch

    from pipeline.model.inference import pad_to_multiple

    h, w = ir.shape
    ir_t = torch.from_numpy(ir).to(device=device, dtype=torch.float32).div_(255.0)[None, None]
    vi_t = torch.from_numpy(vi_y).to(device=device, dtype=torch.float32).div_(255.0)[None, None]
    fused = model(pad_to_multiple(ir_t), pad_to_multiple(vi_t))[..., :h, :w]
    return fused.float(), ir_t, vi_t


def validate(
    model: Any, pairs: Iterable[Any], loss_fn: Any, device: Any = "cpu", keep: int = 0
) -> tuple[dict[str, float], list[tuple[str, np.ndarray]]]:
    """Fuse whole validation pairs and score them.

    Args:
        model: unwrapped network (eval mode is set here and restored).
        pairs: ``pipeline.train.data.ValPair`` items.
        loss_fn: the training loss (its terms are reported on whole images, image-level weights).
        device: torch device.
        keep: how many fused images (uint8, colour when the visible input is colour) to return.

    Returns:
        ``(sums, samples)``: metric sums over the pairs (``val_loss``, ``val_<term>``,
        ``val_ssim`` and ``val_qabf`` from :mod:`pipeline.evaluate.metrics` with the CDDFuse conventions on
        the fused luma vs the IR and the visible luma, and ``count``) and ``[(stem, image)]``.
    """
    import torch

    from pipeline.evaluate import metrics
    from pipeline.data.images import merge_luma

    sums: dict[str, float] = {"count": 0.0}
    samples: list[tuple[str, np.ndarray]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for pair in pairs:
                fused, ir_t, vi_t = fuse_luma(model, pair.ir, pair.vi_y, device)
                weights = {k: torch.tensor([v], device=fused.device) for k, v in pair.weights.items()}
                total, terms = loss_fn(fused, ir_t, vi_t, weights)
                fused_u8 = (fused[0, 0].clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
                row = {"val_loss": float(total), **{f"val_{k}": float(v) for k, v in terms.items()}}
                row["val_ssim"] = metrics.ssim(pair.ir, pair.vi_y, fused_u8)
                row["val_qabf"] = metrics.qabf(pair.ir, pair.vi_y, fused_u8)
                for k, v in row.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                sums["count"] += 1.0
                if len(samples) < keep:
                    samples.append((pair.stem, merge_luma(fused_u8, pair.vi_crcb)))
    finally:
        model.train(was_training)
    return sums, samples


# ----------------------------------------------------------------------------------------------
# The per-worker training function
def _all_reduce_sums(sums: dict[str, float], keys: list[str]) -> dict[str, float]:
    """Sum ``sums[k]`` over all workers (missing keys count as 0); no-op without a process group."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {k: float(sums.get(k, 0.0)) for k in keys}
    t = torch.tensor([float(sums.get(k, 0.0)) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return dict(zip(keys, t.cpu().tolist()))


def _gather_objects(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _Tracker:
    """World rank 0's MLflow logger: buffered per-step metrics, per-epoch metrics, images."""

    def __init__(self, uri: str | None, run_id: str | None, enabled: bool) -> None:
        self.enabled = bool(enabled and uri and run_id)
        self.run_id = run_id
        self.buffer: list[Any] = []
        if self.enabled:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=uri)

    def metrics(self, values: Mapping[str, float], step: int, flush: bool = False) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), now, int(step)) for k, v in values.items() if math.isfinite(float(v))]
        if flush or len(self.buffer) >= 200:
            self.flush()

    def flush(self) -> None:
        if self.enabled and self.buffer:
            for i in range(0, len(self.buffer), 1000):
                self.client.log_batch(self.run_id, metrics=self.buffer[i : i + 1000])
            self.buffer = []

    def tag(self, key: str, value: Any) -> None:
        if self.enabled:
            self.client.set_tag(self.run_id, key, str(value))

    def image(self, image: np.ndarray, artifact_file: str) -> None:
        if not self.enabled:
            return
        from pipeline.data.images import write_image

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            write_image(path, image)
            self.client.log_artifact(self.run_id, str(path), str(Path(artifact_file).parent))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function (``TorchTrainer(train_loop_per_worker=...)``).

    ``config`` keys: ``settings`` (``TrainSettings`` as a dict), ``model_name``, ``model_args``,
    ``loss`` (the ``loss:`` section), ``val`` (kwargs of ``load_val_pairs``), ``steps_per_epoch``,
    ``mlflow_uri``, ``mlflow_run_id``, ``driver_host``.
    """
    import ray.train
    import ray.train.torch
    import torch

    from pipeline.train.losses import FusionLoss
    from pipeline.model.network import build_model
    from pipeline.train.data import PatchCollate, load_val_pairs
    from pipeline.model.weights import load_model, save_checkpoint

    s = TrainSettings(**config["settings"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if s.torch_threads:
        torch.set_num_threads(s.torch_threads)
    torch.manual_seed(s.seed)
    np.random.seed(s.seed)
    device = ray.train.torch.get_device()
    bf16 = device.type == "cuda"

    model = build_model(config["model_name"], **config["model_args"])
    loss_fn = FusionLoss.from_params(config["loss"]).to(device)
    steps_per_epoch = int(config["steps_per_epoch"])
    total_steps = steps_per_epoch * s.epochs

    start_epoch, global_step, state = 1, 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            restored, _ = load_model(Path(ckpt_dir) / MODEL_FILE)
            model.load_state_dict(restored.state_dict())
            state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=True)
        start_epoch, global_step = int(state["epoch"]) + 1, int(state["global_step"])
        if start_epoch > s.epochs:  # the driver checks this first; never report a 0-epoch "resume"
            raise ValueError(f"the restored checkpoint is at epoch {start_epoch - 1}, train.epochs is {s.epochs}: "
                             "nothing to train (raise train.epochs or choose a new train.run_name)")

    model = ray.train.torch.prepare_model(model)  # DDP (gloo on CPU, NCCL on GPU) when world > 1
    net = model.module if hasattr(model, "module") else model
    optimizer = build_optimizer(model, s)
    scheduler = build_scheduler(optimizer, s, total_steps)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])

    if rank == 0:
        _check_tracking_reachable(config.get("mlflow_uri"), config.get("driver_host", ""))
    tracker = _Tracker(config.get("mlflow_uri"), config.get("mlflow_run_id"), rank == 0)
    nodes = _gather_objects(ray.get_runtime_context().get_node_id())
    if rank == 0:
        tracker.tag("loss.vgg_source", loss_fn.vgg_source)
        tracker.tag("train.worker_nodes", ",".join(nodes))
        tracker.tag("train.world_size", world)
        if checkpoint is not None:
            tracker.tag(f"train.resumed_at_epoch_{start_epoch}", time.strftime("%Y-%m-%dT%H:%M:%S"))
    pairs = load_val_pairs(**config["val"])
    if not pairs:
        raise ValueError(f"no validation pairs in {config['val']['split_json']} (the split needs val pairs)")
    my_pairs = pairs[rank::world]

    shard = ray.train.get_dataset_shard("train")
    collate = PatchCollate(device, s.sample_weights)
    for epoch in range(start_epoch, s.epochs + 1):
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        steps = 0
        batches = shard.iter_torch_batches(
            batch_size=s.batch_size,
            collate_fn=collate,
            drop_last=True,
            local_shuffle_buffer_size=s.shuffle_buffer or None,
            local_shuffle_seed=(s.seed + epoch) if s.shuffle_buffer else None,
        )
        t_step = time.perf_counter()
        for batch in batches:
            if steps >= steps_per_epoch:  # equal step counts on every worker (DDP needs it)
                break
            out = train_step(model, batch, loss_fn, optimizer, scheduler, s.grad_clip, bf16)
            steps += 1
            global_step += 1
            now = time.perf_counter()
            out["patches_per_s"] = s.batch_size * world / max(now - t_step, 1e-9)
            t_step = now
            out["w_int_ir_mean"] = float(batch["int_ir"].mean())
            out["w_det_ir_mean"] = float(batch["det_ir"].mean())
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v
            if rank == 0 and (global_step % s.log_every_steps == 0 or steps == 1):
                tracker.metrics({f"train/{k}": v for k, v in out.items()}, global_step)
        if steps == 0:
            raise ValueError("a training worker received no full batch: too few training patches for "
                             f"train.batch_size={s.batch_size} x {world} workers")
        train_time = time.perf_counter() - t0
        keys = sorted(set().union(*_gather_objects(sorted(sums))))
        totals = _all_reduce_sums(sums, keys)
        n_steps = _all_reduce_sums({"n": steps}, ["n"])["n"]
        epoch_metrics = {f"train_{k}": v / n_steps for k, v in totals.items() if k not in ("patches_per_s",)}
        epoch_metrics["train_patches_per_s"] = n_steps * s.batch_size / train_time
        epoch_metrics["lr"] = optimizer.param_groups[0]["lr"]

        t1 = time.perf_counter()
        vsums, samples = validate(net, my_pairs, loss_fn, device, keep=s.val_samples if rank == 0 else 0)
        vkeys = sorted(set().union(*_gather_objects(sorted(vsums))) | {"count", *VAL_METRICS})
        vtot = _all_reduce_sums(vsums, vkeys)
        count = max(vtot.pop("count"), 1.0)
        epoch_metrics.update({k: v / count for k, v in vtot.items()})
        epoch_metrics["val_time_s"] = time.perf_counter() - t1
        epoch_metrics["epoch_time_s"] = time.perf_counter() - t0
        epoch_metrics.update(epoch=epoch, global_step=global_step, num_nodes=len(set(nodes)),
                             resumed_from_epoch=start_epoch - 1)

        if rank == 0:
            tracker.metrics({f"epoch/{k}": v for k, v in epoch_metrics.items() if k != "epoch"}, epoch, flush=True)
            for stem, image in samples:
                tracker.image(image, f"val_samples/epoch_{epoch:03d}/{stem}.png")
        report = {**epoch_metrics, "worker_nodes": ",".join(sorted(set(nodes)))}
        if epoch % s.checkpoint_every == 0 or epoch == s.epochs:
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    save_checkpoint(Path(tmp) / MODEL_FILE, net, config["model_name"], config["model_args"],
                                    extra={"epoch": epoch, "global_step": global_step,
                                           "mlflow_run_id": config.get("mlflow_run_id"),
                                           **{k: epoch_metrics[k] for k in VAL_METRICS}})
                    torch.save({"epoch": epoch, "global_step": global_step,
                                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                               Path(tmp) / STATE_FILE)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(report, checkpoint=ckpt)
        else:
            ray.train.report(report)
    tracker.flush()


# ----------------------------------------------------------------------------------------------
# The driver
@dataclass
class TrainPaths:
    """Inputs and outputs of the ``train`` stage (``dvc.yaml`` passes them to ``stages/train.py``)."""

    patches_dir: Path
    registered_dir: Path
    split_json: Path
    images_parquet: Path
    best_checkpoint: Path = Path("models/best.pt")
    summary_json: Path = Path("models/train.json")
    metrics_json: Path = Path("metrics/train.json")
    loss_csv: Path = Path("plots/train_loss.csv")
    val_csv: Path = Path("plots/train_val.csv")
    root: Path = field(default_factory=Path.cwd)


def data_digest(patches_dir: str | Path) -> str:
    """SHA-256 (hex, first 12) of the training Parquet files' names and bytes."""
    h = hashlib.sha256()
    for f in sorted(Path(patches_dir).glob("*.parquet")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def code_digest() -> str:
    """SHA-256 (hex, first 12) of the ``pipeline`` package's source files (names and bytes).

    Part of the default run name, so that a code change starts a new training run instead of
    resuming (and, if finished, re-using) one trained by other code.
    """
    import pipeline

    h = hashlib.sha256()
    root = Path(pipeline.__file__).parent
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def default_run_name(params: Mapping[str, Any], digest: str) -> str:
    """``mda-<hash>`` of the model/loss/train sections (run placement keys excluded), the data
    digest and the code digest (``code_digest``)."""
    from pipeline.common.config import flatten

    relevant = {k: v for k, v in flatten({s: params.get(s) or {} for s in ("model", "loss", "train")}).items()
                if k not in ("train.run_name", "train.storage_path", "train.experiment")}
    blob = json.dumps(relevant, sort_keys=True, default=str) + digest + code_digest()
    return "mda-" + hashlib.sha256(blob.encode()).hexdigest()[:10]


def _find_mlflow_run(settings: TrainSettings, run_name: str, root: Path) -> tuple[str, Any, str | None, str | None]:
    """The latest MLflow run tagged with ``run_name``.

    Returns:
        ``(uri, experiment_id, run_id, status)``; ``run_id``/``status`` are ``None`` when absent.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.common.mlflow_store import configure_mlflow

    uri = configure_mlflow(root, settings.experiment)
    exp = mlflow.get_experiment_by_name(settings.experiment)
    check_run_name(run_name)  # safe inside the filter string
    found = MlflowClient(tracking_uri=uri).search_runs(
        [exp.experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_name}'",
        max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        return uri, exp.experiment_id, found[0].info.run_id, found[0].info.status
    return uri, exp.experiment_id, None, None


def _new_mlflow_run(params: Mapping[str, Any], uri: str, experiment_id: str, run_name: str) -> str:
    """Create the MLflow run of a Ray Train run (tagged ``RUN_TAG``), log every parameter. Returns its id."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.common.config import flatten

    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_TAG: run_name})
    flat = {k: ("null" if v is None else v) for k, v in flatten(params).items()}
    with mlflow.start_run(run_id=run.info.run_id):
        mlflow.log_params(flat)
    return run.info.run_id


def trained_epochs(run_dir: str | Path) -> int:
    """Highest epoch among the checkpoints that Ray Train registered in a run folder (0: none).

    Read from Ray Train V2's ``checkpoint_manager_snapshot.json`` (the metrics reported with each
    checkpoint carry ``epoch``); a missing or unreadable snapshot counts as no checkpoint.
    """
    try:
        snap = json.loads((Path(run_dir) / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return 0
    results = list(snap.get("checkpoint_results") or []) + [snap.get("latest_checkpoint_result") or {}]
    epochs = [(r.get("metrics") or {}).get("epoch") for r in results if isinstance(r, dict)]
    return max([int(e) for e in epochs if isinstance(e, (int, float))], default=0)


def _set_aside(run_dir: Path) -> Path:
    """Rename a Ray Train run folder to ``<name>.stale-<time>`` (kept, out of the way). Returns the new path."""
    dest = run_dir.with_name(f"{run_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while dest.exists():
        dest, n = dest.with_name(f"{run_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
    shutil.move(str(run_dir), str(dest))
    return dest


def _write_curves(client: Any, run_id: str, prefix: str, x: str, path: Path) -> list[str]:
    """Write the MLflow metric histories ``<prefix>/*`` as a CSV (one row per step). Returns the columns."""
    from pipeline.common.atomic_io import atomic_writer

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
    import mlflow
    from mlflow.tracking import MlflowClient
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        RunConfig,
        TrainingFailedError,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.common.config import section
    from pipeline.common.atomic_io import copy_atomic, write_json
    from pipeline.model.pyfunc import log_fusion_model
    from pipeline.model.network import model_config
    from pipeline.common.ray_runtime import ray_options, ray_session
    from pipeline.train.data import count_train_patches, load_val_pairs, train_dataset

    t_start = time.perf_counter()
    settings = train_settings(params)
    model_name, model_args = model_config(section(params, "model"))
    loss_cfg = section(params, "loss")
    from pipeline.train.losses import FusionLoss

    FusionLoss.from_params(loss_cfg)  # fail fast on bad loss params, before any worker starts
    root = Path(paths.root).resolve()
    val_kwargs = {"registered_dir": str(Path(paths.registered_dir).resolve()),
                  "split_json": str(Path(paths.split_json).resolve()),
                  "images_parquet": str(Path(paths.images_parquet).resolve()),
                  "max_pairs": settings.val_max_pairs}
    if not load_val_pairs(**val_kwargs):  # fail fast (and with the file's name) before Ray starts
        raise ValueError(f"{paths.split_json}: no 'val' pairs; training validates on them (raise crop.fractions.val)")
    n_train = count_train_patches(paths.patches_dir)
    if settings.max_train_patches is not None:
        n_train = min(n_train, settings.max_train_patches)
    steps_per_epoch = n_train // (settings.batch_size * settings.num_workers)
    if steps_per_epoch < 1:
        raise ValueError(
            f"{paths.patches_dir}: {n_train} training patches are fewer than train.batch_size "
            f"({settings.batch_size}) x train.num_workers ({settings.num_workers})"
        )
    explicit = check_run_name(run_name, "run_name (--run-name)") or settings.run_name
    config_id = default_run_name(params, data_digest(paths.patches_dir))
    name = explicit or config_id
    storage = Path(settings.storage_path)
    storage = storage if storage.is_absolute() else root / storage
    uri, experiment_id, run_id, previous_status = _find_mlflow_run(settings, name, root)
    client = MlflowClient(tracking_uri=uri)
    if run_id is not None and previous_status == "FINISHED":
        reused = _reuse_finished_run(client, run_id, name, settings, paths, config_id)
        if reused is not None:
            return reused
    done = trained_epochs(storage / name)
    if done >= settings.epochs:  # a finished Ray Train run whose MLflow outputs are gone: never re-export it
        if explicit:
            raise ValueError(
                f"train.run_name {name!r}: the Ray Train run in {storage / name} already trained {done} epoch(s) "
                f"(train.epochs={settings.epochs}) and has no reusable MLflow outputs; raise train.epochs to "
                "continue it or choose a new train.run_name")
        moved = _set_aside(storage / name)
        log.warning("training run %s already finished %d epoch(s) but its MLflow run and outputs are gone: "
                    "moved it to %s and training afresh", name, done, moved)
        done = 0
    if run_id is None or done == 0:  # a fresh Ray Train run gets a fresh MLflow run (no second model in an old one)
        run_id = _new_mlflow_run(params, uri, experiment_id, name)
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, CONFIG_TAG, config_id)
    log.info("training run %s (MLflow run %s at %s), %d steps/epoch", name, run_id, uri, steps_per_epoch)

    config = {
        "settings": asdict(settings),
        "model_name": model_name,
        "model_args": model_args,
        "loss": loss_cfg,
        "val": val_kwargs,
        "steps_per_epoch": steps_per_epoch,
        "mlflow_uri": uri,
        "mlflow_run_id": run_id,
        "driver_host": socket.gethostname(),
    }
    try:
        with ray_session(**ray_options(params)) as resources:
            from ray.data import ExecutionOptions

            # ordered driver DataContext (set by train_dataset): limit() and materialize() keep file order
            dataset = train_dataset(paths.patches_dir, settings.max_train_patches, settings.sample_weights)
            if settings.materialize:  # read + filter once; epochs then iterate over the object store
                dataset = dataset.materialize()
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config=config,
                scaling_config=scaling_config(settings, resources),
                torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
                datasets={"train": dataset},
                dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
                run_config=RunConfig(
                    name=name,
                    storage_path=str(storage),
                    worker_runtime_env=_worker_runtime_env(params),
                    checkpoint_config=CheckpointConfig(
                        num_to_keep=settings.keep_checkpoints,
                        checkpoint_score_attribute=settings.checkpoint_metric,
                        checkpoint_score_order=settings.checkpoint_mode,
                    ),
                    failure_config=FailureConfig(max_failures=settings.max_failures),
                ),
            )
            t_fit = time.perf_counter()
            try:
                result = trainer.fit()
            except TrainingFailedError as exc:
                raise RuntimeError(f"training run {name} failed: {_root_cause(exc)}") from exc
            fit_s = time.perf_counter() - t_fit
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise

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
    _write_curves(client, run_id, "train", "step", Path(paths.loss_csv))
    _write_curves(client, run_id, "epoch", "epoch", Path(paths.val_csv))

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
        "vgg_source": vgg_source,
        "worker_nodes": final.get("worker_nodes", ""),
    }
    metric_keys = [k for k in final if k.startswith(("train_", "val_")) and isinstance(final[k], (int, float))]
    metrics_out = {k: float(final[k]) for k in sorted(metric_keys)}
    metrics_out.update({f"best_{settings.checkpoint_metric}": best_value, "epochs": summary["epochs"],
                        "fit_time_s": round(fit_s, 2), "stage_time_s": round(time.perf_counter() - t_start, 2)})
    write_json(paths.metrics_json, metrics_out)
    write_json(paths.summary_json, summary)
    client.log_dict(run_id, {"summary": summary, "metrics": metrics_out}, SUMMARY_ARTIFACT)
    client.set_terminated(run_id, status="FINISHED")
    return summary


SUMMARY_ARTIFACT = "train_outputs.json"


def _reuse_finished_run(client: Any, run_id: str, name: str, settings: TrainSettings,
                        paths: TrainPaths, config_id: str) -> dict[str, Any] | None:
    """Outputs of a run that already finished with the same name (same params, data and code for
    the default name), instead of resuming it with nothing to train and logging its model twice.

    Returns ``None`` (train: Ray Train resumes from the latest checkpoint) when the run trained
    fewer than ``train.epochs`` epochs (an explicit ``train.run_name`` whose epochs were raised)
    or its recorded outputs are gone.

    Raises:
        ValueError: an explicit ``train.run_name`` that finished with other parameters, data or
            code (``config_id``, see ``default_run_name``): re-exporting it would pass old weights
            off as trained with the current ones.
    """
    import mlflow

    from pipeline.common.atomic_io import copy_atomic, write_json

    try:
        recorded = mlflow.artifacts.load_dict(f"runs:/{run_id}/{SUMMARY_ARTIFACT}")
    except Exception:  # noqa: BLE001 - absent or unreadable: train instead
        return None
    summary, metrics = recorded.get("summary") or {}, recorded.get("metrics") or {}
    checkpoint = Path(str(summary.get("ray_checkpoint", ""))) / MODEL_FILE
    if int(summary.get("epochs", 0)) < settings.epochs or not checkpoint.is_file():
        return None
    trained_with = client.get_run(run_id).data.tags.get(CONFIG_TAG)
    if trained_with is not None and trained_with != config_id:
        raise ValueError(
            f"train.run_name {name!r} already finished {summary.get('epochs')} epoch(s) (train.epochs="
            f"{settings.epochs}) with other parameters, data or code (MLflow run {run_id}); raise train.epochs "
            "to continue it or choose a new train.run_name")
    log.info("training run %s already finished (%s epochs, train.epochs=%d), reusing its best checkpoint and "
             "MLflow model %s: nothing trained, no model logged (raise train.epochs to continue it, or choose "
             "another train.run_name to train again)", name, summary.get("epochs"), settings.epochs,
             summary.get("model_uri"))
    copy_atomic(checkpoint, Path(paths.best_checkpoint))
    summary["checkpoint"] = str(paths.best_checkpoint)
    write_json(paths.metrics_json, metrics)
    write_json(paths.summary_json, summary)
    for csv_path, prefix, x in ((paths.loss_csv, "train", "step"), (paths.val_csv, "epoch", "epoch")):
        _write_curves(client, run_id, prefix, x, Path(csv_path))
    client.set_terminated(run_id, status="FINISHED")
    return summary


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
    from pipeline.common.ray_runtime import ray_options, resolve_address

    if resolve_address(ray_options(params)["address"]) is None:
        return None
    import pipeline

    return {"py_modules": [str(Path(pipeline.__file__).parent)]}


def _check_tracking_reachable(uri: str | None, driver_host: str) -> None:
    """A local MLflow store (sqlite/file) only works for a rank 0 on the driver's host."""
    import socket

    if uri and uri.startswith(("sqlite:", "file:", "/")) and socket.gethostname() != driver_host:
        raise ValueError(
            f"MLflow store {uri} is local to the driver host {driver_host}, but world rank 0 runs on "
            f"{socket.gethostname()}: set MLFLOW_TRACKING_URI to an MLflow server reachable from the cluster"
        )


def _best_checkpoint(result: Any, settings: TrainSettings) -> tuple[Any, dict[str, Any]]:
    """The best kept checkpoint by ``train.checkpoint_metric`` (latest if none carries it)."""
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if settings.checkpoint_metric in (m or {})]
    if not scored:
        if result.checkpoint is None:
            raise RuntimeError("training finished without any checkpoint")
        return result.checkpoint, dict(result.metrics or {})
    sign = -1.0 if settings.checkpoint_mode == "min" else 1.0
    return max(scored, key=lambda cm: (sign * float(cm[1][settings.checkpoint_metric]), cm[1].get("epoch", 0)))

