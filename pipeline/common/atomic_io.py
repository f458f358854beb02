"""Atomic file and folder output (a stage that fails never leaves a half-written result behind),
and the one reader of the JSON files stages write.

Every writer goes through a temporary file (or folder) next to the target, then ``os.replace``,
so readers see either the old complete output or the new complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


@contextmanager
def atomic_writer(path: str | Path, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path``.

    Parent folders are created. On an exception the temporary file is removed and ``path`` is
    left as it was. The new file gets mode 0644 (``mkstemp`` would leave 0600).

    Args:
        path: final file.
        mode: ``"wb"`` or ``"w"`` (text; ``newline=""`` etc. go in ``open_kwargs``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_writer(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_writer(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (trailing newline) atomically; returns ``path``."""
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def copy_atomic(src: str | Path, dst: str | Path) -> Path:
    """Copy ``src`` to ``dst`` atomically; returns ``dst``."""
    with atomic_writer(dst, "wb") as fh, open(src, "rb") as inp:
        shutil.copyfileobj(inp, fh)
    return Path(dst)


def staging_dir(final: str | Path) -> Path:
    """A new empty temporary folder next to ``final`` (same file system, for ``replace_dir``)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)
    return tmp


#: Name of an :func:`atomic_writer` temporary file: ``.<name>.<8 random characters>.tmp``.
_WRITER_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def drop_stray_temps(folder: str | Path) -> list[Path]:
    """Remove, recursively, the :func:`atomic_writer` temporary files left in ``folder`` by writers
    that were killed before they could clean up (SIGKILL, a lost Ray worker); returns them.

    Call it only once every writer into ``folder`` has finished: a live writer's file looks the same.
    """
    stray = [p for p in Path(folder).rglob(".*.tmp") if p.is_file() and _WRITER_TEMP.match(p.name)]
    for path in stray:
        path.unlink(missing_ok=True)
    return stray


def replace_dir(tmp: str | Path, final: str | Path) -> None:
    """Move a finished temporary folder (or file) to ``final``, replacing what was there only at the end.

    A folder is published without the temporary files of writers killed inside it
    (:func:`drop_stray_temps`): its writers are done by now, so those are abandoned, and a retried
    task has written the file itself.
    """
    final = Path(final)
    if Path(tmp).is_dir():
        drop_stray_temps(tmp)
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / "d")
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_json_object(path: str | Path, what: str, hint: str | None = None, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a JSON object written by a stage (the one JSON reader, so every one fails alike).

    Args:
        path: the file.
        what: what the file is, for the messages (``"split file"``).
        hint: how to make it, added to the not-found message (``"run the crop stage"``).
        required: keys that must be present and non-empty.

    Raises:
        FileNotFoundError: the file is missing (the message names it and the hint).
        ValueError: not JSON, not an object, or a required key missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}" + (f" ({hint})" if hint else ""))
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    for key in required:
        if data.get(key) in (None, "", [], {}):
            raise ValueError(f"{path}: missing '{key}'")
    return data
