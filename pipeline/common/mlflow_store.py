"""Where MLflow keeps runs and models: one rule shared by training, evaluation, promotion and CLI.

Default: a sqlite store ``mlflow.db`` in the repository root (git-ignored), artifacts under
``mlartifacts/`` beside it. ``MLFLOW_TRACKING_URI`` (for example ``http://host:5000`` for a
``mlflow server``) overrides it; ``MLFLOW_REGISTRY_URI`` likewise for the Model Registry.
Nothing is configured at import time: call ``configure_mlflow()``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

DEFAULT_DB = "mlflow.db"


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

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    if os.environ.get("MLFLOW_REGISTRY_URI"):
        mlflow.set_registry_uri(os.environ["MLFLOW_REGISTRY_URI"])
    if experiment:
        if mlflow.get_experiment_by_name(experiment) is None and uri.startswith("sqlite:"):
            base = Path(root) if root is not None else Path.cwd()
            mlflow.create_experiment(experiment, artifact_location=(base / "mlartifacts").resolve().as_uri())
        mlflow.set_experiment(experiment)
    return uri


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
