"""pipeline.train.worker pieces that run without a Ray Train worker group: world rank 0's
asynchronous MLflow tracker, and what a worker imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.train.worker import _Tracker

REPO_ROOT = Path(__file__).resolve().parents[2]


def _store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("t", artifact_location=str(tmp_path / "art"))).info.run_id
    return uri, client, run_id


def test_tracker_logs_in_order_on_its_thread_and_flush_waits(tmp_path):
    uri, client, run_id = _store(tmp_path)
    tracker = _Tracker(uri, run_id, enabled=True)
    tracker.tags({"train.world_size": 2, "loss.vgg_source": "none"})
    values = {"train/loss": 1.0}
    for step in (1, 5, 10):
        tracker.metrics(values, step)
        values["train/loss"] = values["train/loss"] / 2  # the caller's dict changes: the logged values do not
    tracker.image(np.full((8, 12), 200, np.uint8), "val_samples/epoch_001/a.png")
    tracker.flush()
    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (5, 0.5), (10, 0.25)]
    tags = client.get_run(run_id).data.tags
    assert tags["train.world_size"] == "2" and tags["loss.vgg_source"] == "none"
    assert [f.path for f in client.list_artifacts(run_id, "val_samples/epoch_001")] == ["val_samples/epoch_001/a.png"]


def test_tracker_raises_a_failed_call_at_flush(tmp_path):
    from mlflow.exceptions import MlflowException

    uri, _, _ = _store(tmp_path)
    tracker = _Tracker(uri, "0" * 32, enabled=True)  # no such run
    tracker.metrics({"train/loss": 1.0}, 1)
    with pytest.raises(MlflowException):
        tracker.flush()
    tracker.flush()  # the failure is reported once


def test_tracker_off_the_rank_0_worker_does_nothing(tmp_path):
    tracker = _Tracker(f"sqlite:///{tmp_path / 'x.db'}", "abc", enabled=False)
    tracker.metrics({"a": 1.0}, 1)
    tracker.tags({"b": 2})
    tracker.flush()
    assert not tracker.enabled and not (tmp_path / "x.db").exists()


def test_a_training_worker_does_not_import_mlflow_until_rank_0_logs():
    """MLflow is the largest import of a worker: only world rank 0's tracker thread imports it."""
    code = "import sys, pipeline.train.worker; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
