"""pipeline.train.runs: run names from params, data and training code; finished runs set aside."""

from __future__ import annotations

from train_fixtures import fake_ray_run, tiny_params

import pipeline.train.runs as R


def test_code_digest_changes_the_default_run_name(tmp_path, monkeypatch):
    params = tiny_params(tmp_path)
    name = R.default_run_name(params, "data1")
    assert name == R.default_run_name(params, "data1") and name != R.default_run_name(params, "data2")
    monkeypatch.setattr(R, "code_digest", lambda: "other-code")
    assert R.default_run_name(params, "data1") != name, "a code change must start a new run"


def test_code_digest_hashes_exactly_the_training_code(tmp_path, monkeypatch):
    """``TRAIN_CODE`` (what dvc.yaml's train stage depends on): folders whole, modules by name,
    absent entries skipped; a change outside it (the alignment maths) keeps the run name."""
    pkg = tmp_path / "pipeline"
    for rel in ("common/config.py", "model/network.py", "train/step.py", "train/__pycache__/step.cpython-311.pyc",
                "data/images.py", "data/align.py", "evaluate/metrics.py", "evaluate/stage.py", "__init__.py"):
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(rel)
    monkeypatch.setattr(R, "_PACKAGE", pkg)
    files = [f.relative_to(pkg).as_posix() for f in R.train_code_files(pkg)]
    assert files == ["common/config.py", "data/images.py", "evaluate/metrics.py", "model/network.py",
                     "train/step.py"]
    digest = R.code_digest()
    (pkg / "data" / "align.py").write_text("changed")
    (pkg / "train" / "__pycache__" / "step.cpython-311.pyc").write_text("changed")
    assert R.code_digest() == digest
    (pkg / "data" / "contracts.py").write_text("new")
    assert R.code_digest() != digest
    assert set(R.TRAIN_CODE) == {"common", "model", "train", "data/contracts.py", "data/images.py",
                                 "evaluate/metrics.py"}


def test_trained_epochs_and_set_aside(tmp_path):
    assert R.trained_epochs(tmp_path / "absent") == 0
    fake_ray_run(tmp_path / "mda-x", 3)
    assert R.trained_epochs(tmp_path / "mda-x") == 3
    moved = R._set_aside(tmp_path / "mda-x")
    assert not (moved.parent / "mda-x").exists() and moved.name.startswith("mda-x.stale-")
    assert R.trained_epochs(moved) == 3, "the set-aside run is kept whole"
