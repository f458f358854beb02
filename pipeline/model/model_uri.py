"""Resolving MLflow model URIs (``models:/NAME@ALIAS``, ``models:/NAME/3``, ``runs:/ID/model``) to
the weights file they carry, for ``mda fuse --model`` and anything else that wants a checkpoint
(``models/train.json``, the train stage's pointer to its MLflow run and logged model, is read by
``pipeline.train.summary.read_train_info``).

The fusion models logged by the train stage (``pipeline.model.pyfunc``) are ``pyfunc`` models whose
weights travel as the artifact ``checkpoint`` (our checkpoint format). Resolution downloads the
model's files from the store in force (``pipeline.common.mlflow_store``: ``MLFLOW_TRACKING_URI`` or the
repository's ``mlflow.db``) into a temporary folder removed when the process exits, and returns the
path of that artifact.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from pipeline.common.mlflow_store import configure_mlflow

#: URI prefixes handled here (anything else is a file path).
MLFLOW_URI_PREFIXES: tuple[str, ...] = ("models:/", "runs:/", "mlflow-artifacts:/")
#: Name of the weights artifact in the pyfunc model.
CHECKPOINT_ARTIFACT = "checkpoint"

_DOWNLOADS: list[str] = []


def is_mlflow_uri(spec: str | Path) -> bool:
    """True for an MLflow model URI (as opposed to a local file path)."""
    return str(spec).startswith(MLFLOW_URI_PREFIXES)


def fetch_checkpoint(uri: str, dst: str | Path | None = None, root: str | Path | None = None) -> Path:
    """Download the weights of a registered/logged fusion model and return their local path.

    Args:
        uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/m-<id>`` or
            ``runs:/RUN_ID/model``.
        dst: download folder; default: a temporary folder deleted at process exit.
        root: folder of the default sqlite store (current directory when ``None``).

    Returns:
        The checkpoint file, readable by ``pipeline.model.weights.load_model``.

    Raises:
        FileNotFoundError: the default sqlite store does not exist (nothing was ever trained or
            registered here).
        ValueError: unknown model, version or alias, or a model that is not an MDA fusion model
            (no ``checkpoint`` artifact); the message names the URI and the store.
    """
    store = configure_mlflow(root)
    if store.startswith("sqlite:///"):
        db = Path(store[len("sqlite:///") :])
        if not db.is_file():
            raise FileNotFoundError(
                f"cannot resolve '{uri}': no MLflow store at {db} (run the pipeline first, or set MLFLOW_TRACKING_URI)"
            )
    if dst is None:
        dst = tempfile.mkdtemp(prefix="mda-model-")
        if not _DOWNLOADS:
            atexit.register(_cleanup)
        _DOWNLOADS.append(dst)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except MlflowException as exc:
        raise ValueError(f"cannot resolve '{uri}' in {store}: {exc.message}") from exc
    except OSError as exc:
        raise ValueError(f"cannot download '{uri}' from {store}: {exc}") from exc
    try:
        flavor = Model.load(str(local)).flavors.get("python_function", {})
    except (MlflowException, OSError) as exc:
        raise ValueError(f"'{uri}' is not an MLflow model (no readable MLmodel file): {exc}") from exc
    entry = (flavor.get("artifacts") or {}).get(CHECKPOINT_ARTIFACT)
    if not entry or not entry.get("path"):
        raise ValueError(
            f"'{uri}' has no '{CHECKPOINT_ARTIFACT}' artifact: not an MDA fusion model logged by the train stage"
        )
    path = local / entry["path"]
    if not path.is_file():
        raise ValueError(f"'{uri}': its '{CHECKPOINT_ARTIFACT}' artifact is missing from the downloaded model ({path})")
    return path


def _cleanup() -> None:
    while _DOWNLOADS:
        shutil.rmtree(_DOWNLOADS.pop(), ignore_errors=True)
