"""The one runner of the DVC stage scripts: arguments, parameters, logging, Ray, errors -> exit 1.

A stage script is its docstring, a ``run(args, params) -> str`` function and one call::

    if __name__ == "__main__":
        sys.exit(run_stage("crop", __doc__, run, Arg("--out", "patch folder"), ray=True))

``run_stage`` parses ``--params`` (default ``params.yaml``) and the stage's own arguments, loads
the parameters, opens a Ray session from the ``ray`` section when ``ray=True``, calls ``run`` and
prints the line it returns. A user error (``FileNotFoundError``, ``ValueError`` including
``ParamsError`` and ``ImageError``, and ``RuntimeError`` for stages that declare it) is printed as
one line ``<stage>: error: <message>`` and the script exits 1; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from pipeline.common.config import load_params
from pipeline.common.ray_runtime import ray_options, ray_session

#: Errors a stage reports as one line (exit 1) instead of a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError)


@dataclass(frozen=True)
class Arg:
    """One command-line argument of a stage script (``required`` unless a default is given)."""

    flag: str
    help: str
    options: dict[str, Any] = field(default_factory=dict)

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Add the argument to ``parser``."""
        options = dict(self.options)
        if "default" not in options and options.get("action") is None:
            options["required"] = True
        parser.add_argument(self.flag, help=self.help, **options)


def run_stage(
    name: str,
    doc: str | None,
    run: Callable[[argparse.Namespace, Mapping[str, Any]], str | None],
    *args: Arg,
    ray: bool = False,
    errors: Sequence[type[BaseException]] = USER_ERRORS,
    argv: Sequence[str] | None = None,
) -> int:
    """Run one DVC stage script; returns its exit code (0, or 1 on a user error).

    Args:
        name: stage name, the prefix of every line printed.
        doc: the script's docstring (its first line is the ``--help`` description).
        run: ``run(args, params)`` does the work and returns the summary line to print.
        *args: the stage's arguments besides ``--params``.
        ray: run ``run`` inside a Ray session configured by the ``ray`` section.
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
        with ray_session(**ray_options(params)) if ray else nullcontext():
            message = run(ns, params)
    except tuple(errors) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 1
    if message:
        print(message)
    return 0
