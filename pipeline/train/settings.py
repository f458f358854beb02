"""Training settings: the checked ``train:`` section of ``params.yaml`` and the Ray Train scaling it implies."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from pipeline.common.config import ParamsError, read_settings, section, setting

VAL_METRICS = ("val_ssim", "val_qabf", "val_loss")
#: the unwrapped model in ``pipeline.model.weights``' checkpoint format, in each Ray Train checkpoint
#: (written by the worker, read by the driver and ``pipeline.train.runs``)
MODEL_FILE = "model.pt"
RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a folder name and a safe MLflow filter value
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
#: ``train.sampler``: ``patches``: the stats stage's patch table through Ray Data (fixed patches,
#: shuffled); ``crops``: random ``crop_size`` crops with flips of whole training images
SAMPLERS = ("patches", "crops")
#: ``train.pair_sampling`` (crops): ``pairs``: every pair equally likely; ``area``: by pixel count
PAIR_SAMPLING = ("pairs", "area")


def check_run_name(name: str | None, where: str = "train.run_name") -> str | None:
    """Check a Ray Train run name: 1-128 letters, digits, ``-``, ``_`` or ``.``, starting with a
    letter or digit (it becomes a folder name and a value in MLflow filter strings).

    Raises:
        pipeline.common.config.ParamsError: naming ``where``.
    """
    if name is not None and not RUN_NAME_RE.fullmatch(name):
        raise ParamsError(f"{where}: {name!r} is not a valid run name (1-128 letters, digits, '-', '_' or '.', "
                          "starting with a letter or digit)")
    return name


def init_weights_digest(path: str | None) -> str:
    """SHA-256 (hex, first 12) of the ``train.init_weights`` file, ``""`` without one: part of the
    default run name, so that new starting weights start a new run instead of reusing one."""
    if path is None:
        return ""
    import hashlib
    from pathlib import Path

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


@dataclass(frozen=True)
class TrainSettings:
    """The checked ``train:`` section (see ``params.yaml`` for the meaning of each key).

    Each default is written once, here, and equals the repository's ``params.yaml`` (a key left
    out of the file takes the value the shipped file gives it; ``tests/train/test_settings.py``
    checks this).
    """

    epochs: int = setting(3, int, minimum=1)
    steps: int | None = setting(None, int, minimum=1, allow_none=True)
    max_seconds: float | None = setting(None, float, minimum=1.0, allow_none=True)
    sampler: str = setting("patches", str, choices=SAMPLERS)
    crop_size: int = setting(64, int, minimum=8)
    pair_sampling: str = setting("pairs", str, choices=PAIR_SAMPLING)
    batch_size: int = setting(8, int, minimum=1)
    lr: float = setting(5e-4, float, minimum=0.0)
    weight_decay: float = setting(1e-4, float, minimum=0.0)
    warmup_steps: int = setting(5, int, minimum=0)
    min_lr_ratio: float = setting(0.05, float, minimum=0.0, maximum=1.0)
    grad_clip: float = setting(1.0, float, minimum=0.0)
    seed: int = setting(2024, int, minimum=0)
    shuffle_buffer: int = setting(64, int, minimum=0)
    max_train_patches: int | None = setting(256, int, minimum=1, allow_none=True)
    sample_weights: str = setting("image", str, choices=("image", "patch"))
    init_weights: str | None = setting("models/pretrained/mda_cpu.pt", str, allow_none=True)
    num_workers: int = setting(2, int, minimum=1)
    use_gpu: bool = setting(False, bool)
    cpus_per_worker: float | None = setting(None, float, minimum=0.01, allow_none=True)
    placement_strategy: str = setting("PACK", str, choices=PLACEMENT_STRATEGIES)
    torch_threads: int | None = setting(None, int, minimum=1, allow_none=True)
    checkpoint_every: int = setting(1, int, minimum=1)
    keep_checkpoints: int = setting(2, int, minimum=1)
    checkpoint_metric: str = setting("val_ssim", str, choices=VAL_METRICS)
    max_failures: int = setting(1, int, minimum=-1)
    run_name: str | None = setting(None, str, allow_none=True, convert=check_run_name)
    storage_path: str = setting("ray_results", str)
    experiment: str = setting("mda-fusion", str)
    log_every_steps: int = setting(5, int, minimum=1)
    materialize: bool = setting(True, bool)
    val_max_pairs: int | None = setting(4, int, minimum=1, allow_none=True)
    val_samples: int = setting(2, int, minimum=0)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "TrainSettings":
        """Read and check the ``train:`` section of the whole parameters.

        Raises:
            pipeline.common.config.ParamsError: naming ``train.<key>``.
        """
        return read_settings(cls, section(params, "train"), "train")

    def __post_init__(self) -> None:
        if not 0.0 < self.lr <= 1.0:
            raise ParamsError(f"params: 'train.lr' must be > 0 and <= 1, got {self.lr!r}")

    @property
    def checkpoint_mode(self) -> str:
        """``"min"`` for loss metrics, ``"max"`` for quality metrics."""
        return "min" if self.checkpoint_metric.endswith("loss") else "max"


def train_settings(params: Mapping[str, Any]) -> TrainSettings:
    """Read and check the ``train:`` section (``TrainSettings.from_params``).

    Raises:
        pipeline.common.config.ParamsError: naming ``train.<key>``.
    """
    return TrainSettings.from_params(params)


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
    # lazy: the settings are also read without Ray Train (the benchmark's plain loop)
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
