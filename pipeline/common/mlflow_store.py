"""Where MLflow keeps runs and models: one rule shared by training, evaluation, promotion and CLI.

Default: a sqlite store ``mlflow.db`` in the repository root (git-ignored), artifacts under
``mlartifacts/`` beside it. ``MLFLOW_TRACKING_URI`` (for example ``http://host:5000`` for a
``mlflow server``) overrides it; ``MLFLOW_REGISTRY_URI`` likewise for the Model Registry.
Nothing is configured at import time: call ``configure_mlflow()``.
"""

from __future__ import annotations

import os
from pathlib import Path

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
