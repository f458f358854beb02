"""A real ``mlflow server`` for tests that need one to go away (promotion, fault injection).

``MlflowServer`` starts ``mlflow server`` on a free loopback port with a sqlite store and proxied
artifacts, waits for ``/health`` and can be stopped at any moment (``stop``): the test then sees a
real refused connection, and can still read what the server had stored through ``sqlite_uri``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` in its own process group; ``url`` to use it, ``stop()`` to take it away."""

    def __init__(self, folder: Path, start_timeout: float = 120.0) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.db = self.folder / "server.db"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(self.folder / "mlflow_server.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", self.sqlite_uri,
             "--artifacts-destination", str(self.folder / "artifacts")],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        end = time.monotonic() + start_timeout
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                tail = (self.folder / "mlflow_server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"mlflow server did not come up: {tail}")
            time.sleep(0.5)

    @property
    def sqlite_uri(self) -> str:
        """The server's own store, readable directly once it is stopped."""
        return f"sqlite:///{self.db}"

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server and its workers (its own session) and wait until the port is closed."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:  # workers of the group may outlive the parent for a moment
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()
