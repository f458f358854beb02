"""Checks made before any work: can the outputs be created? (stages and the ``mda`` command).

A stage or command that scores every image and then finds that its CSV path lies under a regular
file, or that its folder is read-only, has wasted the work. ``check_output`` answers, in
milliseconds and without creating anything that stays, whether ``path`` can be written:

- a file output must not be an existing folder; a folder output must not be an existing file;
- no ancestor of the path may be a regular file (``out.csv/x.csv``);
- the folder the output will be written in (the nearest existing one) must accept a new file:
  a one-byte probe file is written and removed there, which also catches read-only mounts (even
  for root) and a full disk. A folder replaced whole (the stages' staged outputs) also needs its
  parent writable, where the staging folder is made.

The errors are ``OutputError`` (a ``ValueError``), one line naming the path, so the stage runner
and the CLI print them like every other user error.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Literal

#: What an output is: a file, a folder written into, or a folder replaced whole (staged).
OutputKind = Literal["file", "dir", "staged-dir"]
OUTPUT_KINDS: tuple[str, ...] = ("file", "dir", "staged-dir")


class OutputError(ValueError):
    """An output that cannot be created; the message names it and says why."""


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def _probe(folder: Path, output: Path, what: str) -> None:
    """Write and remove a one-byte file in ``folder``; raise ``OutputError`` if it cannot be written."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".mda-write-check-", dir=folder)
    except OSError as exc:
        raise OutputError(f"{what} {output}: cannot write in {folder}: {exc.strerror or exc}") from None
    try:
        os.write(fd, b"\0")
    except OSError as exc:
        raise OutputError(f"{what} {output}: cannot write in {folder}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
        os.unlink(probe)


def check_output(path: str | Path, kind: OutputKind = "file", what: str = "output") -> Path:
    """Check that ``path`` can be created as a ``kind`` output (see the module docstring).

    Args:
        path: the output file or folder (need not exist; its folders are made later).
        kind: ``"file"``, ``"dir"`` (files written into it) or ``"staged-dir"`` (replaced whole).
        what: how messages name the output (``"--out"``, ``"output"``).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OutputError: the path cannot be created or written (one line naming it).
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"output kind must be one of {OUTPUT_KINDS}, got {kind!r}")
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise OutputError(f"{what} {path}: is a folder, expected a file name")
    if kind != "file" and path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path}: is a file, expected a folder")
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise OutputError(f"{what} {path}: cannot be created, {existing} is a file, not a folder")
    folders = [existing]
    if kind != "file" and path.is_dir():
        folders = [path] if kind == "dir" else [path, existing]
    for folder in folders:
        _probe(folder, path, what)
    return path


def check_outputs(outputs: Iterable[tuple[str | Path, OutputKind, str]]) -> None:
    """``check_output`` for each ``(path, kind, what)``; the first that fails raises."""
    for path, kind, what in outputs:
        check_output(path, kind, what)
