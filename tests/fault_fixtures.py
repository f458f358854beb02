"""Simulated hostile file systems for the reliability tests: read-only and full folders.

As root with ``mount`` available (CI containers, these machines), a tiny ``tmpfs`` is mounted: a
read-only one, or a full one of a few hundred KiB. Elsewhere a read-only folder is a ``chmod 555``
folder (which does not stop root, so those tests skip) and a "full disk" is a process limit on the
file size (``RLIMIT_FSIZE``) applied to the child that writes (``full_disk``).

Also the stage helpers of the fault suite (``tests/faults``): each stage's arguments, a killer of
busy Ray workers, and a runner that interrupts a stage process with SIGINT at a given moment.
"""

from __future__ import annotations

import importlib
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest


def _mount_tmpfs(path: Path, options: str) -> bool:
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextmanager
def read_only_dir(path: Path) -> Iterator[Path]:
    """An existing folder nobody may write in (a read-only tmpfs; ``chmod 555`` if not root)."""
    path.mkdir(parents=True, exist_ok=True)
    if _mount_tmpfs(path, "ro,size=64k"):
        try:
            yield path
        finally:
            _umount(path)
        return
    if os.geteuid() == 0:
        pytest.skip("root without mount: a read-only folder cannot be simulated")
    path.chmod(0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)


@contextmanager
def full_disk(path: Path, size_kib: int = 256) -> Iterator[Callable[[], None] | None]:
    """A folder on a file system of ``size_kib`` KiB (tmpfs), yielding ``None``; without mount
    rights it yields a ``preexec_fn`` that limits a child's file size to ``size_kib`` KiB."""
    path.mkdir(parents=True, exist_ok=True)
    if _mount_tmpfs(path, f"size={size_kib}k"):
        try:
            yield None
        finally:
            _umount(path)
        return

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (size_kib * 1024, size_kib * 1024))

    yield limit


REPO = Path(__file__).resolve().parents[1]


def stage_argv(name: str, ws: Path, out: Path | None = None) -> list[str]:
    """The stage's arguments as dvc.yaml passes them, inputs from ``ws``, outputs under ``out``."""
    out = out or ws
    return {
        "params": ["--out", str(out / "params_check.json")],
        "demo": ["--out", str(out / "demo")],
        "register": ["--raw", str(ws / "raw"), "--out", str(out / "registered"), "--no-progress"],
        "crop": ["--registered", str(ws / "registered"), "--out", str(out / "patches")],
        "stats": ["--patches", str(ws / "patches"), "--registered", str(ws / "registered"), "--out",
                  str(out / "stats"), "--metrics", str(out / "stats.json"), "--plot", str(out / "weights.csv")],
        "train": ["--patches", str(ws / "stats" / "patches"), "--images", str(ws / "stats" / "images.parquet"),
                  "--registered", str(ws / "registered"), "--split", str(ws / "patches" / "split.json"),
                  "--checkpoint", str(out / "models" / "best.pt"), "--summary", str(out / "models" / "train.json"),
                  "--metrics", str(out / "train_metrics.json"), "--loss-plot", str(out / "loss.csv"),
                  "--val-plot", str(out / "val.csv")],
        "evaluate": ["--train-info", str(ws / "train.json"), "--registered", str(ws / "registered"),
                     "--split", str(ws / "patches" / "split.json"), "--out", str(out / "eval"),
                     "--metrics", str(out / "eval_metrics")],
        "promote": ["--train-info", str(ws / "train.json"), "--eval-metrics", str(ws / "eval_means.json"),
                    "--out", str(out / "promotion.json")],
    }[name]


def stage_main(name: str):
    """``main`` of ``stages/<name>.py``."""
    return importlib.import_module(f"stages.{name}").main


def files(folder: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``folder`` (empty if it does not exist)."""
    if not folder.exists():
        return {}
    if folder.is_file():
        return {folder.name: folder.read_bytes()}
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Staging or temporary entries (``.<name>.tmp-*``, ``.<name>.*.tmp``) left in ``folder``, recursively."""
    return sorted(p.name for p in folder.rglob(".*") if ".tmp" in p.name or ".old-" in p.name)


#: Ray's own processes (``ray::<title>``) that are not task workers: never killed.
INFRASTRUCTURE = ("IDLE", "Agent", "Actor", "Coordinator", "Requester", "Controller", "Cleaner", "Monitor")


@dataclass
class Killer:
    """Kills one busy Ray worker (``ray::<task>``, not ``ray::IDLE``) of this process tree."""

    killed: str | None = None

    def watch(self, stop: threading.Event) -> None:
        me = psutil.Process()
        while not stop.is_set() and self.killed is None:
            for child in me.children(recursive=True):
                try:
                    title = (child.cmdline() or [""])[0]
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if title.startswith("ray::") and not any(word in title for word in INFRASTRUCTURE):
                    try:
                        child.kill()
                    except psutil.NoSuchProcess:
                        continue
                    self.killed = title
                    return
            time.sleep(0.02)


def run_killing_a_worker(fn, *args):
    """Run ``fn(*args)`` while a thread kills one busy Ray worker; returns ``(result, killed title)``."""
    killer, stop = Killer(), threading.Event()
    thread = threading.Thread(target=killer.watch, args=(stop,), daemon=True)
    thread.start()
    try:
        result = fn(*args)
    finally:
        stop.set()
        thread.join()
    return result, killer.killed


def interrupt_when(cmd: list[str], cwd: Path, marker: str, delay: float, timeout: float = 300.0,
                   preexec_fn=None, sig: int = signal.SIGINT) -> tuple[int, str, bool]:
    """Run ``cmd``; ``delay`` seconds after ``marker`` appears on its stderr send it ``sig``
    (SIGINT, as ``kill -INT``, by default). Returns ``(exit code, stderr, whether the signal was
    sent before it exited)``."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=preexec_fn)
    err: list[str] = []
    seen = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            err.append(line)
            if marker in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    sent = False
    end = time.monotonic() + timeout
    while not seen.wait(0.1) and proc.poll() is None and time.monotonic() < end:
        pass
    if seen.is_set():
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(sig)
            sent = True
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(5)
        proc.stdout.close()
    return proc.returncode, "".join(err), sent


def stage_cmd(name: str, ws: Path, out: Path) -> list[str]:
    """The command line of ``stages/<name>.py`` with ``stage_argv``."""
    return [sys.executable, str(REPO / "stages" / f"{name}.py"), "--params", str(ws / "params.yaml"),
            *stage_argv(name, ws, out)]
