"""Where MLflow keeps runs and models: one rule shared by training, evaluation, promotion and CLI.

Default: a sqlite store ``mlflow.db`` in the repository root (git-ignored), artifacts under
``mlartifacts/`` beside it. ``MLFLOW_TRACKING_URI`` (for example ``http://host:5000`` for a
``mlflow server``) overrides it; ``MLFLOW_REGISTRY_URI`` likewise for the Model Registry.
Nothing is configured at import time: call ``configure_mlflow()``.

A tracking server that is down fails fast and in one line: ``configure_mlflow`` (and the entry
points, before any work, through ``require_tracking_store``) asks an ``http(s)`` server's
``/health`` once per process with a short timeout (``MDA_MLFLOW_CHECK_TIMEOUT``, default 5 s) and
raises ``MlflowUnavailable`` naming the URI. MLflow's own retry levers get fast defaults unless
set: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=2``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1``,
``MLFLOW_HTTP_REQUEST_TIMEOUT=60`` (MLflow's defaults, 7 retries with a factor of 2, retry an
unreachable server for minutes).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

DEFAULT_DB = "mlflow.db"
#: Seconds the reachability check waits for the server (environment ``MDA_MLFLOW_CHECK_TIMEOUT``).
CHECK_TIMEOUT_S = 5.0
#: MLflow HTTP retry settings applied unless the environment sets them (fail in seconds, not minutes).
FAST_FAIL_DEFAULTS: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
_REACHABLE: set[str] = set()


class MlflowUnavailable(ConnectionError):
    """The MLflow tracking server (or registry) could not be asked; the message names the URI."""


def tracking_uri(root: str | Path | None = None) -> str:
    """Return the tracking URI in force: ``MLFLOW_TRACKING_URI`` or ``sqlite:///<root>/mlflow.db``.

    Args:
        root: folder of the default sqlite store (current directory when ``None``).
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    base = Path(root) if root is not None else Path.cwd()
    return f"sqlite:///{(base / DEFAULT_DB).resolve()}"


def configure_mlflow(root: str | Path | None = None, experiment: str | None = None) -> str:
    """Point the ``mlflow`` client at the store in force and optionally select an experiment.

    A new experiment on the default sqlite store keeps its artifacts in ``<root>/mlartifacts``.

    Returns:
        The tracking URI used.
    """
    import mlflow

    uri = require_tracking_store(root)
    mlflow.set_tracking_uri(uri)
    if os.environ.get("MLFLOW_REGISTRY_URI"):
        mlflow.set_registry_uri(os.environ["MLFLOW_REGISTRY_URI"])
    if experiment:
        if mlflow.get_experiment_by_name(experiment) is None and uri.startswith("sqlite:"):
            base = Path(root) if root is not None else Path.cwd()
            mlflow.create_experiment(experiment, artifact_location=(base / "mlartifacts").resolve().as_uri())
        mlflow.set_experiment(experiment)
    return uri


def apply_fast_fail_defaults() -> None:
    """Set MLflow's HTTP retry variables to :data:`FAST_FAIL_DEFAULTS` where the user did not."""
    for key, value in FAST_FAIL_DEFAULTS.items():
        os.environ.setdefault(key, value)


def check_timeout() -> float:
    """The reachability timeout in seconds (``MDA_MLFLOW_CHECK_TIMEOUT``, default 5)."""
    raw = os.environ.get("MDA_MLFLOW_CHECK_TIMEOUT", "")
    try:
        value = float(raw) if raw else CHECK_TIMEOUT_S
    except ValueError:
        raise ValueError(f"MDA_MLFLOW_CHECK_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"MDA_MLFLOW_CHECK_TIMEOUT must be > 0, got {raw!r}")
    return value


def require_tracking_store(root: str | Path | None = None, read_only: bool = False) -> str:
    """Check once per process that the tracking store in force can be asked; return its URI.

    An ``http(s)`` server must answer ``GET /health`` within :func:`check_timeout` seconds; a
    sqlite store needs its folder to exist and, if its file exists, to be a SQLite database. With
    ``read_only`` (a command that only reads, e.g. ``mda fuse --model``) the database must exist
    and not be empty: such a command never creates one. Applies :func:`apply_fast_fail_defaults` first.

    Raises:
        MlflowUnavailable: the server cannot be reached, the store's folder is missing, or its
            database is corrupt (or, read-only, absent or empty): one line naming the store.
    """
    import urllib.error
    import urllib.request

    apply_fast_fail_defaults()
    uri = tracking_uri(root)
    if uri in _REACHABLE:
        return uri
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.parent.is_dir():
            raise MlflowUnavailable(f"MLflow store {uri}: folder {db.parent} does not exist")
        _check_sqlite(uri, db, read_only)
    elif uri.startswith(("http://", "https://")):
        timeout = check_timeout()
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as resp:
                status = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (OSError, ValueError) as exc:  # refused, DNS, timeout (URLError and socket errors are OSErrors)
            reason = getattr(exc, "reason", None) or exc
            raise MlflowUnavailable(
                f"MLflow tracking server {uri} is not reachable ({reason}; checked with a {timeout:g} s "
                "timeout): start it or set MLFLOW_TRACKING_URI"
            ) from None
        if status >= 500:
            raise MlflowUnavailable(f"MLflow tracking server {uri} answered /health with HTTP {status}")
    _REACHABLE.add(uri)
    return uri


def _check_sqlite(uri: str, db: Path, read_only: bool) -> None:
    """The sqlite file of the store is a database (opened read-only: nothing is created or changed)."""
    import sqlite3

    if read_only and (not db.is_file() or db.stat().st_size == 0):
        state = "does not exist" if not db.is_file() else "is empty"
        raise MlflowUnavailable(f"MLflow store {uri}: {db} {state}, so it holds no model (this command only "
                                "reads; set MLFLOW_TRACKING_URI to the store that has it)")
    if not db.is_file() or db.stat().st_size == 0:
        return  # a new store: MLflow creates its tables
    try:
        with sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True) as conn:
            conn.execute("select count(*) from sqlite_master").fetchone()
    except sqlite3.Error as exc:
        raise MlflowUnavailable(f"MLflow store {uri}: {db} is not a readable SQLite database ({exc}); move it "
                                "aside or set MLFLOW_TRACKING_URI") from None


def unavailable(uri: str, action: str, exc: BaseException) -> MlflowUnavailable:
    """A one-line ``MlflowUnavailable`` for an MLflow call that failed: ``<action>`` at ``<uri>``: first line of ``exc``."""
    first = (str(getattr(exc, "message", "") or exc).strip().splitlines() or [type(exc).__name__])[0]
    return MlflowUnavailable(f"MLflow at {uri}: could not {action}: {first[:300]}")


#: Most metrics MLflow accepts in one ``log_batch`` call.
MAX_METRICS_PER_BATCH = 1000


def log_metrics_batched(client: Any, run_id: str, metrics: Mapping[str, float], step: int = 0,
                        timestamp_ms: int | None = None, batch_size: int = MAX_METRICS_PER_BATCH) -> int:
    """Log ``metrics`` at one ``step`` to a run in as few ``log_batch`` calls as MLflow allows.

    Non-finite values (NaN, inf) are skipped: MLflow stores them badly and plots cannot use them.

    Args:
        client: ``mlflow.tracking.MlflowClient``.
        run_id: the run logged to.
        metrics: name -> value.
        step: the step of every value.
        timestamp_ms: Unix time in milliseconds of every value (default: now).
        batch_size: metrics per ``log_batch`` call (at most MLflow's limit of 1000).

    Returns:
        How many metrics were logged.
    """
    from mlflow.entities import Metric  # lazy, as mlflow above: this module is imported without MLflow's cost

    now = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
    batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if math.isfinite(float(v))]
    for i in range(0, len(batch), batch_size):
        client.log_batch(run_id, metrics=batch[i : i + batch_size])
    return len(batch)
