"""Simulated hostile file systems for the reliability tests: read-only and full folders.

As root with ``mount`` available (CI containers, these machines), a tiny ``tmpfs`` is mounted: a
read-only one, or a full one of a few hundred KiB. Elsewhere a read-only folder is a ``chmod 555``
folder (which does not stop root, so those tests skip) and a "full disk" is a process limit on the
file size (``RLIMIT_FSIZE``) applied to the child that writes (``full_disk_preexec``).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

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
