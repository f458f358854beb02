"""The ``mda`` console command.

Each sub-command lives in its own module ``pipeline.cli.<name>`` exposing
``add_parser(subparsers) -> argparse.ArgumentParser`` which registers the command and sets
``func`` (a plain function taking the parsed ``argparse.Namespace`` and returning an exit code).
Heavy libraries (torch, ray, mlflow) are imported inside those functions, so ``mda --help`` is fast.

A command declares its output paths with ``parser.set_defaults(outputs={"out": "dir"})`` (attribute
-> ``pipeline.common.preflight`` kind): ``main`` checks they can be created before ``func`` runs.
Every error is one line ``mda <command>: error: <message>`` (exit 1; Ctrl-C: exit 130); ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from pipeline import __version__

#: Sub-command modules, in the order ``mda --help`` lists them.
COMMANDS: tuple[str, ...] = ("demo", "register", "fuse", "evaluate", "recipe", "ablations")


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available sub-command."""
    parser = argparse.ArgumentParser(
        prog="mda",
        description="Infrared and visible image fusion with the MDA network.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (default: one line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"pipeline.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"pipeline.cli.{name}":
                continue  # command not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mda``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        from pipeline.common.preflight import check_output

        for attr, kind in getattr(args, "outputs", {}).items():
            check_output(getattr(args, attr), kind, f"--{attr.replace('_', '-')}")
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"mda {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for users; --debug shows the traceback
        if args.debug:
            raise
        lines = str(exc).strip().splitlines()
        message = lines[0] if lines else type(exc).__name__
        if not isinstance(exc, (OSError, ValueError, MemoryError)):
            message = f"{type(exc).__name__}: {message} (run with --debug for the traceback)"
        print(f"mda {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
