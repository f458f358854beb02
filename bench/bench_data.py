"""Crop + stats throughput and peak memory: Ray Data (the stages' code) vs a plain loop vs multiprocessing.Pool.

All modes do the same work through the same code: ``crop_dataset`` then ``compute_stats`` on a
registered folder, with a different ``runner`` for the task groups (``pipeline.common.ray_runtime``):

- ``loop``: ``run_serially``, every group in the one process (the single-process baseline);
- ``pool``: ``multiprocessing.Pool(N)`` maps the same group functions over the same groups;
- ``ray``: ``map_groups``, one Ray Data execution per pass on a local Ray with N CPUs (the stages).

Input: the real pairs (RoadScene by default) go once through the register stage (untimed); scale
``k`` replicates them ``k`` times under new stems (``<stem>_r1`` ... symlinks, manifest rows copied),
so 4x and 16x are the same images, 4 and 16 times as many pairs.

Each (mode, scale, CPUs) runs in a fresh child process: one run with memory sampling, then
``--repeat`` runs (default 3) without it whose median wall time gives the throughput (single runs
differed by up to 10% on the same quiet machine). Timed: the steady state. Reported apart, not
counted: Ray start-up (``ray.init``) and a warm-up run on the first pairs, two crop shards per CPU
(every Ray or pool worker process starts and imports its libraries; the loop pays its imports
there too).

Peak memory (the sampled run) = the largest sum of PSS (shared pages split between processes, so
the Ray object store is not counted twice) over the child's process tree (driver + raylet + GCS +
workers for Ray, the pool's processes), sampled every second during that run (``TreeMemory``: a
sample costs CPU, which is why the throughput runs are not sampled), split into driver, workers
and Ray's daemons; beside it, the sum of each process's own peak RSS over all the runs, an upper
bound that sampling cannot miss. CPU time is split between the driver process, the worker
processes and Ray's own daemons (raylet, GCS, agents), and each pass's wall time and in-task time
are recorded: the breakdown of where Ray's time goes.

Usage: ``python bench/bench_data.py [--dataset ../shared/data/RoadScene] [--scales 1 4 16]
[--num-cpus 1 2] [--modes loop pool ray] [--repeat 3] [--merge]``. Defaults: ``--scales 1 4
--num-cpus 2 --repeat 3`` (about 5 minutes on 2 cores; ``--num-cpus 1 2`` about 7); add 16x apart
with ``--scales 16 --num-cpus 1 2 --repeat 1 --merge`` (about 7 minutes; ratios and memory growth
are then computed over every run in the file). Pool runs only for 2 CPUs or more. Prints each
figure with its ratio (Ray/loop, Ray/Pool, memory growth vs the smallest scale) and writes
``bench/results/data.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # registered_fixtures: the registered layout from a raw dataset

#: Warm-up: this many crop shards per CPU, so that every worker process runs tasks and imports its
#: libraries before the timed run (with fewer shards than CPUs one worker stayed cold and paid
#: about 0.9 s of imports inside the timed run).
WARMUP_SHARDS_PER_CPU = 2
DAEMONS = ("raylet", "gcs_server", "dashboard", "agent", "log_monitor", "monitor", "_StatsActor",
           "_AutoscalingCoordinatorActor", "RuntimeEnvAgent", "DashboardAgent")


class TreeMemory:
    """Sample the summed PSS (or RSS where PSS is unavailable) of this process and its descendants.

    One sample reads ``/proc/PID/smaps_rollup`` of every process, which the kernel computes by
    walking their page tables: about 35 ms of CPU for a local Ray's 11 processes on 2 cores. At the
    former 0.2 s interval that took about 17% of a core from the work being measured, mostly in the
    Ray runs; 1 s keeps it near 3%. ``peak_rss`` adds each process's own kernel-recorded peak RSS
    (``VmHWM``, no sampling, shared pages counted in every process that maps them): an upper bound
    that cannot miss a short peak.
    """

    def __init__(self, interval: float = 1.0) -> None:
        import psutil

        self.root = psutil.Process(os.getpid())
        self.interval = interval
        self.peak = 0
        self.at_peak: dict[str, int] = {}  # per kind (driver / workers / ray_daemons) in the peak sample
        self.kind_peak: dict[str, int] = {}  # each kind's own largest sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> int:
        import psutil

        kinds = {"driver": 0, "workers": 0, "ray_daemons": 0}
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
                kinds[process_kind(proc, self.root.pid)] += getattr(info, "pss", info.rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        total = sum(kinds.values())
        if total > self.peak:
            self.peak, self.at_peak = total, kinds
        for kind, value in kinds.items():
            self.kind_peak[kind] = max(self.kind_peak.get(kind, 0), value)
        return total

    def peak_rss(self) -> int:
        """Sum over the live processes of the tree of their peak RSS (``VmHWM``), in bytes."""
        import psutil

        total = 0
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                with open(f"/proc/{proc.pid}/status") as fh:
                    total += next((int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("VmHWM:")), 0)
            except (OSError, psutil.Error):
                continue
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemory":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def process_kind(proc: Any, driver_pid: int) -> str:
    """``driver`` (the benchmark's child process), ``ray_daemons`` (raylet, GCS, Ray's agents and
    actors) or ``workers`` (Ray workers running tasks, pool processes)."""
    if proc.pid == driver_pid:
        return "driver"
    cmd = " ".join(proc.cmdline())
    return "ray_daemons" if any(d in cmd for d in DAEMONS) else "workers"


def tree_cpu() -> dict[int, tuple[str, float]]:
    """``{pid: (kind, user + system CPU seconds)}`` of this process and its descendants.

    kind: ``driver`` (this process), ``ray_daemons`` (raylet, GCS, Ray's agents and actors) or
    ``workers`` (Ray workers running tasks, pool processes).
    """
    import psutil

    me = psutil.Process(os.getpid())
    out = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            out[proc.pid] = (process_kind(proc, me.pid), sum(proc.cpu_times()[:2]))
        except psutil.Error:
            continue
    return out


def cpu_split(before: Mapping[int, tuple[str, float]], after: Mapping[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds spent between two ``tree_cpu`` samples, per kind (processes alive at the end)."""
    split = {"driver": 0.0, "workers": 0.0, "ray_daemons": 0.0}
    for pid, (kind, cpu) in after.items():
        split[kind] += cpu - before.get(pid, (kind, 0.0))[1]
    return {k: round(v, 2) for k, v in split.items()}


def replicate(registered: Path, dst: Path, scale: int, limit: int | None = None) -> Path:
    """A registered folder with the accepted pairs of ``registered`` ``scale`` times (symlinks).

    Copy ``j`` (1 .. scale-1) of pair ``s`` is ``<s>_r<j>``; ``limit`` keeps the first pairs only.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(registered / "manifest.parquet")
    table = table.filter(pc.equal(table["status"], "ok"))
    if limit is not None:
        table = table.slice(0, limit)
    for sub in ("ir", "vi"):
        (dst / sub).mkdir(parents=True)
    copies = []
    stems = table.column("pair_id").to_pylist()
    for j in range(scale):
        names = [s if j == 0 else f"{s}_r{j}" for s in stems]
        for stem, name in zip(stems, names):
            for sub in ("ir", "vi"):
                (dst / sub / f"{name}.png").symlink_to((registered / sub / f"{stem}.png").resolve())
        copies.append(table.set_column(table.schema.get_field_index("pair_id"), "pair_id", pa.array(names, pa.string())))
    pq.write_table(pa.concat_tables(copies), dst / "manifest.parquet")
    return dst


def _pool_call(job: tuple[Callable[..., Any], Any, Mapping[str, Any]]) -> Any:
    from pipeline.common.ray_runtime import call_group

    fn, group, kwargs = job
    return call_group(fn, group, kwargs)


def pool_runner(pool: Any) -> Callable[..., list]:
    """A ``Runner`` mapping the groups over a ``multiprocessing.Pool`` (one group per task, in order)."""

    def run(name: str, fn: Callable[..., Any], groups: Sequence[Any], fn_kwargs: Mapping[str, Any] | None = None) -> list:
        return pool.map(_pool_call, [(fn, g, dict(fn_kwargs or {})) for g in groups], chunksize=1)

    return run


def timed_runner(runner: Callable[..., list], phases: list[dict]) -> Callable[..., list]:
    """Wrap a runner to record each pass's wall time and group count into ``phases``."""

    def run(name: str, fn: Callable[..., Any], groups: Sequence[Any], fn_kwargs: Mapping[str, Any] | None = None) -> list:
        t0 = time.perf_counter()
        out = runner(name, fn, groups, fn_kwargs)
        phases.append({"name": name, "tasks": len(groups), "wall_s": round(time.perf_counter() - t0, 3)})
        return out

    return run


class ExecutionLog(logging.Handler):
    """Collect the ``ray_data_execution`` records that ``map_groups`` logs (Ray's in-task times)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        info = getattr(record, "ray_data_execution", None)
        if info:
            self.records.append({k: (round(v, 3) if isinstance(v, float) else v) for k, v in info.items()})


def run_stages(reg: Path, out: Path, crop_cfg: Any, stats_cfg: Any, runner: Callable[..., list]) -> dict:
    """``crop_dataset`` then ``compute_stats`` with ``runner``; the patch count and a metric to compare."""
    from pipeline.data.crop import crop_dataset
    from pipeline.data.stats_stage import compute_stats

    record = crop_dataset(reg, out / "patches", crop_cfg, runner=runner)
    metrics = compute_stats(out / "patches", reg, out / "stats", stats_cfg, runner=runner)
    return {"patches": sum(record["counts"].values()), "w_int_ir": metrics["patch"]["w_int_ir"]}


def child(args: argparse.Namespace) -> int:
    """One timed run (``--child MODE``); prints a JSON line."""
    from pipeline.common import ray_runtime
    from pipeline.common.config import load_params, section
    from pipeline.data.crop import CropConfig
    from pipeline.data.stats_stage import StatsConfig

    executions = ExecutionLog()
    ray_log = logging.getLogger(ray_runtime.__name__)
    ray_log.addHandler(executions)
    ray_log.setLevel(logging.DEBUG)
    ray_log.propagate = False
    cpus = args.num_cpus[0]
    if args.tasks_per_cpu:
        ray_runtime.TASKS_PER_CPU = args.tasks_per_cpu
    params = load_params(args.params)
    crop_cfg = CropConfig.from_params(section(params, "crop"))
    stats_cfg = StatsConfig.from_params(section(params, "stats"))
    result: dict = {"mode": args.child, "scale": args.scale, "pairs": args.count,
                    "cpus": 1 if args.child == "loop" else cpus, "tasks_per_cpu": ray_runtime.TASKS_PER_CPU}
    pool = None
    if args.child == "ray":
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        result["ray_init_s"] = round(time.perf_counter() - t0, 2)
        runner = ray_runtime.map_groups
    elif args.child == "pool":
        import multiprocessing

        pool = multiprocessing.Pool(cpus)
        runner = pool_runner(pool)
    else:
        runner = ray_runtime.run_serially
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        out = Path(tmp)
        # Warm-up on the first pairs, timed apart: Ray's (or the pool's) worker processes start and
        # import numpy/OpenCV/pyarrow on their first task. The throughput below is the steady
        # state; the warm-up is the fixed start-up cost.
        t0 = time.perf_counter()
        warm = out / "warmup"
        warm_pairs = crop_cfg.pairs_per_shard * WARMUP_SHARDS_PER_CPU * result["cpus"]
        run_stages(replicate(args.registered, warm / "reg", 1, warm_pairs), warm, crop_cfg, stats_cfg, runner)
        result["warmup_s"] = round(time.perf_counter() - t0, 2)

        def one_run(k: int) -> dict:
            executions.records.clear()
            phases: list[dict] = []
            cpu0 = tree_cpu()
            t0 = time.perf_counter()
            work = run_stages(args.registered, out / f"run{k}", crop_cfg, stats_cfg, timed_runner(runner, phases))
            wall = time.perf_counter() - t0
            cpu = cpu_split(cpu0, tree_cpu())
            shutil.rmtree(out / f"run{k}")
            for phase, info in zip(phases, executions.records):  # Ray: what happened inside each execution
                phase.update({key: info[key] for key in (
                    "task_wall_s", "task_cpu_s", "to_first_task_s", "after_last_task_s", "driver_cpu_s")})
                # CPU-seconds the execution left idle: its wall time on every CPU minus the time in tasks
                phase["idle_cpu_s"] = round(cpus * phase["wall_s"] - info["task_wall_s"], 3)
            return {"work": work, "wall_s": wall, "cpu_s": cpu, "phases": phases}

        # run 0: memory, sampled (a sample costs CPU, more for Ray's many processes); runs 1..N:
        # throughput, unsampled
        with TreeMemory() as mem:
            baseline = mem.sample()
            sampled = one_run(0)
        timed = [one_run(k) for k in range(1, args.repeat + 1)] or [sampled]
        peak_rss = mem.peak_rss()  # kernel-recorded peaks: every run, sampled or not
        if pool is not None:
            pool.close()
            pool.join()
        if args.child == "ray":
            import ray

            ray.shutdown()
    walls = [r["wall_s"] for r in timed]
    median = sorted(timed, key=lambda r: r["wall_s"])[len(timed) // 2]
    work = median["work"]
    result.update(work)
    result.update(
        wall_s=round(median["wall_s"], 2),
        walls_s=[round(w, 2) for w in walls],
        sampled_wall_s=round(sampled["wall_s"], 2),
        patches_per_s=round(work["patches"] / median["wall_s"], 1),
        peak_mem_mib=round(mem.peak / 2**20, 1),
        peak_mem_by_kind_mib={k: round(v / 2**20, 1) for k, v in mem.at_peak.items()},
        kind_peak_mem_mib={k: round(v / 2**20, 1) for k, v in mem.kind_peak.items()},
        peak_rss_sum_mib=round(peak_rss / 2**20, 1),
        mem_at_start_mib=round(baseline / 2**20, 1),
        cpu_s=median["cpu_s"],
        phases=median["phases"],
        serial_s=round(median["wall_s"] - sum(p["wall_s"] for p in median["phases"]), 3),
    )
    print("RESULT " + json.dumps(result))
    return 0


def describe(run: dict) -> str:
    """One line per run: throughput, memory, start-up apart, and the passes."""
    start = f"warm-up {run['warmup_s']:.1f} s" + (f", ray.init {run['ray_init_s']:.1f} s" if "ray_init_s" in run else "")
    passes = ", ".join(f"{p['name']} {p['wall_s']:.2f} s" + (
        f" (in tasks {p['task_wall_s']:.2f} s, idle {p['idle_cpu_s']:.2f} CPU-s, first task after "
        f"{p['to_first_task_s']:.2f} s, returned {p['after_last_task_s']:.2f} s after the last)" if "task_wall_s" in p else "")
        for p in run["phases"])
    cpu = run["cpu_s"]
    return (f"{run['mode']:4s} {run['cpus']} CPU {run['scale']:2d}x ({run['pairs']:4d} pairs): {run['patches']} patches "
            f"in {run['wall_s']:.2f} s = {run['patches_per_s']:.0f} patches/s, peak memory {run['peak_mem_mib']:.0f} MiB"
            f" (summed peak RSS {run['peak_rss_sum_mib']:.0f} MiB; at the peak: "
            + ", ".join(f"{k} {v:.0f}" for k, v in run["peak_mem_by_kind_mib"].items()) + ")"
            f" | start-up not counted: {start}\n      passes: {passes}, driver-only {run['serial_s']:.2f} s"
            f" | CPU s: driver {cpu['driver']:.2f}, workers {cpu['workers']:.2f}, Ray daemons {cpu['ray_daemons']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "data" / "RoadScene")
    parser.add_argument("--pairs", type=int, default=None, help="use the first N pairs of the dataset (default: all)")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4], help="replication factors of the pairs")
    parser.add_argument("--num-cpus", type=int, nargs="+", default=[2], help="CPUs of the local Ray / pool size")
    parser.add_argument("--modes", nargs="+", default=["loop", "pool", "ray"], choices=["loop", "pool", "ray"])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="crop/stats sections used")
    parser.add_argument("--tasks-per-cpu", type=int, default=None,
                        help="override pipeline.common.ray_runtime.TASKS_PER_CPU (task granularity; every mode)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed runs per (mode, scale, CPUs) after the memory-sampled one; the median counts")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data.json")
    parser.add_argument("--merge", action="store_true",
                        help="keep the runs of --out for other (mode, scale, CPUs), e.g. 16x measured apart")
    parser.add_argument("--child", choices=["ray", "loop", "pool"], help=argparse.SUPPRESS)
    parser.add_argument("--registered", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    if not (args.dataset / "ir").is_dir():
        print(f"bench_data: dataset not found: {args.dataset} (needs ir/ and vi/)", file=sys.stderr)
        return 1

    from registered_fixtures import registered_from_dataset

    runs = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_reg_") as tmp:
        base = Path(tmp) / "registered"
        count = args.pairs or len(list((args.dataset / "ir").iterdir()))
        stems = registered_from_dataset(args.dataset, base, count)
        for scale in args.scales:
            reg = replicate(base, Path(tmp) / f"x{scale}", scale)
            import pyarrow.parquet as pq

            pairs = pq.read_metadata(reg / "manifest.parquet").num_rows  # accepted pairs x scale
            jobs = [("loop", 1)] if "loop" in args.modes else []
            for cpus in args.num_cpus:
                jobs += [(mode, cpus) for mode in ("pool", "ray") if mode in args.modes and (mode == "ray" or cpus >= 2)]
            for mode, cpus in jobs:
                cmd = [sys.executable, __file__, "--child", mode, "--registered", str(reg), "--count",
                       str(pairs), "--scale", str(scale), "--num-cpus", str(cpus), "--params", str(args.params),
                       "--repeat", str(args.repeat)]
                if args.tasks_per_cpu:
                    cmd += ["--tasks-per-cpu", str(args.tasks_per_cpu)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                    return 1
                run = json.loads(line[0][len("RESULT "):])
                run["load_1min_after"] = round(os.getloadavg()[0], 2)
                runs.append(run)
                print(describe(run), flush=True)
    if args.merge and args.out.exists():  # keep the other (mode, scale, CPUs) runs of an earlier invocation
        earlier = json.loads(args.out.read_text())
        if earlier.get("dataset") == str(args.dataset) and earlier.get("base_pairs") == len(stems):
            fresh = {(r["mode"], r["scale"], r["cpus"]) for r in runs}
            runs = [r for r in earlier["runs"] if (r["mode"], r["scale"], r["cpus"]) not in fresh] + runs
    by = {(r["mode"], r["scale"], r["cpus"]): r for r in runs}
    scales = sorted({r["scale"] for r in runs})
    all_cpus = sorted({r["cpus"] for r in runs if r["mode"] != "loop"})
    ratios = []
    print("\nratios (steady state; > 1: Ray faster):")
    for scale in scales:
        for cpus in all_cpus:
            ray_run = by.get(("ray", scale, cpus))
            if ray_run is None:
                continue
            entry = {"scale": scale, "cpus": cpus}
            line = f"  {scale:2d}x, {cpus} CPU:"
            for base_mode, base_cpus, label in (("loop", 1, "loop"), ("pool", cpus, f"Pool({cpus})")):
                other = by.get((base_mode, scale, base_cpus))
                if other is not None:
                    ratio = round(ray_run["patches_per_s"] / other["patches_per_s"], 2)
                    entry[f"ray_over_{base_mode}"] = ratio
                    line += f" Ray/{label} {ratio:.2f}x"
            ratios.append(entry)
            print(line)
    growth = []
    if len(scales) > 1:
        first = scales[0]
        print(f"peak memory growth vs {first}x (flat: about 1.0):")
        for (mode, scale, cpus), run in sorted(by.items()):
            ref = by.get((mode, first, cpus))
            if ref is not None and scale != first:
                g = round(run["peak_mem_mib"] / ref["peak_mem_mib"], 2)
                g_rss = round(run["peak_rss_sum_mib"] / ref["peak_rss_sum_mib"], 2)
                growth.append({"mode": mode, "cpus": cpus, "scale": scale, "vs_scale": first, "peak_mem_growth": g,
                               "peak_rss_sum_growth": g_rss})
                print(f"  {mode:4s} {cpus} CPU {scale:2d}x: PSS {run['peak_mem_mib']:.0f} MiB = {g:.2f}x, "
                      f"summed peak RSS {run['peak_rss_sum_mib']:.0f} MiB = {g_rss:.2f}x")
    from pipeline.common.machine import provenance

    machine = provenance(load_before)
    report = {
        "benchmark": "crop + stats: Ray Data vs single-process loop vs multiprocessing.Pool (same group functions)",
        "dataset": str(args.dataset),
        "base_pairs": len(stems),
        "runs": runs,
        "ratios": ratios,
        "memory_growth": growth,
        "machine": machine,
    }
    from pipeline.common.atomic_io import write_json

    write_json(args.out, report)
    print(f"load average before {load_before[0]:.1f}, after {machine['load_average_after'][0]:.1f} "
          "(other processes distort the figures when high)")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
