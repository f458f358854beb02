#!/usr/bin/env bash
# GPU readiness of the training path, in one script (a few minutes; give it a CUDA machine).
#
# Runs the `train` stage's CUDA path through Ray Train on synthetic 64x64 patches: one GPU per
# worker (ScalingConfig use_gpu), NCCL (TorchConfig backend), bf16 autocast of the forward pass,
# the model in channels-last layout, batches collated into pinned memory and copied
# asynchronously; the same pieces as the stage (pipeline.train.driver.build_trainer,
# pipeline.train.worker.prepare_job / train_epoch, through bench/bench_train.py's ray_train).
# Prints the training patches/s, the bf16 matmul ceiling (TFLOP/s of an 8192x8192 bf16 matmul)
# and the achieved TFLOP/s of a training step (FLOPs counted with FlopCounterMode) as a fraction
# of it; writes bench/results/gpu_check.json (read by bench/scale_projection.py).
#
# Usage: bench/gpu_check.sh [--batch-size 256] [--steps 30] [--workers N]   (N: default all GPUs)
# On a machine without CUDA it stops at once: "no CUDA device" (exit status 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3

"$PY" - "$@" <<'EOF'
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    print(f"gpu_check: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False): "
          "run this on a machine with an NVIDIA GPU and a CUDA build of torch", file=sys.stderr)
    sys.exit(2)

REPO = Path.cwd()
sys.path[:0] = [str(REPO), str(REPO / "bench")]
parser = argparse.ArgumentParser(prog="bench/gpu_check.sh")
parser.add_argument("--batch-size", type=int, default=256, help="patches per GPU per step")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--warmup", type=int, default=5)
parser.add_argument("--workers", type=int, default=torch.cuda.device_count())
args = parser.parse_args()

import ray  # noqa: E402

from bench_step import matmul_ceiling, rows, step_flops  # noqa: E402
from bench_train import ray_train, synthetic_patches  # noqa: E402
from pipeline.common.config import load_params, section  # noqa: E402
from pipeline.model.network import build_model, model_config  # noqa: E402
from pipeline.train.data import PatchCollate  # noqa: E402
from pipeline.train.losses import FusionLoss, loss_section  # noqa: E402
from pipeline.train.step import prepare_for_training  # noqa: E402

t0 = time.time()
params = load_params(REPO / "params.yaml")
name, margs = model_config(section(params, "model"))
device = torch.device("cuda", 0)
ceiling = matmul_ceiling(8192, dtype=torch.bfloat16, device="cuda") / 1e3  # TFLOP/s
print(f"bf16 matmul ceiling (8192x8192, {torch.cuda.get_device_name(0)}): {ceiling:.1f} TFLOP/s", flush=True)

# FLOPs of one step at this batch (the same whatever the precision: FlopCounterMode counts the ops)
rows_needed = (args.warmup + args.steps) * args.batch_size * args.workers
patches = synthetic_patches(Path(tempfile.mkdtemp(prefix="gpu_check_")), n=max(512, rows_needed))
model = prepare_for_training(build_model(name, **margs), device)
loss_fn = prepare_for_training(FusionLoss.from_params(loss_section(params)), device)
batch = PatchCollate(device)(rows(args.batch_size, 64))
with torch.autocast("cuda", dtype=torch.bfloat16):
    flops = step_flops(model, loss_fn, batch)
del model, loss_fn, batch
torch.cuda.empty_cache()

ray.init(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count(), include_dashboard=False, logging_level="WARNING")
try:
    cfg = {"patches": str(patches), "model_name": name, "model_args": margs, "batch_size": args.batch_size,
           "steps": args.steps, "warmup": args.warmup}
    r = ray_train(cfg, params, args.workers, use_gpu=True)
finally:
    ray.shutdown()
per_worker_step = r["step_s_median"]
achieved = flops / per_worker_step / 1e12  # per GPU
report = {"device": torch.cuda.get_device_name(0), "gpus": args.workers, "batch_size_per_worker": args.batch_size,
          "patches_per_s": r["patches_per_s"], "step_s_median": per_worker_step, "startup_s": r["startup_s"],
          "step_tflop": flops / 1e12, "achieved_tflops_per_gpu": achieved, "bf16_ceiling_tflops": ceiling,
          "fraction_of_ceiling": achieved / ceiling, "breakdown": r["breakdown"], "wall_s": time.time() - t0,
          "torch": torch.__version__, "ray": ray.__version__}
print(f"training, {args.workers} GPU worker(s) x {args.batch_size} patches (NCCL, bf16 autocast, channels-last, pinned):"
      f" {r['patches_per_s']:.0f} patches/s, step {per_worker_step * 1e3:.1f} ms, start-up {r['startup_s']:.1f} s")
print(f"achieved {achieved:.2f} TFLOP/s per GPU of a {ceiling:.1f} TFLOP/s bf16 ceiling: ratio {achieved / ceiling:.3f}")
out = REPO / "bench" / "results" / "gpu_check.json"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(report, indent=2, default=str) + "\n")
print(f"wrote {out} ({time.time() - t0:.0f} s)")
EOF
