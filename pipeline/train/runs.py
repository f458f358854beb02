"""Training-run identity and reuse: the stage's paths, the default run name (hash of params, data
and code), the MLflow run of a Ray Train run, finished runs reused or set aside, ``models/train.json``.

A Ray Train run lives in ``<storage_path>/<run name>`` and has one MLflow run (tagged ``RUN_TAG``).
With ``train.run_name: null`` the name is derived from a hash of the model/loss/train parameters,
the training data and the training code (``TRAIN_CODE``), so an identical re-launch resumes and
any change starts a fresh run. A run that already trained ``train.epochs`` epochs is never
"resumed" for zero epochs and re-exported: its recorded outputs are reused, or (outputs gone) a
default-named run folder is set aside and trained afresh while an explicit name is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from pipeline.common.atomic_io import copy_atomic, write_json
from pipeline.common.config import flatten
from pipeline.common.mlflow_store import configure_mlflow, unavailable
from pipeline.train.settings import MODEL_FILE, TrainSettings, check_run_name

log = logging.getLogger(__name__)

RUN_TAG = "mda.train_run"  # MLflow tag holding the Ray Train run name (one MLflow run per name)
CONFIG_TAG = "mda.train_config"  # MLflow tag: default_run_name() of the params/data/code it last trained with
SUMMARY_ARTIFACT = "train_outputs.json"  # MLflow artifact: the summary and metrics a finished run wrote
#: The code the ``train`` stage depends on (relative to ``pipeline/``; ``dvc.yaml``'s train deps
#: list the same): folders whole, single modules by name.
TRAIN_CODE = ("common", "model", "train", "data/contracts.py", "data/images.py", "evaluate/metrics.py")
_PACKAGE = Path(__file__).resolve().parents[1]  # pipeline/


@dataclass
class TrainPaths:
    """Inputs and outputs of the ``train`` stage (``dvc.yaml`` passes them to ``stages/train.py``)."""

    patches_dir: Path
    registered_dir: Path
    split_json: Path
    images_parquet: Path
    best_checkpoint: Path = Path("models/best.pt")
    summary_json: Path = Path("models/train.json")
    metrics_json: Path = Path("metrics/train.json")
    loss_csv: Path = Path("plots/train_loss.csv")
    val_csv: Path = Path("plots/train_val.csv")
    root: Path = field(default_factory=Path.cwd)


def data_digest(patches_dir: str | Path) -> str:
    """SHA-256 (hex, first 12) of the training Parquet files' names and bytes."""
    h = hashlib.sha256()
    for f in sorted(Path(patches_dir).glob("*.parquet")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def train_code_files(package: Path | None = None) -> list[Path]:
    """The files of ``TRAIN_CODE`` that exist, sorted by their path under ``package`` (``pipeline/``).

    Folders count whole, as DVC hashes a folder dependency (``__pycache__`` left out, as in
    ``.dvcignore``).
    """
    package = package or _PACKAGE
    files: set[Path] = set()
    for entry in TRAIN_CODE:
        path = package / entry
        if path.is_dir():
            files.update(f for f in path.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
        elif path.is_file():
            files.add(path)
    return sorted(files, key=lambda f: f.relative_to(package).as_posix())


def code_digest() -> str:
    """SHA-256 (hex, first 12) of the training code (``TRAIN_CODE``: names and bytes).

    Part of the default run name, so that a change to the code the ``train`` stage depends on
    starts a new training run instead of resuming (and, if finished, re-using) one trained by
    other code; a change elsewhere (alignment, evaluation stage) does not.
    """
    h = hashlib.sha256()
    for f in train_code_files(_PACKAGE):
        h.update(f.relative_to(_PACKAGE).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def default_run_name(params: Mapping[str, Any], digest: str) -> str:
    """``mda-<hash>`` of the model/loss/train sections (run placement keys excluded), the data
    digest and the code digest (``code_digest``)."""
    relevant = {k: v for k, v in flatten({s: params.get(s) or {} for s in ("model", "loss", "train")}).items()
                if k not in ("train.run_name", "train.storage_path", "train.experiment")}
    blob = json.dumps(relevant, sort_keys=True, default=str) + digest + code_digest()
    return "mda-" + hashlib.sha256(blob.encode()).hexdigest()[:10]


def _find_mlflow_run(settings: TrainSettings, run_name: str, root: Path) -> tuple[str, Any, str | None, str | None]:
    """The latest MLflow run tagged with ``run_name``.

    Returns:
        ``(uri, experiment_id, run_id, status)``; ``run_id``/``status`` are ``None`` when absent.
    """
    uri = configure_mlflow(root, settings.experiment)
    exp = mlflow.get_experiment_by_name(settings.experiment)
    check_run_name(run_name)  # safe inside the filter string
    found = MlflowClient(tracking_uri=uri).search_runs(
        [exp.experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_name}'",
        max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        return uri, exp.experiment_id, found[0].info.run_id, found[0].info.status
    return uri, exp.experiment_id, None, None


def _new_mlflow_run(params: Mapping[str, Any], uri: str, experiment_id: str, run_name: str) -> str:
    """Create the MLflow run of a Ray Train run (tagged ``RUN_TAG``), log every parameter. Returns its id."""
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_TAG: run_name})
    flat = {k: ("null" if v is None else v) for k, v in flatten(params).items()}
    with mlflow.start_run(run_id=run.info.run_id):
        mlflow.log_params(flat)
    return run.info.run_id


def trained_epochs(run_dir: str | Path) -> int:
    """Highest epoch among the checkpoints that Ray Train registered in a run folder (0: none).

    Read from Ray Train V2's ``checkpoint_manager_snapshot.json`` (the metrics reported with each
    checkpoint carry ``epoch``); a missing or unreadable snapshot counts as no checkpoint.
    """
    try:
        snap = json.loads((Path(run_dir) / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return 0
    results = list(snap.get("checkpoint_results") or []) + [snap.get("latest_checkpoint_result") or {}]
    epochs = [(r.get("metrics") or {}).get("epoch") for r in results if isinstance(r, dict)]
    return max([int(e) for e in epochs if isinstance(e, (int, float))], default=0)


def resumable_epochs(run_dir: Path, settings: TrainSettings, explicit: bool) -> int:
    """Epochs that a fit in ``run_dir`` resumes from (0: a fresh Ray Train run).

    A run folder that already trained ``train.epochs`` epochs (whose MLflow outputs could not be
    reused) is never resumed for zero epochs: a default-named one is set aside, an explicit
    ``train.run_name`` is an error.

    Raises:
        ValueError: ``explicit`` and the run already finished.
    """
    done = trained_epochs(run_dir)
    if done < settings.epochs:
        return done
    if explicit:
        raise ValueError(
            f"train.run_name {run_dir.name!r}: the Ray Train run in {run_dir} already trained {done} epoch(s) "
            f"(train.epochs={settings.epochs}) and has no reusable MLflow outputs; raise train.epochs to "
            "continue it or choose a new train.run_name")
    moved = _set_aside(run_dir)
    log.warning("training run %s already finished %d epoch(s) but its MLflow run and outputs are gone: "
                "moved it to %s and training afresh", run_dir.name, done, moved)
    return 0


def _set_aside(run_dir: Path) -> Path:
    """Rename a Ray Train run folder to ``<name>.stale-<time>`` (kept, out of the way). Returns the new path."""
    dest = run_dir.with_name(f"{run_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while dest.exists():
        dest, n = dest.with_name(f"{run_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
    shutil.move(str(run_dir), str(dest))
    return dest


#: The training figures ``dvc metrics show`` lists (all of them: ``models/train.json`` "metrics").
TRAIN_HEADLINE = ("steps", "fit_time_s", "val_ssim", "val_qabf")


def headline_train_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The few training figures of the DVC metrics file ``metrics/train.json``."""
    return {k: metrics[k] for k in TRAIN_HEADLINE if k in metrics}


def _recorded_outputs(run_id: str) -> dict[str, Any] | None:
    """The ``SUMMARY_ARTIFACT`` of a run, or ``None`` when it is absent or not a JSON object.

    Raises:
        MlflowUnavailable: the store could not be asked: an outage must not become a silent retrain.
    """
    try:
        recorded = mlflow.artifacts.load_dict(f"runs:/{run_id}/{SUMMARY_ARTIFACT}")
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise unavailable(mlflow.get_tracking_uri(), f"read {SUMMARY_ARTIFACT} of MLflow run {run_id}", exc) from exc
    except FileNotFoundError:
        return None
    except ValueError:  # not JSON (json.JSONDecodeError): unreadable record, train instead
        return None
    except OSError as exc:  # connection errors of the artifact store
        raise unavailable(mlflow.get_tracking_uri(), f"read {SUMMARY_ARTIFACT} of MLflow run {run_id}", exc) from exc
    return recorded if isinstance(recorded, dict) else None


def _reuse_finished_run(client: Any, run_id: str, name: str, settings: TrainSettings,
                        paths: TrainPaths, config_id: str) -> dict[str, Any] | None:
    """Outputs of a run that already finished with the same name (same params, data and code for
    the default name), instead of resuming it with nothing to train and logging its model twice.

    Copies the best checkpoint and writes the metrics and summary JSON files; the caller writes
    the plots and ends the MLflow run.

    Returns ``None`` (train: Ray Train resumes from the latest checkpoint) when the run trained
    fewer than ``train.epochs`` epochs (an explicit ``train.run_name`` whose epochs were raised)
    or its recorded outputs are gone.

    Raises:
        ValueError: an explicit ``train.run_name`` that finished with other parameters, data or
            code (``config_id``, see ``default_run_name``): re-exporting it would pass old weights
            off as trained with the current ones.
    """
    recorded = _recorded_outputs(run_id)
    if recorded is None:
        return None
    summary, metrics = recorded.get("summary") or {}, recorded.get("metrics") or {}
    checkpoint = Path(str(summary.get("ray_checkpoint", ""))) / MODEL_FILE
    if int(summary.get("epochs", 0)) < settings.epochs or not checkpoint.is_file():
        return None
    trained_with = client.get_run(run_id).data.tags.get(CONFIG_TAG)
    if trained_with is not None and trained_with != config_id:
        raise ValueError(
            f"train.run_name {name!r} already finished {summary.get('epochs')} epoch(s) (train.epochs="
            f"{settings.epochs}) with other parameters, data or code (MLflow run {run_id}); raise train.epochs "
            "to continue it or choose a new train.run_name")
    log.info("training run %s already finished (%s epochs, train.epochs=%d), reusing its best checkpoint and "
             "MLflow model %s: nothing trained, no model logged (raise train.epochs to continue it, or choose "
             "another train.run_name to train again)", name, summary.get("epochs"), settings.epochs,
             summary.get("model_uri"))
    copy_atomic(checkpoint, Path(paths.best_checkpoint))
    summary["checkpoint"] = str(paths.best_checkpoint)
    summary["metrics"] = metrics
    write_json(paths.metrics_json, headline_train_metrics(metrics))
    write_json(paths.summary_json, summary)
    return summary


def _best_checkpoint(result: Any, settings: TrainSettings) -> tuple[Any, dict[str, Any]]:
    """The best kept checkpoint by ``train.checkpoint_metric`` (latest if none carries it)."""
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if settings.checkpoint_metric in (m or {})]
    if not scored:
        if result.checkpoint is None:
            raise RuntimeError("training finished without any checkpoint")
        return result.checkpoint, dict(result.metrics or {})
    sign = -1.0 if settings.checkpoint_mode == "min" else 1.0
    return max(scored, key=lambda cm: (sign * float(cm[1][settings.checkpoint_metric]), cm[1].get("epoch", 0)))
