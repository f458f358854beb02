"""The one runner of the DVC stage scripts: arguments, parameters, logging, Ray, errors -> exit 1.

A stage script is its docstring, a ``run(args, params) -> str`` function and one call::

    if __name__ == "__main__":
        sys.exit(run_stage("crop", __doc__, run, Arg("--out", "patch folder"), ray=True))

``run_stage`` parses ``--params`` (default ``params.yaml``) and the stage's own arguments, loads
the parameters, then, before any work, checks that every output argument (``Arg(..., output=...)``)
can be created (``pipeline.common.preflight``) and, with ``mlflow=True``, that the MLflow tracking
store answers (``pipeline.common.mlflow_store.require_tracking_store``); then it opens a Ray session
from the ``ray`` section when ``ray=True``, calls ``run`` and prints the line it returns. A user or
environment error (``FileNotFoundError``, ``ValueError`` including ``ParamsError``, ``ImageError``
and ``OutputError``, any other ``OSError`` such as a full disk, ``MlflowUnavailable``, and
``RuntimeError`` for stages that declare it) is printed as one line ``<stage>: error: <message>``
and the script exits 1; Ctrl-C exits 130 with one line; anything else is a bug and keeps its
traceback. Run as a script (``argv=None``), the process ignores SIGINT once ``run_stage`` returns,
so a late Ctrl-C during interpreter teardown cannot turn a finished or cleanly interrupted stage
into a crash.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pipeline.common.config import load_params
from pipeline.common.mlflow_store import MlflowUnavailable, require_tracking_store
from pipeline.common.preflight import OutputKind, check_output
from pipeline.common.ray_runtime import ray_options, ray_session

log = logging.getLogger(__name__)

#: Errors a stage reports as one line (exit 1) instead of a traceback (``OSError`` covers a full
#: disk, a folder made read-only mid-run and ``MlflowUnavailable``).
USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError, OSError, MlflowUnavailable)
#: Exit status of a stage stopped by Ctrl-C / SIGINT (128 + 2, as shells report it).
INTERRUPTED = 130
#: Modules whose lock handling must not be interrupted by ``KeyboardInterrupt`` (``_Interrupts``).
_LOCK_MODULES = (f"logging{os.sep}__init__.py", "threading.py")
#: Seconds a script's cleanup after Ctrl-C may take before it exits anyway (``_Interrupts``).
INTERRUPT_GRACE_S = 20.0


@dataclass(frozen=True)
class Arg:
    """One command-line argument of a stage script (``required`` unless a default is given).

    ``output`` marks an output path (``"file"``, ``"dir"`` or ``"staged-dir"``): it is checked
    before the stage starts (``pipeline.common.preflight.check_output``).
    """

    flag: str
    help: str
    options: dict[str, Any] = field(default_factory=dict)
    output: OutputKind | None = None

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Add the argument to ``parser``."""
        options = dict(self.options)
        if "default" not in options and options.get("action") is None:
            options["required"] = True
        parser.add_argument(self.flag, help=self.help, **options)

    @property
    def dest(self) -> str:
        """The attribute of the parsed namespace (``--train-info`` -> ``train_info``)."""
        return self.options.get("dest") or self.flag.lstrip("-").replace("-", "_")


def one_line(exc: BaseException) -> str:
    """``exc`` as one line: its first line, or its type when it has no message."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def run_stage(
    name: str,
    doc: str | None,
    run: Callable[[argparse.Namespace, Mapping[str, Any]], str | None],
    *args: Arg,
    ray: bool = False,
    mlflow: bool = False,
    errors: Sequence[type[BaseException]] = USER_ERRORS,
    argv: Sequence[str] | None = None,
) -> int:
    """Run one DVC stage script; returns its exit code (0, 1 on a user error, 130 on Ctrl-C).

    Args:
        name: stage name, the prefix of every line printed.
        doc: the script's docstring (its first line is the ``--help`` description).
        run: ``run(args, params)`` does the work and returns the summary line to print.
        *args: the stage's arguments besides ``--params``.
        ray: run ``run`` inside a Ray session configured by the ``ray`` section.
        mlflow: the stage needs the MLflow tracking store: check it answers before any work.
        errors: exception types printed as one line.
        argv: arguments (``sys.argv[1:]`` when ``None``).
    """
    parser = argparse.ArgumentParser(prog=f"stages/{name}.py", description=(doc or name).strip().splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    for arg in args:
        arg.add_to(parser)
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    if argv is None:  # a script: Ctrl-C is bounded (see _Interrupts)
        outputs = [Path(getattr(ns, a.dest)) for a in args if a.output and getattr(ns, a.dest) is not None]
        handler = _Interrupts(name, outputs).handle
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)  # `timeout`, a killed `dvc repro`: the same clean stop
        _die_with_parent()
    try:
        code = _run_checked(name, run, args, ns, ray, mlflow, errors)
    finally:
        if argv is None:  # its work is over: a late Ctrl-C must not change its exit status
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if argv is None and code == INTERRUPTED:
        # interrupted work can leave threads of Ray/oneDNN mid-call, and the interpreter's teardown
        # then crashed (SIGSEGV) after the clean "interrupted" line: skip it, the outputs are intact
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _quiet_libraries() -> None:
    """A stage prints its own start, progress and summary lines: MLflow's INFO records (store
    set-up, input-example validation) and its artifact progress bars are left out unless
    ``MDA_VERBOSE`` is set."""
    from pipeline.common.log_filter import VERBOSE_ENV

    if os.environ.get(VERBOSE_ENV):
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _die_with_parent() -> None:
    """Linux: ask for SIGTERM when the parent process (``dvc repro``, a shell) dies, so that a stage
    whose caller was killed stops cleanly instead of running on as an orphan."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request
        os.kill(os.getpid(), signal.SIGTERM)


class _Interrupts:
    """SIGINT handler of a stage script: the first Ctrl-C raises ``KeyboardInterrupt`` (the stage
    removes its staging folder and exits 130); if that cleanup has not ended ``INTERRUPT_GRACE_S``
    seconds later (Ray Data 2.60 can deadlock when interrupted mid-iteration), or on a second
    Ctrl-C, the staging files this run made beside its outputs are removed and the process exits
    130 at once. The outputs themselves are never touched: they are replaced only at the very end.
    """

    def __init__(self, name: str, outputs: Sequence[Path]) -> None:
        self.name = name
        self.outputs = list(outputs)
        self.started = time.time()
        self.count = 0

    def handle(self, signum: int, frame: Any) -> None:
        """The signal handler (a Ctrl-C that lands inside a lock of ``logging`` or ``threading`` is
        re-delivered 50 ms later: raised there, it would leave the lock held and hang the cleanup)."""
        if frame is not None and frame.f_code.co_filename.endswith(_LOCK_MODULES):
            threading.Timer(0.05, os.kill, args=(os.getpid(), signum)).start()
            return
        self.count += 1
        if self.count > 1:
            self.exit_now("second interrupt")
        timer = threading.Timer(INTERRUPT_GRACE_S, self.exit_now, args=(f"cleanup took over {INTERRUPT_GRACE_S:g} s",))
        timer.daemon = True
        timer.start()
        raise KeyboardInterrupt

    def exit_now(self, why: str) -> None:
        """Remove this run's staging files and folders, then exit 130 without further cleanup."""
        for output in self.outputs:
            for pattern in (f".{output.name}.tmp-*", f".{output.name}.*.tmp"):
                for entry in output.parent.glob(pattern):
                    try:
                        if entry.stat().st_mtime >= self.started - 1:
                            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                    except OSError:
                        pass
        print(f"{self.name}: interrupted ({why}; staging removed, outputs intact)", file=sys.stderr, flush=True)
        os._exit(INTERRUPTED)


def _run_checked(name: str, run: Callable[[argparse.Namespace, Mapping[str, Any]], str | None],
                 args: Sequence[Arg], ns: argparse.Namespace, ray: bool, mlflow: bool,
                 errors: Sequence[type[BaseException]]) -> int:
    """``run_stage`` after parsing: checks, Ray session, the stage's work, errors -> exit code."""
    try:
        params = load_params(ns.params)
        for arg in args:
            value = getattr(ns, arg.dest)
            if arg.output is not None and value is not None:
                check_output(value, arg.output, arg.flag)
        if mlflow:
            require_tracking_store()
        log.info("%s: outputs checked, running", name)
        with ray_session(**ray_options(params)) if ray else nullcontext():
            message = run(ns, params)
    except tuple(errors) as exc:
        print(f"{name}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted (outputs are written atomically: the previous ones are intact)", file=sys.stderr)
        return INTERRUPTED
    except SystemExit as exc:  # SIGTERM while ray.init runs: Ray's own handler exits with the signal number
        if exc.code != signal.SIGTERM:
            raise
        print(f"{name}: interrupted (outputs are written atomically: the previous ones are intact)", file=sys.stderr)
        return INTERRUPTED
    if message:
        print(message)
    return 0
