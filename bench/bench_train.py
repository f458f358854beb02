"""Training throughput: a plain PyTorch loop vs Ray Train with 1 and 2 workers, same Parquet data,
with the step breakdown and the start-up timeline that explain the difference.

Measures steady-state patches/s (after warm-up steps, start-up excluded; from the median step time,
which a busy shared machine disturbs less than the mean, both are recorded; ``--repeats`` rounds
of every configuration, interleaved, the best round kept and every round recorded) for

- ``plain``: one process, batches sliced from the Parquet patch table and decoded with
  ``pipeline.train.data.decode_patches``, ``pipeline.train.step.train_step``; with 1 torch thread
  and with all cores as threads;
- ``plain_2processes``: two 1-thread plain loops at the same time in two processes, with no
  communication: the most 2 data-parallel workers of 1 thread could reach on this machine (shared
  cores, caches and memory bandwidth), against which ``ray2``'s efficiency is measured;
- ``ray1``: Ray Train, 1 worker of 1 thread; ``ray2``: 2 workers of 1 thread (DDP over gloo).
  Both run the ``train`` stage's own pieces: the trainer of ``pipeline.train.driver.build_trainer``
  (the same dataset, materialisation, ``DataConfig`` and CPU reservation), the worker's
  ``prepare_job`` (model, loss, optimiser, MLflow tracker on a temporary sqlite store) and
  ``train_epoch`` (Ray Data iteration with the local shuffle, ``PatchCollate``, ``train_step``,
  per-step MLflow logging); only validation and checkpoints (once per epoch) are left out.

For each: the per-phase breakdown of a step (``StepClock``: data wait, forward, loss, backward
(with DDP: its all-reduce), clip, optimiser, logging), wall and CPU seconds of the training
thread (wall - CPU = time the thread did not run); for the Ray runs also the CPU seconds per step
used by the other threads of the worker process (Ray Data prefetch) and by every other process
(raylet, Ray Train controller, data split coordinator, driver), sampled with psutil over the
measured steps; a gloo all-reduce of the gradient size timed alone; and the start-up timeline
(``fit()`` -> worker function entered -> its imports -> model/optimiser/MLflow ready -> first
batch in hand). Targets (issue 12): ``ray1`` within 5% of the 1-thread plain loop, ``ray2`` at
least 1.1x the 2-thread plain loop, start-up (``fit()`` -> first step) at most 15 s.
Prints the figures with their ratios (also ``ray2`` / ``plain_2processes`` and that ceiling / the
2-thread loop, which bounds what ``ray2`` can reach here), writes ``bench/results/train.json``.

Usage: ``python bench/bench_train.py [--patches data/stats/patches] [--steps 12] [--warmup 3]``
(without the patch table it generates a synthetic one of 64x64 patches in a temporary folder).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import os
import pstats
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]

TARGETS = {"ray1_vs_plain_1thread": 0.95, "ray2_vs_plain_2threads": 1.10, "startup_s_max": 15.0}


def synthetic_patches(folder: Path, n: int = 512, size: int = 64, seed: int = 0) -> Path:
    """Write a patch table with the stats stage's columns (smooth random textures)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    weights = ("w_int_ir", "w_int_vi", "w_det_ir", "w_det_vi")
    rows = {k: [] for k in ("pair_id", "split", "y", "x", "size", "ir", "vi", *weights, *("img_" + w for w in weights))}
    for i in range(n):
        f1, f2 = rng.uniform(2, 9, 2)
        vi = 120 + 80 * np.sin(xx / f1) * np.cos(yy / f2) + rng.normal(0, 8, (size, size))
        ir = 50 + 150 * np.exp(-((xx - rng.uniform(0, size)) ** 2 + (yy - rng.uniform(0, size)) ** 2) / 80)
        a, b = rng.uniform(0.2, 0.8, 2)
        for k, v in (("pair_id", f"s{i // 16:03d}"), ("split", "train"), ("y", (i % 16) * size), ("x", 0),
                     ("size", size), ("ir", np.clip(ir, 0, 255).astype(np.uint8).tobytes()),
                     ("vi", np.clip(vi, 0, 255).astype(np.uint8).tobytes()),
                     ("w_int_ir", a), ("w_int_vi", 1 - a), ("w_det_ir", b), ("w_det_vi", 1 - b)):
            rows[k].append(v)
            if k in weights:  # the image-level weights (train.sample_weights: image): here the same
                rows["img_" + k].append(v)
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table(rows).cast(pa.schema([
        ("pair_id", pa.string()), ("split", pa.string()), ("y", pa.int32()), ("x", pa.int32()), ("size", pa.int32()),
        ("ir", pa.binary()), ("vi", pa.binary()),
        *((w, pa.float64()) for w in weights), *(("img_" + w, pa.float64()) for w in weights)]))
    pq.write_table(table, folder / "part-0000.parquet")
    return folder


def bench_settings(params: dict, workers: int, batch_size: int, **overrides: Any):
    """The ``train:`` settings of params.yaml for a benchmark run: 1 epoch, ``workers`` workers of
    1 torch thread, every training patch (the step count is set by the config, not the data),
    random initial weights; ``overrides``: other ``TrainSettings`` fields (``use_gpu``)."""
    from pipeline.train.settings import TrainSettings

    s = TrainSettings.from_params(params)
    return dataclasses.replace(s, epochs=1, num_workers=workers, torch_threads=1, batch_size=batch_size,
                               max_train_patches=None, init_weights=None, run_name=None, **overrides)


def _rates(step_times: list[float], patches_per_step: int) -> dict:
    """Throughput from per-step wall times: the median step (robust to a busy shared machine) and the mean."""
    med, mean = float(np.median(step_times)), float(np.mean(step_times))
    return {"patches_per_s": patches_per_step / med, "patches_per_s_mean": patches_per_step / mean,
            "step_s_median": med, "step_s_mean": mean, "steps": len(step_times)}


def _step_walls(clock: Any, skip: int) -> list[float]:
    return [sum(w for w, _ in st.values()) for st in clock.steps[skip:]]


# ----------------------------------------------------------------------------------------------
# plain loop
def plain(cfg: dict, before_steps: Any = None) -> dict:
    """Single-process loop over batches decoded from the Parquet table (the same ``train_step``).

    ``before_steps``: called once set up, before the first step (``two_processes`` syncs there).
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import torch

    from pipeline.model.network import build_model
    from pipeline.train.data import decode_patches, patch_columns
    from pipeline.train.losses import FusionLoss
    from pipeline.train.step import (
        StepClock,
        build_optimizer,
        build_scheduler,
        prepare_for_training,
        train_step,
    )

    torch.set_num_threads(cfg["threads"])
    t_start = time.perf_counter()
    s = cfg["settings"]
    table = pq.read_table(cfg["patches"], columns=list(patch_columns(s.sample_weights)) + ["split"])
    table = table.filter(pc.equal(table["split"], "train")).select(list(patch_columns(s.sample_weights)))
    torch.manual_seed(s.seed)
    model = prepare_for_training(build_model(cfg["model_name"], **cfg["model_args"]), torch.device("cpu"))
    loss_fn = prepare_for_training(FusionLoss.from_params(cfg["loss"]), torch.device("cpu"))
    opt = build_optimizer(model, s)
    sched = build_scheduler(opt, s, cfg["warmup"] + cfg["steps"])
    b, total = s.batch_size, cfg["warmup"] + cfg["steps"]
    startup = time.perf_counter() - t_start
    if before_steps is not None:
        before_steps()
    clock = StepClock()
    for i in range(total):
        lo = (i * b) % max(1, table.num_rows - b)
        batch = decode_patches(table.slice(lo, b).to_pydict(), s.sample_weights)  # decoded per step, as on the workers
        batch = {k: torch.from_numpy(v) for k, v in batch.items()}
        clock.mark("data")
        train_step(model, batch, loss_fn, opt, sched, s.grad_clip, clock=clock)
        clock.end_step()
    return dict(_rates(_step_walls(clock, cfg["warmup"]), b), startup_s=startup, threads=cfg["threads"],
                breakdown=clock.summary(skip=cfg["warmup"]))


def _plain_in_process(cfg: dict, barrier: Any, results: Any) -> None:
    """One of ``two_processes``' processes: the 1-thread plain loop, its steps started with the other's."""
    results.put(plain(cfg, before_steps=barrier.wait))


def two_processes(cfg: dict) -> dict:
    """Two independent 1-thread plain loops at the same time, in two processes (no communication).

    What 2 data-parallel workers of 1 thread could reach on this machine at best: two processes
    sharing the cores, caches and memory bandwidth, with no all-reduce, no Ray and nothing else
    running. ``patches_per_s``: the sum of the two; ``ray2`` divided by it is Ray Train's
    efficiency, and it divided by the 2-thread plain loop bounds ``ray2``'s ratio to that loop.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, as Ray's workers
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_plain_in_process, args=(dict(cfg, threads=1), barrier, results)) for _ in range(2)]
    for proc in procs:
        proc.start()
    each = [results.get() for _ in procs]
    for proc in procs:
        proc.join()
    return {"patches_per_s": sum(r["patches_per_s"] for r in each),
            "patches_per_s_mean": sum(r["patches_per_s_mean"] for r in each),
            "each_patches_per_s": [r["patches_per_s"] for r in each],
            "step_s_median": max(r["step_s_median"] for r in each), "steps": each[0]["steps"],
            "startup_s": max(r["startup_s"] for r in each), "threads": 1, "processes": 2,
            "breakdown": each[0]["breakdown"]}


# ----------------------------------------------------------------------------------------------
# Ray Train: the stage's trainer and worker pieces, timed
def _thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds of each thread of this process: ``{tid: (thread name, seconds)}`` (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)  # utime + stime
    return out


def _thread_usage(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], steps: int) -> dict[str, float]:
    """CPU seconds per step of each thread name (threads of one name summed) between two ``_thread_cpu``."""
    out: dict[str, float] = {}
    for tid, (name, cpu) in after.items():
        used = cpu - before.get(tid, (name, 0.0))[1]
        if used > 0:
            out[name] = out.get(name, 0.0) + used / steps
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _bench_loop(config: dict) -> None:
    """The worker function: ``prepare_job`` + one ``train_epoch`` of the ``train`` stage, timed.

    Imports are inside so that their cost is measured (the stage's worker function pays it when
    its module is unpickled)."""
    t_enter = time.time()
    import ray.train
    import torch
    import torch.distributed as dist

    from pipeline.train.settings import TrainSettings
    from pipeline.train.step import StepClock
    from pipeline.train.worker import epoch_batches, prepare_job, train_epoch

    t_imported = time.time()
    s = TrainSettings(**config["settings"])
    shard = ray.train.get_dataset_shard("train")  # in the order of train_loop_per_worker
    t_shard = time.time()
    with cProfile.Profile() as prof:  # where prepare_job's time goes (the largest part of our start-up)
        job = prepare_job(config, s)
    t_job = time.time()
    stats = pstats.Stats(prof)
    top = sorted(((v[3], f"{Path(k[0]).name}:{k[1]}({k[2]})") for k, v in stats.stats.items()), reverse=True)
    prepare_profile = {name: round(cum, 3) for cum, name in top[:25] if cum > 0.05}
    job.clock = StepClock()
    cpu_proc, cpu_thread, wall = time.process_time(), time.thread_time(), time.perf_counter()
    threads_before = _thread_cpu()
    job.started = time.perf_counter()
    train_epoch(job, epoch_batches(job, shard), 1)
    threads = _thread_usage(threads_before, _thread_cpu(), len(job.clock.steps))
    cpu_proc, cpu_thread = time.process_time() - cpu_proc, time.thread_time() - cpu_thread
    wall = time.perf_counter() - wall
    warmup, n = config["bench"]["warmup"], len(job.clock.steps)
    walls = _step_walls(job.clock, 0)
    window = (job.clock.first_mark_at + sum(walls[:warmup]), job.clock.first_mark_at + sum(walls))
    allreduce_s = None
    n_params = sum(p.numel() for p in job.net.parameters() if p.requires_grad)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flat = torch.zeros(n_params, device=job.device)  # the gradient volume DDP all-reduces every step (its buckets, together)
        dist.all_reduce(flat)
        times = []
        for _ in range(10):
            t = time.perf_counter()
            dist.all_reduce(flat)
            times.append(time.perf_counter() - t)
        allreduce_s = float(np.median(times))
    out = dict(_rates(walls[warmup:], s.batch_size * job.world), breakdown=job.clock.summary(skip=warmup),
               rank=job.rank, world=job.world, n_params=n_params, allreduce_s=allreduce_s,
               other_threads_cpu_s_per_step=max(0.0, cpu_proc - cpu_thread) / n, epoch_wall_s=wall,
               cpu_s_per_step_by_thread=threads,
               prepare_job_profile_cum_s=prepare_profile,
               timeline={"entered": t_enter, "imported": t_imported, "shard": t_shard, "job_ready": t_job,
                         "first_step": job.clock.first_mark_at}, window=window,
               torch_threads=torch.get_num_threads(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"))
    Path(config["bench"]["result_dir"], f"rank{job.rank}.json").write_text(json.dumps(out))
    ray.train.report({"done": 1})


class _CpuSampler:
    """CPU seconds of this process and of every Ray process on the machine (raylet, GCS, actors,
    workers), sampled every ``period`` s with psutil, so that the CPU each used during a time
    window can be read afterwards. Only those processes are read (a few ms per sample)."""

    def __init__(self, period: float = 0.5) -> None:
        self.period, self.samples = period, []
        self.started: dict[str, float] = {}  # "name [pid]" -> process creation time (time.time())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        watched: dict[int, Any] = {}
        ignored: set[int] = set()
        while not self._stop.is_set():
            for pid in set(psutil.pids()) - watched.keys() - ignored:
                try:
                    proc = psutil.Process(pid)
                    cmd = " ".join(proc.cmdline())
                except psutil.Error:
                    continue
                if "ray" in cmd or pid == os.getpid():
                    watched[pid] = proc
                else:
                    ignored.add(pid)
            snap = {}
            for pid, proc in list(watched.items()):
                try:
                    with proc.oneshot():
                        cmd, times = proc.cmdline(), proc.cpu_times()  # actors retitle themselves "ray::<Class>"
                except psutil.Error:
                    watched.pop(pid)
                    continue
                name = cmd[0] if cmd and cmd[0].startswith("ray::") else " ".join(Path(a).name[:24] for a in cmd[:3])
                snap[pid] = (name, times.user + times.system)
                self.started.setdefault(f"{name} [{pid}]", proc.create_time())
            self.samples.append((time.time(), snap))
            self._stop.wait(self.period)

    def usage(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds per process name between the samples nearest ``start`` and ``end``."""
        t = np.array([s[0] for s in self.samples])
        if len(t) < 2:
            return {}
        a, b = self.samples[int(np.abs(t - start).argmin())], self.samples[int(np.abs(t - end).argmin())]
        out: dict[str, float] = {}
        for pid, (name, cpu) in b[1].items():
            used = cpu - (a[1][pid][1] if pid in a[1] else 0.0)  # a process started in the window: all of it
            if used > 0.005:
                out[f"{name} [{pid}]"] = out.get(f"{name} [{pid}]", 0.0) + used
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def ray_train(cfg: dict, params: dict, workers: int, **overrides: Any) -> dict:
    """One Ray Train run of ``_bench_loop`` through ``build_trainer``; figures of rank 0 plus the
    start-up timeline and the CPU used by each process over the measured steps. ``overrides``:
    ``TrainSettings`` fields (``use_gpu=True``: ``bench/gpu_check.sh``)."""
    import ray
    from mlflow.tracking import MlflowClient
    from ray.train import RunConfig

    from pipeline.train.driver import build_trainer
    from pipeline.train.losses import loss_section
    from pipeline.train.settings import cpus_per_worker

    total = cfg["warmup"] + cfg["steps"]
    s = bench_settings(params, workers, cfg["batch_size"], **overrides)
    holder = tempfile.TemporaryDirectory(prefix=f"bench_train{workers}_")  # Ray storage, MLflow store: removed after
    tmp = Path(holder.name)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("bench")).info.run_id
    config = {"settings": dataclasses.asdict(s), "model_name": cfg["model_name"], "model_args": cfg["model_args"],
              "loss": loss_section(params), "val": None, "steps_per_epoch": total, "total_steps": total, "train_pairs": None, "init_weights": None,
              "mlflow_uri": uri, "mlflow_run_id": run_id, "driver_host": socket.gethostname(),
              "bench": {"warmup": cfg["warmup"], "result_dir": str(tmp)}}
    t_data = time.time()
    resources = ray.cluster_resources()
    trainer = build_trainer(_bench_loop, config, s, cfg["patches"], RunConfig(name=f"bench{workers}", storage_path=str(tmp)),
                            resources)
    t_fit = time.time()
    with _CpuSampler() as sampler:
        result = trainer.fit()
    fit_s = time.time() - t_fit
    if result.error:
        raise result.error
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(workers)]
    holder.cleanup()
    m = ranks[0]
    tl = m.pop("timeline")
    m["startup_s"] = tl["first_step"] - t_fit
    m["startup_timeline_s"] = {"dataset_materialize": t_fit - t_data,
                               "fit_to_worker_function": tl["entered"] - t_fit,
                               "worker_imports": tl["imported"] - tl["entered"],
                               "get_dataset_shard": tl["shard"] - tl["imported"],
                               "prepare_job (model, DDP, optimiser, MLflow)": tl["job_ready"] - tl["shard"],
                               "first_batch": tl["first_step"] - tl["job_ready"]}
    window = m.pop("window")
    usage = sampler.usage(*window)
    n_steps = max(1, cfg["steps"])
    m["cpu_s_per_step_by_process"] = {k: v / n_steps for k, v in usage.items()}
    m["other_ranks_step_s_median"] = [r["step_s_median"] for r in ranks[1:]]
    m["ray_processes_started_after_fit_s"] = {  # a process started by fit() paid its Python and imports
        k: round(t - t_fit, 2) for k, t in sampler.started.items()
        if k.startswith(("ray::TrainController", "ray::RayTrainWorker", "ray::SplitCoordinator")) and t > t_fit - 1}
    return dict(m, fit_s=fit_s, workers=workers, cpus_per_worker=cpus_per_worker(s, resources.get("CPU", 1)), threads_per_worker=1,
                shuffle_buffer=s.shuffle_buffer, log_every_steps=s.log_every_steps, materialize=s.materialize)


# ----------------------------------------------------------------------------------------------
def _print_breakdown(res: dict[str, dict]) -> None:
    names = [k for k in res if "breakdown" in res[k]]
    phases = list(dict.fromkeys(p for k in names for p in res[k]["breakdown"]))
    print("\nstep breakdown, median ms per step: wall / CPU of the training thread")
    print(f"  {'phase':10s}" + "".join(f"{k:>22s}" for k in names))
    for p in phases:
        cells = []
        for k in names:
            v = res[k]["breakdown"].get(p)
            cells.append(f"{v['wall_s'] * 1e3:9.1f} /{v['cpu_s'] * 1e3:8.1f}  " if v else f"{'-':>22s}")
        print(f"  {p:10s}" + "".join(f"{c:>22s}" for c in cells))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", default=str(REPO / "data" / "stats" / "patches"))
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--steps", type=int, default=12, help="measured steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="patches per worker per step")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of every configuration (best kept)")
    parser.add_argument("--only", choices=("plain", "ray"), default=None, help="run only one side")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "train.json"))
    args = parser.parse_args()

    import ray

    from pipeline.common.config import load_params, section
    from pipeline.common.atomic_io import write_json
    from pipeline.common.machine import provenance
    from pipeline.model.network import model_config
    from pipeline.train.losses import loss_section

    params = load_params(args.params)
    patches = Path(args.patches)
    source = str(patches)
    if not list(patches.glob("*.parquet")):
        synthetic = tempfile.TemporaryDirectory(prefix="bench_patches_")  # removed at exit
        patches = synthetic_patches(Path(synthetic.name))
        source = "synthetic 64x64 (no data/stats/patches: run `dvc repro stats` for the real table)"
    name, margs = model_config(section(params, "model"))
    cores = os.cpu_count() or 1
    cfg = {"patches": str(patches), "model_name": name, "model_args": margs, "loss": loss_section(params),
           "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "threads": cores,
           "settings": bench_settings(params, 1, args.batch_size)}
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {}
    for rnd in range(args.repeats):  # rounds interleave the configurations: a drifting machine hits each alike
        if args.only != "ray":
            # the same thread count for the 1-worker figure: one thread per process is also what a
            # shared 2-core machine disturbs least
            for threads in (1, cores):
                r = plain(dict(cfg, threads=threads))
                runs.setdefault(f"plain_{threads}thread" + ("s" if threads > 1 else ""), []).append(r)
                print(f"[{rnd + 1}/{args.repeats}] plain loop, {threads} thread(s): {r['patches_per_s']:7.2f} patches/s",
                      flush=True)
            if cores >= 2:
                r = two_processes(cfg)
                runs.setdefault("plain_2processes", []).append(r)
                print(f"[{rnd + 1}/{args.repeats}] 2 plain loops at once, 1 thread each: {r['patches_per_s']:7.2f} "
                      f"patches/s ({' + '.join(f'{x:.2f}' for x in r['each_patches_per_s'])})", flush=True)
        if args.only != "plain":
            ray.init(num_cpus=cores, include_dashboard=False, logging_level="WARNING")
            try:
                for w in (1, 2):
                    r = ray_train(cfg, params, w)
                    runs.setdefault(f"ray{w}", []).append(r)
                    print(f"[{rnd + 1}/{args.repeats}] Ray Train x{w} (1 thread each): {r['patches_per_s']:7.2f} patches/s, "
                          f"start-up {r['startup_s']:.1f} s", flush=True)
            finally:
                ray.shutdown()
    # each configuration's best round (the least disturbed), with every round's figures
    res = {k: dict(max(v, key=lambda r: r["patches_per_s"]), patches_per_s_rounds=[r["patches_per_s"] for r in v],
                   startup_s_rounds=[r.get("startup_s") for r in v]) for k, v in runs.items()}
    _print_breakdown(res)
    ratios: dict[str, float] = {}
    verdicts: dict[str, bool] = {}
    if args.only is None:
        base1, base2 = res["plain_1thread"]["patches_per_s"], res[f"plain_{cores}threads"]["patches_per_s"]
        ratios = {"ray1_vs_plain_1thread": res["ray1"]["patches_per_s"] / base1,
                  "ray2_vs_plain_1thread": res["ray2"]["patches_per_s"] / base1,
                  f"ray2_vs_plain_{cores}threads": res["ray2"]["patches_per_s"] / base2}
        print(f"\nbest of {args.repeats} rounds: plain 1 thread {base1:.2f}, plain {cores} threads {base2:.2f}, "
              f"Ray x1 {res['ray1']['patches_per_s']:.2f}, Ray x2 {res['ray2']['patches_per_s']:.2f} patches/s")
        if "plain_2processes" in res:  # the best 2 workers of 1 thread could do here (no all-reduce, no Ray)
            ceiling = res["plain_2processes"]["patches_per_s"]
            ratios["two_processes_vs_plain_2threads"] = ceiling / base2
            ratios["ray2_vs_two_processes"] = res["ray2"]["patches_per_s"] / ceiling
            print(f"2 plain loops at once (1 thread each) {ceiling:.2f} patches/s: the ceiling of 2 workers here, "
                  f"{ceiling / base2:.3f}x the {cores}-thread loop; Ray x2 reaches {res['ray2']['patches_per_s'] / ceiling:.3f} of it")
        verdicts = {
            "ray1 within 5% of plain 1 thread": ratios["ray1_vs_plain_1thread"] >= TARGETS["ray1_vs_plain_1thread"],
            f"ray2 >= 1.1x plain {cores} threads": ratios[f"ray2_vs_plain_{cores}threads"] >= TARGETS["ray2_vs_plain_2threads"],
            "start-up <= 15 s (1 and 2 workers, every round)":
                max(res["ray1"]["startup_s_rounds"] + res["ray2"]["startup_s_rounds"]) <= TARGETS["startup_s_max"],
        }
        for k, v in ratios.items():
            print(f"ratio {k}: {v:.3f}")
    for k in ("ray1", "ray2"):
        if k in res:
            r = res[k]
            print(f"\n{k}: start-up {r['startup_s']:.1f} s = " + ", ".join(f"{p} {v:.1f}" for p, v in r["startup_timeline_s"].items()))
            print(f"{k}: prepare_job profile (cumulative s): " +
                  ", ".join(f"{p} {v:.2f}" for p, v in list(r["prepare_job_profile_cum_s"].items())[:10]))
            print(f"{k}: Ray processes started (s after fit()): " +
                  ", ".join(f"{p} {v:.1f}" for p, v in r["ray_processes_started_after_fit_s"].items()))
            print(f"{k}: CPU s per step outside the training thread: worker's other threads "
                  f"{r['other_threads_cpu_s_per_step']:.3f} (per thread, training thread first: " +
                  ", ".join(f"{p} {v:.3f}" for p, v in list(r["cpu_s_per_step_by_thread"].items())[:6]) +
                  "); by process: " + ", ".join(f"{p} {v:.3f}" for p, v in list(r["cpu_s_per_step_by_process"].items())[:7]))
            if r.get("allreduce_s") is not None:
                print(f"{k}: gloo all-reduce of {r['n_params']} fp32 gradients alone: {r['allreduce_s'] * 1e3:.1f} ms")
    for k, ok in verdicts.items():
        print(f"target {k}: {'met' if ok else 'NOT met'}")
    report = {
        "results": res, "ratios_to_plain": ratios, "targets": TARGETS, "verdicts": verdicts,
        "data": source, "model": {"name": name, "args": margs}, "batch_size_per_worker": args.batch_size,
        "steps": args.steps, "warmup": args.warmup, "rounds": args.repeats,
        "machine": provenance(load_before, ray_cpus=cores, device="cpu"),
    }
    out = write_json(args.out, report)
    print(f"wrote {out} (load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
