"""CPU inference speed of the MDA network against the machine's practical ceiling.

For a 640x480 pair (MSRS) and the largest TNO pair (945x709, padded to 952x712), prints and writes
to ``bench/results/inference.json``:

- parameter count, GFLOPs of one fused forward (``torch.utils.flop_counter.FlopCounterMode``,
  2 FLOPs per multiply-add, counted on the padded input);
- milliseconds per forward (best of ``--repeats`` after a warm-up) of the plain eager fp32 path
  (NCHW, ``torch.no_grad``, PyTorch's default allocator: ``eager_fp32``, timed in a child process)
  and of our tuned path (``tuned``: ``pipeline.model.inference.Fuser``, i.e. inference mode,
  channels-last, padding and cropping included, in a process with ``THP_MEM_ALLOC_ENABLE=1`` as
  ``mda fuse`` sets it: large tensors on transparent huge pages); also the plain eager path in the
  THP process (``eager_fp32_thp``), and optionally ``torch.compile`` of the tuned path (``--compile``);
- achieved GFLOP/s and its ratio to the GFLOP/s of a 2048x2048 fp32 matmul measured in the same
  run (the practical ceiling of this machine), and the largest difference between the outputs of
  the eager and tuned paths (must be <= 1e-4).

Usage: ``python bench/bench_inference.py [--repeats 3] [--threads N] [--compile] [--synthetic]``
(``--no-thp``: run everything with the default allocator).
(``--synthetic`` uses random images of the same sizes when ../shared is absent; the authors'
weights are used when present, else a seeded random initialisation: speed does not depend on it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

if "--no-thp" not in sys.argv and "--baseline-child" not in sys.argv:  # before torch allocates anything
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.common.machine import cpu_model
from pipeline.data.images import read_ir, read_visible, split_luma  # noqa: E402
from pipeline.model.inference import Fuser, available_cores, pad_to_multiple, set_threads  # noqa: E402
from pipeline.model.network import build_model  # noqa: E402
from pipeline.model.weights import load_model  # noqa: E402

SHARED = Path(os.environ.get("MDA_SHARED", ROOT.parent / "shared"))
PAIRS = {
    "msrs_640x480": ("MSRS", "00001D.png", (480, 640)),
    "tno_largest_945x709": ("TNO", "09.png", (709, 945)),
}


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time in seconds over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_ceiling(repeats: int = 5, n: int = 2048) -> float:
    """GFLOP/s of an n x n fp32 matmul (best of ``repeats``)."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    return 2 * n**3 / best_time(lambda: a @ b, repeats) / 1e9


def load_pair(name: str, synthetic: bool) -> tuple[np.ndarray, np.ndarray]:
    dataset, file, size = PAIRS[name]
    root = SHARED / "data" / dataset
    if synthetic or not (root / "ir" / file).is_file():
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, size, np.uint8), rng.integers(0, 256, size, np.uint8)
    ir = read_ir(root / "ir" / file)
    y, _ = split_luma(read_visible(root / "vi" / file))
    return ir, y


def machine_info() -> dict[str, object]:
    return {
        "cpu": cpu_model(), "cores_available": available_cores(), "os_cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "device": "cpu",
        "mkldnn": torch.backends.mkldnn.is_available(), "python": platform.python_version(),
        "load_average_1_5_15": list(os.getloadavg()),
    }


def run_baseline_child(name: str, args: argparse.Namespace) -> float:
    """Seconds per plain eager forward, timed in a child process without THP allocations."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    cmd = [sys.executable, __file__, "--baseline-child", "--only", name, "--repeats", str(args.repeats)]
    cmd += ["--threads", str(torch.get_num_threads())] + (["--synthetic"] if args.synthetic else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def baseline_child(args: argparse.Namespace) -> int:
    """Print the best time (s) of the plain eager forward for ``--only`` (child process)."""
    set_threads(args.threads)
    weights = SHARED / "models" / "mda_official" / "fusion_model.pth"
    model = load_model(weights)[0] if weights.is_file() else build_model("mda").eval()
    ir_u8, y_u8 = load_pair(args.only, args.synthetic)
    ir = pad_to_multiple(torch.from_numpy(ir_u8).float()[None, None] / 255)
    vi = pad_to_multiple(torch.from_numpy(y_u8).float()[None, None] / 255)

    def eager() -> None:
        with torch.no_grad():
            model(ir, vi)

    print(best_time(eager, args.repeats))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="default: one per available core")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the tuned path")
    parser.add_argument("--synthetic", action="store_true", help="random images instead of ../shared")
    parser.add_argument("--only", choices=sorted(PAIRS), help="one pair only")
    parser.add_argument("--no-thp", action="store_true", help="default allocator for every variant")
    parser.add_argument("--baseline-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "inference.json")
    args = parser.parse_args(argv)
    if args.baseline_child:
        return baseline_child(args)

    set_threads(args.threads)
    weights = SHARED / "models" / "mda_official" / "fusion_model.pth"
    if weights.is_file():
        plain, _ = load_model(weights)
        source = str(weights)
    else:
        torch.manual_seed(0)
        plain, source = build_model("mda").eval(), "random init (seed 0)"
    params = sum(p.numel() for p in plain.parameters())
    tuned = Fuser(build_model("mda").eval(), postprocess="clip")
    tuned.model.load_state_dict(plain.state_dict())

    thp = os.environ.get("THP_MEM_ALLOC_ENABLE")
    info = machine_info()
    info["THP_MEM_ALLOC_ENABLE"] = thp
    ceiling = matmul_ceiling()
    print(f"machine: {info['cpu']}, {info['cores_available']} cores, torch threads {info['torch_threads']}, "
          f"load {info['load_average_1_5_15']}")
    print(f"ceiling: 2048x2048 fp32 matmul {ceiling:.1f} GFLOP/s; model {params:,} parameters ({source})")
    results: dict[str, object] = {}
    for name in ([args.only] if args.only else PAIRS):
        ir_u8, y_u8 = load_pair(name, args.synthetic)
        ir = torch.from_numpy(ir_u8).float()[None, None] / 255
        vi = torch.from_numpy(y_u8).float()[None, None] / 255
        ir_p, vi_p = pad_to_multiple(ir), pad_to_multiple(vi)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            plain(ir_p, vi_p)
        gflop = counter.get_total_flops() / 1e9

        def eager() -> torch.Tensor:
            with torch.no_grad():
                return plain(ir_p, vi_p)[..., : ir.shape[-2], : ir.shape[-1]]

        eager_label = "eager_fp32" if thp is None else "eager_fp32_thp"
        variants: dict[str, Callable[[], torch.Tensor]] = {
            eager_label: eager, "tuned": lambda: tuned.fuse_tensor(ir, vi)}
        if args.compile:
            compiled = Fuser(torch.compile(tuned.model), postprocess="clip")
            t0 = time.perf_counter()
            compiled.fuse_tensor(ir, vi)
            row_compile_s = time.perf_counter() - t0
            print(f"  torch.compile warm-up: {row_compile_s:.1f} s")
            variants["tuned_compiled"] = lambda: compiled.fuse_tensor(ir, vi)
        ref = eager()
        row: dict[str, object] = {"size_hw": list(ir.shape[-2:]), "padded_hw": list(ir_p.shape[-2:]),
                                  "gflop": round(gflop, 2)}
        print(f"{name}: {tuple(ir.shape[-2:])} padded {tuple(ir_p.shape[-2:])}, {gflop:.1f} GFLOP")
        if args.compile:
            row["compile_warmup_s"] = round(row_compile_s, 1)
        # Variants interleaved round by round and the ceiling re-measured each round, so that
        # load from other processes on a shared machine hits all of them alike (best of rounds).
        seconds = {label: float("inf") for label in variants}
        diffs = {label: float((fn() - ref).abs().max()) for label, fn in variants.items()}  # also warms up
        for _ in range(args.repeats):
            for label, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                seconds[label] = min(seconds[label], time.perf_counter() - t0)
            ceiling = max(ceiling, matmul_ceiling(repeats=2))
        if thp is not None:  # the plain baseline with the default allocator, in a fresh process
            seconds = {"eager_fp32": run_baseline_child(name, args), **seconds}
            diffs["eager_fp32"] = 0.0
            ceiling = max(ceiling, matmul_ceiling(repeats=2))
        for label, sec in seconds.items():
            rate = gflop / sec
            row[label] = {"ms": round(sec * 1e3, 1), "gflops_per_s": round(rate, 1),
                          "ratio_to_ceiling": round(rate / ceiling, 3), "max_abs_diff_vs_eager": diffs[label]}
            print(f"  {label:15s} {sec * 1e3:8.0f} ms  {rate:6.1f} GFLOP/s  "
                  f"{rate / ceiling:5.2f} of ceiling  max|diff| vs eager {diffs[label]:.1e}")
            if diffs[label] > 1e-4:
                print(f"  WARNING: {label} differs from eager by {diffs[label]:.1e} > 1e-4")
        row["ceiling_gflops_per_s"] = round(ceiling, 1)
        results[name] = row
    info["load_average_after"] = list(os.getloadavg())
    report = {"timestamp": dt.datetime.now().isoformat(timespec="seconds"), "machine": info,
              "ceiling_matmul_2048_gflops_per_s": round(ceiling, 1), "parameters": params,
              "weights": source, "repeats": args.repeats, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
