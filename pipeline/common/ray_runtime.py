"""Starting a local Ray or joining an existing cluster, the same way for every stage.

Resolution order for the cluster address: the explicit ``address`` argument (``ray.address`` in
``params.yaml``), then the ``RAY_ADDRESS`` environment variable, else a local Ray started for the
duration of the ``with`` block and shut down afterwards. When Ray is already initialised in this
process (tests, notebooks), that instance is reused and left running.

Also the one way the data stages run their work on Ray Data: ``task_count`` and ``task_groups``
split the work items (shards) into a few groups per CPU, ``map_groups`` runs one task per group as
a single Ray Data execution (``run_serially`` does the same work without Ray).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import ray
import ray.data
from ray.data import DataContext
from ray.exceptions import RayTaskError

from pipeline.common.config import param
from pipeline.common.log_filter import quiet_ray_auth_notice, quiet_ray_data
from pipeline.common.machine import release_free_memory, use_system_allocator

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: ``runner(name, fn, groups, fn_kwargs) -> [fn(group, **fn_kwargs) for group in groups]``: how a
#: stage's task groups run (``map_groups`` on Ray Data, ``run_serially`` in this process).
Runner = Callable[[str, Callable[..., Any], Sequence[Any], Mapping[str, Any]], list]

#: Ray Data tasks per CPU of the cluster for a stage's work items (see ``task_groups``), below
#: ``MAX_ITEMS_PER_TASK`` items per task. Measured on 2 cores (crop + stats, 221 RoadScene pairs,
#: quiet machine, 5 runs each, interleaved): 1 per CPU 2.37-2.49 s, 2 per CPU 2.44-2.62 s; earlier
#: 4 per CPU 2.78 s, 8 per CPU 2.86 s. Every task costs Ray Data CPU and a dispatch round trip
#: during which its CPU idles, and round-robin groups are even enough not to need finer balancing;
#: a large input still gets more tasks per CPU through ``MAX_ITEMS_PER_TASK``.
TASKS_PER_CPU = 1
#: At most this many work items (shards) per task, so a huge input still makes many tasks.
MAX_ITEMS_PER_TASK = 64


def resolve_address(address: str | None = None) -> str | None:
    """Return the cluster address to join, or ``None`` for an embedded local Ray."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    return address


#: Seconds to wait for a Ray cluster's address to accept a connection (``MDA_RAY_CONNECT_TIMEOUT``).
CONNECT_TIMEOUT_S = 5.0


def probe_address(address: str) -> None:
    """Fail fast when a ``HOST:PORT`` (or ``ray://HOST:PORT``) cluster address accepts no TCP
    connection: ``ray.init`` would otherwise retry for minutes. ``auto`` is left to Ray (it fails
    at once when no local cluster runs).

    Raises:
        ConnectionError: one line naming the address and the way out.
    """
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    if address == "auto" or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    if not port.isdigit():
        raise ConnectionError(f"Ray cluster address {address!r}: expected HOST:PORT")
    timeout = float(os.environ.get("MDA_RAY_CONNECT_TIMEOUT", CONNECT_TIMEOUT_S))
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConnectionError(f"Ray cluster at {address} is not reachable ({reason}; checked with a {timeout:g} s "
                              "timeout): start it, or unset RAY_ADDRESS / ray.address to use a local Ray") from None


@contextmanager
def ray_session(
    address: str | None = None, num_cpus: int | None = None, quiet: bool = True
) -> Iterator[dict[str, Any]]:
    """Run the body with Ray initialised.

    Args:
        address: existing cluster (``"auto"``, ``"127.0.0.1:6379"``, ``"ray://..."``); ``None``
            falls back to ``RAY_ADDRESS``, then to a new local instance.
        num_cpus: CPUs for a local instance (``None``: all of this machine's cores). Ignored when
            joining a cluster.
        quiet: keep the driver log short (no dashboard, warnings only).

    Yields:
        ``ray.cluster_resources()`` of the instance in use.
    """

    _plain_task_errors()
    if ray.is_initialized():
        with _original_task_errors():
            yield ray.cluster_resources()
        return
    target = resolve_address(address)
    quiet_ray_auth_notice()
    kwargs: dict[str, Any] = {"include_dashboard": False}
    if quiet:
        kwargs["logging_level"] = logging.WARNING
        kwargs["log_to_driver"] = True
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if target:
        log.info("joining Ray cluster at %s", target)
        probe_address(target)
        ray.init(address=target, **kwargs)
    else:
        cpus = num_cpus or os.cpu_count() or 1
        log.info("starting a local Ray with %d CPUs", cpus)
        ray.init(num_cpus=cpus, **kwargs)
    if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)  # ray.init installs its own (exit 15, no cleanup)
    try:
        with _original_task_errors():
            yield ray.cluster_resources()
    finally:
        with _sigint_deferred():
            ray.shutdown()


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold back Ctrl-C for the duration of the body, then act on it (the previous SIGINT handler).

    For ``ray.shutdown()``: a ``KeyboardInterrupt`` raised halfway through it left Ray's core worker
    destroyed but still reachable, and the next touch of it ended the process with status 1 ("The
    core worker process is not initialized yet or already shutdown") instead of the stage's 130
    (seen when Ctrl-C reached the train stage just as its training ended). Only the main thread can
    set signal handlers; elsewhere the body runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received and callable(previous):
        previous(signal.SIGINT, None)


def _plain_task_errors() -> None:
    """Make Ray Data re-raise a task's own exception (e.g. ``ImageError`` naming the file).

    By default Ray Data wraps exceptions of map functions in ``UserCodeException`` with a long
    traceback; the stages and the CLI turn ``ValueError``/``FileNotFoundError`` into one-line
    messages, which needs the original type.
    """

    DataContext.get_current().raise_original_map_exception = True


@contextmanager
def _original_task_errors() -> Iterator[None]:
    """Re-raise the user-facing error of a failed Ray task as itself.

    A task's exception reaches the driver as ``RayTaskError(<its type>)`` whose message is the whole
    remote traceback (already in Ray's log); ``ValueError``/``OSError`` (``ImageError``,
    ``ParamsError``, ``FileNotFoundError``...) are re-raised plain, so the stages and the CLI print
    one line naming the file.
    """

    try:
        yield
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, (ValueError, OSError)):
            raise cause from None
        raise


def configure_data_context() -> None:
    """Configure Ray Data the same way for every stage (the one place for these settings).

    - keep the input order (deterministic rows, shard names and results);
    - no per-operator resource reservation: by default Ray Data reserves part of the cluster's
      CPUs for operators other than the running one, which in the stages' short
      ``from_items -> map`` pipelines leaves the map with half the cores (measured on 2 cores: 28
      tasks of 0.2 s CPU took 6.1 s through Ray Data with reservation, 3.1 s without, 2.9 s as
      plain Ray tasks);
    - no Ray progress bars, execution banners or notices about them (the stages print their own
      progress; ``log_filter.quiet_ray_data``);
    - a failing map re-raises the task's own exception (see ``_plain_task_errors``).
    """

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.op_resource_reservation_enabled = False
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.raise_original_map_exception = True
    quiet_ray_data()


def ray_options(params: Mapping[str, Any]) -> dict[str, Any]:
    """Read the shared ``ray`` section of ``params.yaml`` into ``ray_session`` keyword arguments."""

    cfg = params.get("ray") or {}
    return {
        "address": param(cfg, "address", str, where="ray", default=None),
        "num_cpus": param(cfg, "num_cpus", int, where="ray", default=None, minimum=1),
    }


def task_count(num_items: int, cpus: float | None = None) -> int:
    """How many Ray Data tasks to spread ``num_items`` work items (shards) over.

    ``TASKS_PER_CPU`` tasks per CPU of the cluster (``cpus``, else ``ray.cluster_resources()``,
    else this machine's cores): enough for every CPU plus some balancing at the tail, few enough
    that Ray Data's fixed cost per task (measured on 2 cores: about 11 ms of CPU between driver,
    worker and raylet, against under 1 ms for a plain Ray task, plus a dispatch round trip) stays
    small. At most ``MAX_ITEMS_PER_TASK`` items per task, a multiple of the CPUs (equal groups end
    together), never more tasks than items.
    """
    if num_items <= 0:
        return 0
    if cpus is None:
        cpus = ray.cluster_resources().get("CPU", 1.0) if ray.is_initialized() else float(os.cpu_count() or 1)
    cpus = max(1, int(round(cpus)))
    # a multiple of the CPUs, so the last round of tasks keeps every CPU busy (7 tasks on 2 CPUs
    # left one CPU idle for a whole task: 16x RoadScene, 442 shards, before this rounding)
    per_cpu = max(TASKS_PER_CPU, math.ceil(num_items / (MAX_ITEMS_PER_TASK * cpus)))
    return min(num_items, per_cpu * cpus)


def task_groups(items: Sequence[_T], num_tasks: int) -> list[list[_T]]:
    """Deal ``items`` round-robin into ``num_tasks`` groups (item ``i`` -> group ``i % num_tasks``).

    Interleaving spreads any trend in item cost (image sizes sorted by name, a last short shard)
    over every group, so the groups take about the same time. Empty groups are dropped.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    groups = [list(items[k::num_tasks]) for k in range(num_tasks)]
    return [g for g in groups if g]


def call_group(fn: Callable[..., Any], group: Any, fn_kwargs: Mapping[str, Any] | None = None) -> Any:
    """``fn(group, **fn_kwargs)`` as every runner calls it: pyarrow on the system allocator, and the
    freed heap handed back after the group, so a process's memory does not grow with the number of
    groups it has run (``pipeline.common.machine.use_system_allocator``)."""
    use_system_allocator()
    try:
        return fn(group, **dict(fn_kwargs or {}))
    finally:
        release_free_memory()


def _run_group(row: Mapping[str, Any], fn: Callable[..., Any], fn_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Ray Data ``map`` function of ``map_groups``: one group in, one pickled result out (+ timings)."""
    start, c0 = time.time(), time.thread_time()
    result = call_group(fn, pickle.loads(row["group"]), fn_kwargs)
    return {"index": row["index"], "result": pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL),
            "start": start, "end": time.time(), "cpu_s": time.thread_time() - c0}


def map_groups(
    name: str,
    fn: Callable[..., Any],
    groups: Sequence[Any],
    fn_kwargs: Mapping[str, Any] | None = None,
    on_result: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """Run ``fn(group, **fn_kwargs)`` for every group as one Ray Data execution; results in group order.

    ``on_result(index, result)`` is called in this process as each group's result reaches it,
    e.g. to advance a progress bar.

    One task per group (``from_items`` with one block per group, then ``map``), so the work is
    split exactly as planned by ``task_groups``. A group and its result travel pickled: they are
    small descriptors and summaries (the data itself is read and written by the tasks), so the
    driver materialises nothing large. Call it inside ``ray_session`` after
    ``configure_data_context``.

    Logs, at DEBUG, ``"<name>: N tasks in W s ..."`` with ``extra={"ray_data_execution": {...}}``:
    ``name``, ``tasks``, ``wall_s`` (the execution), ``task_wall_s``/``task_cpu_s`` (summed inside
    the tasks), ``to_first_task_s`` (from the call to the start of the first task),
    ``after_last_task_s`` (from the end of the last task to the return) and ``driver_cpu_s`` (this
    process, every thread) -- what ``bench/bench_data.py`` reports as the breakdown of Ray Data's
    overhead.
    """
    if not groups:
        return []
    t0, c0, epoch0 = time.perf_counter(), time.process_time(), time.time()
    items = [{"index": k, "group": pickle.dumps(g, protocol=pickle.HIGHEST_PROTOCOL)} for k, g in enumerate(groups)]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map(
        _run_group, fn_kwargs={"fn": fn, "fn_kwargs": dict(fn_kwargs or {})}
    )
    rows, results = [], {}
    for row in ds.iter_rows():
        index = int(row["index"])
        results[index] = pickle.loads(row.pop("result"))  # the row keeps its timings only
        rows.append(row)
        if on_result is not None:
            on_result(index, results[index])
    if len(rows) != len(groups) or sorted(results) != list(range(len(groups))):  # one row per task; anything else is a Ray Data contract change
        raise RuntimeError(f"{name}: {len(groups)} tasks returned {len(rows)} results")
    info = {"name": name, "tasks": len(groups), "wall_s": time.perf_counter() - t0,
            "task_wall_s": float(sum(r["end"] - r["start"] for r in rows)),
            "task_cpu_s": float(sum(r["cpu_s"] for r in rows)),
            "to_first_task_s": float(min(r["start"] for r in rows) - epoch0),
            "after_last_task_s": float(time.time() - max(r["end"] for r in rows)),
            "driver_cpu_s": time.process_time() - c0}
    log.debug("%s: %d tasks in %.2f s (task time %.2f s, driver CPU %.2f s)", name, info["tasks"], info["wall_s"],
              info["task_wall_s"], info["driver_cpu_s"], extra={"ray_data_execution": info})
    return [results[k] for k in range(len(groups))]


def run_serially(name: str, fn: Callable[..., Any], groups: Sequence[Any], fn_kwargs: Mapping[str, Any] | None = None) -> list[Any]:
    """The ``Runner`` without Ray: ``fn(group, **fn_kwargs)`` for each group in this process, in order.

    The same work as ``map_groups`` (same functions, same groups), for benchmarks and tests.
    """
    return [call_group(fn, g, fn_kwargs) for g in groups]
