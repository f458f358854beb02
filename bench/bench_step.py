"""Training-step efficiency: achieved GFLOP/s of a training step against the fp32 matmul ceiling.

For 64x64 and 128x128 patches (``train.batch_size`` of them per step, the ``model:`` of
params.yaml) measures, on ``--threads`` torch threads (default 1, what each Ray Train worker
uses here):

- the FLOPs of one step (forward + loss + backward), counted with
  ``torch.utils.flop_counter.FlopCounterMode``;
- the time of each part of ``pipeline.train.step.train_step`` (``StepClock``): data decode (the
  worker's ``PatchCollate`` on Parquet rows), model forward, loss, backward, gradient clip,
  optimiser; median over the measured steps;
- the ceiling: a 2048x2048 fp32 matmul (best of 5) in the same run, same threads; and, as a
  second reference, a large 3x3 convolution (oneDNN, channels-last): on AMD CPUs MKL's sgemm
  reaches about half of what oneDNN's convolutions do, so a step can exceed the matmul "ceiling";
- achieved GFLOP/s = step FLOPs / (forward + loss + backward time), and over the whole step, as a
  fraction of the ceiling.

Two losses: ``params`` (the ``loss:`` section of params.yaml as it is) and ``full`` (every term on:
patch level, the VGG style term, the feature term). The training step of the stage (``pipeline.train.
step``) is measured as it runs; ``--compare`` also times the step without its CPU speed-ups
(the contiguous NCHW model and the for-loop AdamW, as before) interleaved with it and checks that the
loss values agree. Prints a table with ratios and writes ``bench/results/step.json``.

Usage: ``python bench/bench_step.py [--steps 6] [--warmup 2] [--threads 1] [--compare]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]

FULL_LOSS = {"patch": {"enabled": True}, "style": {"enabled": True}, "feature": {"enabled": True}}


def matmul_ceiling(n: int = 2048, repeats: int = 5, dtype: Any = None, device: str = "cpu") -> float:
    """GFLOP/s of the best of ``repeats`` ``n x n`` matmuls (fp32 unless ``dtype``)."""
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def conv_ceiling(channels: int = 256, size: int = 64, batch: int = 8, repeats: int = 5) -> float:
    """GFLOP/s of the best of ``repeats`` large 3x3 convolutions (fp32, channels-last, no bias):
    the rate oneDNN's convolution kernels reach here, the kind of kernel a training step runs
    (on AMD CPUs MKL's sgemm, behind the matmul ceiling, reaches much less)."""
    import torch

    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    best = float("inf")
    with torch.no_grad():
        conv(x)
        for _ in range(repeats):
            t = time.perf_counter()
            conv(x)
            best = min(best, time.perf_counter() - t)
    return 2 * batch * size * size * channels * channels * 9 / best / 1e9


def rows(n: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` patch-table rows as ``iter_torch_batches`` hands them to ``PatchCollate``."""
    rng = np.random.default_rng(seed)
    ir = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    vi = np.clip(ir.astype(np.int16) // 2 + rng.integers(0, 128, (n, size, size)), 0, 255).astype(np.uint8)
    w = rng.uniform(0.2, 0.8, (2, n))
    out: dict[str, np.ndarray] = {"pair_id": np.array([f"p{i}" for i in range(n)], dtype=object),
                                  "size": np.full(n, size, np.int32),
                                  "ir": np.array([r.tobytes() for r in ir], dtype=object),
                                  "vi": np.array([r.tobytes() for r in vi], dtype=object)}
    for prefix in ("img_w_", "w_"):
        out[prefix + "int_ir"], out[prefix + "int_vi"] = w[0], 1 - w[0]
        out[prefix + "det_ir"], out[prefix + "det_vi"] = w[1], 1 - w[1]
    return out


def step_flops(model: Any, loss_fn: Any, batch: dict[str, Any]) -> int:
    """FLOPs of forward + loss + backward on ``batch`` (``FlopCounterMode``; no optimiser step)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.train.data import WEIGHT_KEYS

    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        fused, feats = model(batch["ir"], batch["vi"], return_features=True)
        total, _ = loss_fn(fused.float(), batch["ir"], batch["vi"], {k: batch[k] for k in WEIGHT_KEYS}, features=feats)
        total.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def measure(size: int, loss_cfg: dict, params: dict, steps: int, warmup: int, baseline: bool) -> dict:
    """One configuration: the step's parts (median ms), its FLOPs and the loss values it gave."""
    import torch

    from pipeline.common.config import section
    from pipeline.model.network import build_model, model_config
    from pipeline.train.data import PatchCollate
    from pipeline.train.losses import FusionLoss
    from pipeline.train.settings import TrainSettings
    from pipeline.train.step import (
        StepClock,
        build_optimizer,
        prepare_for_training,
        train_step,
    )

    s = TrainSettings.from_params(params)
    name, margs = model_config(section(params, "model"))
    torch.manual_seed(s.seed)
    model = build_model(name, **margs)
    loss_fn = FusionLoss.from_params(loss_cfg)
    device = torch.device("cpu")
    collate = PatchCollate(device, s.sample_weights)
    if baseline:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.lr,
                                weight_decay=s.weight_decay, foreach=False)
    else:
        model = prepare_for_training(model, device)
        loss_fn = prepare_for_training(loss_fn, device)
        opt = build_optimizer(model, s)
    data = [rows(s.batch_size, size, seed=i) for i in range(steps + warmup)]
    flops = step_flops(model, loss_fn, collate(data[0]))
    clock, losses = StepClock(), []
    for raw in data:
        clock.restart()
        batch = collate(raw)
        clock.mark("decode")
        out = train_step(model, batch, loss_fn, opt, None, s.grad_clip, clock=clock)
        clock.end_step()
        losses.append(out["loss"])
    parts = {k: v["wall_s"] for k, v in clock.summary(skip=warmup).items()}
    compute = parts["forward"] + parts["loss"] + parts["backward"]
    return {"parts_s": parts, "gflop": flops / 1e9, "gflops_fwd_loss_bwd": flops / compute / 1e9,
            "gflops_whole_step": flops / parts["step"] / 1e9, "losses": losses,
            "batch": s.batch_size, "patches_per_s": s.batch_size / parts["step"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--compare", action="store_true", help="also time the step without its CPU speed-ups")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "step.json"))
    args = parser.parse_args()

    import torch

    from pipeline.common.config import load_params
    from pipeline.common.atomic_io import write_json
    from pipeline.common.machine import provenance
    from pipeline.train.losses import loss_section

    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    base_loss = loss_section(params)
    full_loss = {k: ({**v, **FULL_LOSS[k]} if k in FULL_LOSS else v) for k, v in base_loss.items()}
    load_before = os.getloadavg()
    ceiling = matmul_ceiling()
    conv_peak = conv_ceiling()
    print(f"fp32 matmul ceiling (2048x2048, {args.threads} thread(s)): {ceiling:.1f} GFLOP/s; "
          f"fp32 3x3 convolution (256 channels, oneDNN): {conv_peak:.1f} GFLOP/s", flush=True)
    results: dict[str, Any] = {}
    for size in args.sizes:
        for loss_name, cfg in (("params", base_loss), ("full", full_loss)):
            key = f"{size}px_{loss_name}_loss"
            runs = {"stage": measure(size, cfg, params, args.steps, args.warmup, baseline=False)}
            if args.compare:  # interleaved: baseline, then the stage's step again (best of the two)
                runs["baseline"] = measure(size, cfg, params, args.steps, args.warmup, baseline=True)
                again = measure(size, cfg, params, args.steps, args.warmup, baseline=False)
                if again["parts_s"]["step"] < runs["stage"]["parts_s"]["step"]:
                    runs["stage"] = again
                diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(runs["stage"]["losses"], runs["baseline"]["losses"]))
                runs["loss_max_rel_diff_vs_baseline"] = diff
            r = runs["stage"]
            r["fraction_of_ceiling"] = r["gflops_fwd_loss_bwd"] / ceiling
            r["fraction_of_ceiling_whole_step"] = r["gflops_whole_step"] / ceiling
            r["fraction_of_conv_ceiling"] = r["gflops_fwd_loss_bwd"] / conv_peak
            results[key] = runs
            parts = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in r["parts_s"].items())
            print(f"{key:22s}: {r['gflop']:7.1f} GFLOP/step, {r['gflops_fwd_loss_bwd']:6.1f} GFLOP/s "
                  f"= {r['fraction_of_ceiling']:.2f} of the matmul ceiling (whole step {r['fraction_of_ceiling_whole_step']:.2f}), "
                  f"{r['fraction_of_conv_ceiling']:.2f} of the conv ceiling, "
                  f"{r['patches_per_s']:.2f} patches/s; ms: {parts}", flush=True)
            if args.compare:
                b = runs["baseline"]
                print(f"{'':22s}  without the speed-ups: {b['gflops_fwd_loss_bwd']:6.1f} GFLOP/s, step "
                      f"{b['parts_s']['step'] * 1e3:.1f} ms -> speed-up {b['parts_s']['step'] / r['parts_s']['step']:.3f}x; "
                      f"loss values max rel. diff {runs['loss_max_rel_diff_vs_baseline']:.1e}", flush=True)
    report = {"ceiling_gflops_fp32_2048": ceiling, "conv_ceiling_gflops_fp32": conv_peak, "threads": args.threads,
              "results": results,
              "machine": provenance(load_before, torch_threads=args.threads)}
    out = write_json(args.out, report)
    print(f"wrote {out} (load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
