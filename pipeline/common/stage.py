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
traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from pipeline.common.config import load_params
from pipeline.common.mlflow_store import MlflowUnavailable, require_tracking_store
from pipeline.common.preflight import OutputKind, check_output
from pipeline.common.ray_runtime import ray_options, ray_session

#: Errors a stage reports as one line (exit 1) instead of a traceback (``OSError`` covers a full
#: disk, a folder made read-only mid-run and ``MlflowUnavailable``).
USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError, OSError, MlflowUnavailable)
#: Exit status of a stage stopped by Ctrl-C / SIGINT (128 + 2, as shells report it).
INTERRUPTED = 130


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
    try:
        params = load_params(ns.params)
        for arg in args:
            value = getattr(ns, arg.dest)
            if arg.output is not None and value is not None:
                check_output(value, arg.output, arg.flag)
        if mlflow:
            require_tracking_store()
        with ray_session(**ray_options(params)) if ray else nullcontext():
            message = run(ns, params)
    except tuple(errors) as exc:
        print(f"{name}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted (outputs are written atomically: the previous ones are intact)", file=sys.stderr)
        return INTERRUPTED
    if message:
        print(message)
    return 0
