"""A bad value in params.yaml stops ``dvc repro`` before DVC deletes any stage's outputs (issue 13).

A real DVC project in a temporary folder runs the real ``params`` and ``demo`` stage scripts: the
guarded ``demo`` stage depends on the ``params`` stage's output, as every stage of dvc.yaml does;
``demo_unguarded`` does not, and shows the DVC behaviour the ``params`` stage exists for.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[2]


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    return subprocess.run([dvc, *args], cwd=project, capture_output=True, text=True, timeout=600)


def _project(root: Path) -> Path:
    project = root / "proj"
    project.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["demo"].update(num_pairs=2, height=32, width=40)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    demo = lambda out: f"{sys.executable} {REPO}/stages/demo.py --params params.yaml --out {out}"  # noqa: E731
    demo_params = ["demo.num_pairs", "demo.height", "demo.width", "demo.seed"]
    stages = {
        "params": {"cmd": f"{sys.executable} {REPO}/stages/params.py --params params.yaml --out data/params_check.json",
                   "deps": ["params.yaml"], "outs": ["data/params_check.json"]},
        "demo": {"cmd": demo("data/demo"), "deps": ["data/params_check.json"], "params": demo_params,
                 "outs": ["data/demo"]},
        "demo_unguarded": {"cmd": demo("data/demo2"), "params": demo_params, "outs": ["data/demo2"]},
    }
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    assert _dvc(project, "init", "--no-scm", "-q").returncode == 0
    return project


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_params_stop_dvc_before_outputs_are_deleted(tmp_path):
    project = _project(tmp_path)
    done = _dvc(project, "repro")
    assert done.returncode == 0, done.stdout + done.stderr
    before = _files(project / "data" / "demo")
    assert len(before) == 4

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["demo"]["num_pairs"] = 0
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = _dvc(project, "repro", "demo")
    assert done.returncode != 0
    assert "params: error: params: 'demo.num_pairs' must be >= 1, got 0" in done.stdout + done.stderr
    assert _files(project / "data" / "demo") == before, "the guarded stage's outputs must survive"

    # without the guard, DVC deletes the outputs and then the stage rejects its params
    done = _dvc(project, "repro", "--single-item", "demo_unguarded")
    assert done.returncode != 0 and not (project / "data" / "demo2").exists()
