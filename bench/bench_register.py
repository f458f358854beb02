"""Throughput of the register step (pairs/s) on a real dataset, for a checkout before and after issue 9.

Each run is a fresh child process that starts a local Ray, registers every pair of the dataset once
untimed as a warm-up on the first 6 pairs (Ray's workers start and import their libraries on the
first task), then times ``register`` on all pairs (``--repeat`` times, best and median reported).
Then the same pairs go through ``register_pair`` in a plain loop in the child, timed in CPU seconds
per pair: a figure that other processes competing for the cores do not inflate, unlike the
wall-clock ones. Outputs go to a temporary folder.

Usage::

    python bench/bench_register.py [--raw ../shared/data/RoadScene] [--align check correct off]
        [--code DIR ...] [--num-cpus 2] [--repeat 2]

``--code`` times other checkouts too (e.g. a ``git worktree`` of an earlier commit that has
``pipeline/data/register.py``), each with every ``--align`` mode. Prints one line per (checkout,
mode) and writes ``bench/results/register.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Run by the child process: ``argv = [code_dir, raw, align, num_cpus, repeat]``; prints one JSON line.
_CHILD = r"""
import json, os, shutil, sys, tempfile, time
from pathlib import Path
code, raw, align, num_cpus, repeat = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
sys.path.insert(0, code)
import ray
from pipeline.data.register import register_dataset, register_pair
from pipeline.data.register_options import AlignOptions
options = AlignOptions(align=align)
ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR")
tmp = Path(tempfile.mkdtemp(prefix="bench_register_"))
try:
    warm = tmp / "warm"
    for sub in ("ir", "vi"):
        (warm / sub).mkdir(parents=True)
        for p in sorted((raw / sub).iterdir())[:6]:
            os.symlink(p.resolve(), warm / sub / p.name)
    register_dataset(warm / "ir", warm / "vi", tmp / "out_warm", options, progress=False)
    times = []
    for i in range(repeat):
        t = time.perf_counter()
        summary = register_dataset(raw / "ir", raw / "vi", tmp / f"out{i}", options, progress=False)
        times.append(time.perf_counter() - t)
    # the same work in a plain loop in this process: CPU seconds per pair, which other processes
    # competing for the cores do not inflate (wall-clock figures above do)
    import cv2
    cv2.setNumThreads(1)
    vi_by_stem = {p.stem: p for p in (raw / "vi").iterdir()}
    pairs = [(p, vi_by_stem[p.stem]) for p in sorted((raw / "ir").iterdir()) if p.stem in vi_by_stem]
    cpu = time.process_time()
    for ir_path, vi_path in pairs:
        register_pair(ir_path.stem, str(ir_path), str(vi_path), tmp / "loop", options)
    cpu = time.process_time() - cpu
    print(json.dumps({"align": align, "pairs": summary.accepted, "seconds": times, "corrected": summary.corrected,
                      "loop_cpu_s_per_pair": cpu / len(pairs)}))
finally:
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
"""


def run_child(code: Path, raw: Path, align: str, num_cpus: int, repeat: int) -> dict:
    """Time one (checkout, mode) in a fresh process; returns its JSON record."""
    env = {**os.environ, "PYTHONPATH": str(code)}  # Ray's worker processes import from it too
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(code), str(raw), align, str(num_cpus), str(repeat)],
        capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(),
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark of {code} ({align}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, default=ROOT.parent / "shared" / "data" / "RoadScene",
                        help="dataset with ir/ and vi/ (default: ../shared/data/RoadScene)")
    parser.add_argument("--align", nargs="+", default=["check", "correct", "off"], help="modes to time")
    parser.add_argument("--code", nargs="*", type=Path, default=[], help="other checkouts to time as well")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (default: 2)")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per (checkout, mode) (default: 2)")
    args = parser.parse_args(argv)
    from pipeline.common.atomic_io import write_json
    from pipeline.common.machine import provenance

    if not (args.raw / "ir").is_dir() or not (args.raw / "vi").is_dir():
        parser.error(f"--raw {args.raw}: no ir/ and vi/ folders")
    results, load_before = [], os.getloadavg()
    for code in [ROOT, *args.code]:
        modern = (code / "pipeline" / "data" / "register.py").is_file()
        for align in args.align if modern else ["legacy"]:
            rec = run_child(code.resolve(), args.raw.resolve(), align, args.num_cpus, args.repeat)
            rec.update(code=str(code), best_s=min(rec["seconds"]), median_s=statistics.median(rec["seconds"]))
            rec["pairs_per_s"] = rec["pairs"] / rec["best_s"]
            results.append(rec)
            print(f"{str(code):<40} {rec['align']:<8} {rec['pairs']} pairs: best {rec['best_s']:.2f} s, "
                  f"median {rec['median_s']:.2f} s -> {rec['pairs_per_s']:.1f} pairs/s ({rec['corrected']} corrected); "
                  f"plain loop {1000 * rec['loop_cpu_s_per_pair']:.0f} ms CPU per pair")
    out = write_json(ROOT / "bench" / "results" / "register.json", {
        "machine": provenance(load_before, ray_cpus=args.num_cpus), "raw": str(args.raw), "results": results})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
