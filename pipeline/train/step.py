"""Optimisation and validation steps in plain PyTorch: optimiser, learning-rate schedule, one
training step, whole-image validation. Usable without Ray (the benchmark's plain loop uses them)."""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from pipeline.data.images import merge_luma
from pipeline.evaluate import metrics
from pipeline.model.inference import fuse_padded
from pipeline.train.data import WEIGHT_KEYS
from pipeline.train.settings import TrainSettings


class StepClock:
    """Wall and CPU seconds of each phase of the training steps (profiling; the benchmarks).

    ``train_step(..., clock=c)`` marks ``forward``, ``loss``, ``backward`` (with DDP: its gradient
    all-reduce too), ``clip`` and ``optimiser``; the loop around it marks the rest (``data``:
    waiting for the batch, ``log``) and closes each step with :meth:`end_step`. CPU time is the
    calling thread's (``time.thread_time``): wall minus CPU is time the thread did not run (waiting
    for data or an all-reduce, or another process on its core).
    """

    def __init__(self) -> None:
        self.steps: list[dict[str, tuple[float, float]]] = []
        self.first_mark_at: float | None = None  # time.time() of the first mark (start-up figures)
        self._phases: dict[str, tuple[float, float]] = {}
        self._wall, self._cpu = time.perf_counter(), time.thread_time()

    def restart(self) -> None:
        """Start timing the next phase now (drop what passed since the last mark)."""
        self._wall, self._cpu = time.perf_counter(), time.thread_time()

    def mark(self, phase: str) -> None:
        """Add the time since the previous mark to ``phase`` of the current step."""
        wall, cpu = time.perf_counter(), time.thread_time()
        if self.first_mark_at is None:
            self.first_mark_at = time.time()
        w, c = self._phases.get(phase, (0.0, 0.0))
        self._phases[phase] = (w + wall - self._wall, c + cpu - self._cpu)
        self._wall, self._cpu = wall, cpu

    def end_step(self) -> None:
        """Close the current step."""
        self.steps.append(self._phases)
        self._phases = {}

    def summary(self, skip: int = 0) -> dict[str, dict[str, float]]:
        """Per phase (and ``step``, their sum): median wall and CPU seconds over the steps after
        the first ``skip`` (warm-up)."""
        steps = self.steps[skip:]
        per_name = {name: [st.get(name, (0.0, 0.0)) for st in steps] for name in dict.fromkeys(k for st in steps for k in st)}
        per_name["step"] = [(sum(w for w, _ in st.values()), sum(c for _, c in st.values())) for st in steps]
        out: dict[str, dict[str, float]] = {}
        for name, pairs in per_name.items():
            times = np.array(pairs or [(0.0, 0.0)])  # (steps, 2): wall, CPU
            out[name] = {"wall_s": float(np.median(times[:, 0])), "cpu_s": float(np.median(times[:, 1]))}
        return out


class _NoClock(StepClock):
    """A :class:`StepClock` that records nothing (the stage's untimed steps)."""

    def mark(self, phase: str) -> None:
        pass

    def end_step(self) -> None:
        pass


NO_CLOCK = _NoClock()


def prepare_for_training(module: torch.nn.Module, device: Any) -> torch.nn.Module:
    """``module`` (the network, or the loss with its VGG) on ``device`` in channels-last (NHWC)
    memory layout, which convolutions run faster in (oneDNN on CPU, cuDNN tensor cores on GPU;
    ``bench/bench_step.py --compare`` measures it). The maths is unchanged: the inputs (one
    channel) need no conversion, and the weights keep their values and state-dict keys."""
    return module.to(device=device, memory_format=torch.channels_last)


def build_optimizer(model: Any, settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; the fused kernel (one pass over all parameters, the
    same update) where every parameter is on a CPU or CUDA device, else the default."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=fused or None)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float, time_fraction: float = 0.0) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based): linear warm-up, then cosine
    decay from 1 to ``min_ratio``. The decay follows whichever budget runs out first: the steps
    (``total_steps``) or the wall time (``time_fraction``, the share of ``train.max_seconds`` used)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max((step - warmup_steps) / span, time_fraction))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Schedule:
    """The learning rate of every optimiser step (:func:`lr_factor` times ``train.lr``) and the two
    budgets: ``total_steps`` optimiser steps and, when set, ``max_seconds`` of training.

    ``step()`` after each optimiser step counts it and sets the next rate; with a wall-time budget
    the loop calls ``update(seconds)`` before each step with the training seconds so far. ``done(seconds)`` says whether a budget
    has run out. Its ``state_dict`` (steps and seconds done) goes into the checkpoints, so a resumed
    run continues the same curve.
    """

    def __init__(self, optimizer: Any, settings: TrainSettings, total_steps: int) -> None:
        self.optimizer = optimizer
        self.base_lr = settings.lr
        self.total_steps = int(total_steps)
        self.warmup_steps = settings.warmup_steps
        self.min_ratio = settings.min_lr_ratio
        self.max_seconds = settings.max_seconds
        self.steps_done = 0
        self.seconds_before = 0.0  # training seconds of earlier attempts (a resumed run)
        self.seconds = 0.0  # training seconds of this attempt at the last update
        self.update(0.0)

    def time_fraction(self, seconds: float) -> float:
        """Share of the wall-time budget used after ``seconds`` of this attempt (0 without one)."""
        return (self.seconds_before + seconds) / self.max_seconds if self.max_seconds else 0.0

    def update(self, seconds: float) -> float:
        """Set the learning rate for the next step; returns it."""
        self.seconds = seconds
        lr = self.base_lr * lr_factor(self.steps_done, self.total_steps, self.warmup_steps, self.min_ratio,
                                      self.time_fraction(seconds))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self) -> None:
        self.steps_done += 1
        self.update(self.seconds)

    def done(self, seconds: float) -> str | None:
        """``"steps"`` or ``"time"`` when that budget has run out, else ``None``."""
        if self.steps_done >= self.total_steps:
            return "steps"
        if self.max_seconds and self.time_fraction(seconds) >= 1.0:
            return "time"
        return None

    def state_dict(self) -> dict[str, float]:
        return {"steps_done": self.steps_done, "seconds_before": self.seconds_before + self.seconds}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.steps_done = int(state["steps_done"])
        self.seconds_before = float(state["seconds_before"])
        self.update(0.0)


def build_scheduler(optimizer: Any, settings: TrainSettings, total_steps: int) -> Schedule:
    """The run's :class:`Schedule` over ``total_steps`` optimiser steps."""
    return Schedule(optimizer, settings, total_steps)


def train_step(
    model: Any,
    batch: Mapping[str, Any],
    loss_fn: Any,
    optimizer: Any,
    scheduler: Any | None = None,
    grad_clip: float = 0.0,
    bf16: bool = False,
    clock: StepClock | None = None,
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
        clock: marks the phases of the step (:class:`StepClock`), ``None``: not timed.

    Returns:
        ``loss`` and each loss term (floats, this worker's batch), ``grad_norm`` and ``lr`` (the
        learning rate used for this step).
    """
    ir, vi = batch["ir"], batch["vi"]
    weights = {k: batch[k] for k in WEIGHT_KEYS}
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    mark = (clock or NO_CLOCK).mark
    with torch.autocast(ir.device.type, dtype=torch.bfloat16, enabled=bf16):
        fused, feats = model(ir, vi, return_features=True)
    mark("forward")
    total, terms = loss_fn(fused.float(), ir, vi, weights, features=feats)
    if not torch.isfinite(total):
        raise FloatingPointError(f"non-finite training loss {float(total)} (terms: {_floats(terms)})")
    mark("loss")
    total.backward()
    mark("backward")
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        norm = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
        )
    mark("clip")
    optimizer.step()
    if scheduler is not None:
        scheduler.step()  # counts the step (the rate of the next one is set by Schedule.update)
    out = {"loss": float(total.detach()), **_floats(terms)}
    out["grad_norm"] = float(norm)
    out["lr"] = float(lr)
    mark("optimiser")
    return out


def _floats(terms: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in terms.items()}


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
    sums: dict[str, float] = {"count": 0.0}
    samples: list[tuple[str, np.ndarray]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for pair in pairs:
                row, fused_u8 = _score_pair(model, pair, loss_fn, device)
                for k, v in row.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                sums["count"] += 1.0
                if len(samples) < keep:
                    samples.append((pair.stem, merge_luma(fused_u8, pair.vi_crcb)))
    finally:
        model.train(was_training)
    return sums, samples


def _score_pair(model: Any, pair: Any, loss_fn: Any, device: Any) -> tuple[dict[str, float], np.ndarray]:
    """Fuse one whole ``ValPair`` (``pipeline.model.inference.fuse_padded``) and score it.

    Returns:
        ``(row, fused)``: ``val_loss``, ``val_<term>``, ``val_ssim``, ``val_qabf`` and the fused
        luma as uint8 (H, W).
    """
    ir_t = _unit_tensor(pair.ir, device)
    vi_t = _unit_tensor(pair.vi_y, device)
    fused = fuse_padded(model, ir_t, vi_t).float()
    weights = {k: torch.tensor([v], device=fused.device) for k, v in pair.weights.items()}
    total, terms = loss_fn(fused, ir_t, vi_t, weights)
    fused_u8 = (fused[0, 0].clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
    row = {"val_loss": float(total), **{f"val_{k}": float(v) for k, v in terms.items()}}
    row["val_ssim"] = metrics.ssim(pair.ir, pair.vi_y, fused_u8)
    row["val_qabf"] = metrics.qabf(pair.ir, pair.vi_y, fused_u8)
    return row, fused_u8


def _unit_tensor(image: np.ndarray, device: Any) -> torch.Tensor:
    """(H, W) uint8 -> (1, 1, H, W) float32 in [0, 1] on ``device``."""
    return torch.from_numpy(image).to(device=device, dtype=torch.float32).div_(255.0)[None, None]
