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
    # the files params.yaml names, from the repository (the params stage checks that they exist)
    params["loss"]["vgg_weights"] = str(REPO / params["loss"]["vgg_weights"])
    params["train"]["init_weights"] = str(REPO / params["train"]["init_weights"])
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

    # a misspelt section used to pass as "valid" (and `dvc repro` was "up to date")
    params["demo"]["num_pairs"] = 2
    params["trian"] = {"epochs": 5}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = _dvc(project, "repro", "demo")
    assert done.returncode != 0 and "unknown section(s) ['trian']" in done.stdout + done.stderr
    assert _files(project / "data" / "demo") == before
    del params["trian"]
    params["demo"]["num_pairs"] = 0
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    # without the guard, DVC deletes the outputs and then the stage rejects its params
    done = _dvc(project, "repro", "--single-item", "demo_unguarded")
    assert done.returncode != 0 and not (project / "data" / "demo2").exists()


def _params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def _raw(root: Path, ir: bool = True, vi: bool = True, images: bool = True, size: int = 32) -> str:
    import numpy as np

    from pipeline.data.images import write_image

    for sub, make in (("ir", ir), ("vi", vi)):
        if make:
            (root / sub).mkdir(parents=True, exist_ok=True)
            if images:
                write_image(root / sub / "p.png", np.zeros((size, size), np.uint8))
    return str(root)


#: (what, the change, text the one-line error must contain): each used to pass the params stage
#: and fail a later stage only after DVC had deleted its outputs (issue 22)
BAD = [
    ("misspelt section", lambda p, t: p.update(trian={"epochs": 5}), "unknown section(s) ['trian']"),
    ("raw_dir missing", lambda p, t: p["register"].update(raw_dir=str(t / "nope")), "'register.raw_dir'"),
    ("raw_dir without vi/", lambda p, t: p["register"].update(raw_dir=_raw(t / "r1", vi=False)), "has no vi/ folder"),
    ("raw_dir without images", lambda p, t: p["register"].update(raw_dir=_raw(t / "r2", images=False)), "holds no IR/visible pair"),
    ("raw_dir not a path", lambda p, t: p["register"].update(raw_dir=42), "'register.raw_dir' must be"),
    ("init_weights typo", lambda p, t: p["train"].update(init_weights="models/pretrained/mda_cpu.ptt"), "'train.init_weights'"),
    ("init_weights of another model", lambda p, t: p["model"]["args"].update(fusion="add"), "'train.init_weights'"),
    ("init_weights with another base", lambda p, t: p["model"]["args"].update(base="none"), "model.args.base 'max'"),
    ("vgg_weights missing", lambda p, t: p["loss"].update(vgg_weights="models/vgg16/none.pt"), "'loss.vgg_weights'"),
    ("test_list missing", lambda p, t: p["crop"].update(test_list="no/list.txt"), "'crop.test_list'"),
    ("promote.primary unknown", lambda p, t: p["promote"].update(primary="VIFF"), "'promote.primary' names metric 'VIFF'"),
    ("promote gate unknown", lambda p, t: p["promote"].update(gates={"QABF": 0.01}), "'promote.gates.QABF'"),
    ("lr 0", lambda p, t: p["train"].update(lr=0), "'train.lr'"),
    ("lr NaN", lambda p, t: p["train"].update(lr=float("nan")), "'train.lr' must be a finite number"),
    ("lr inf", lambda p, t: p["train"].update(lr=float("inf")), "'train.lr' must be a finite number"),
    ("lr 1e9", lambda p, t: p["train"].update(lr=1e9), "'train.lr' must be > 0 and <= 1"),
    ("1000 workers", lambda p, t: p["train"].update(num_workers=1000), "'train.num_workers' 1000"),
    ("patch larger than every image", lambda p, t: (p["register"].update(raw_dir=_raw(t / "r3")),
                                                     p["crop"].update(patch_size=100000)), "'crop.patch_size' 100000"),
    ("width not a multiple of reduction", lambda p, t: p["model"]["args"].update(width=7, reduction=8), "width"),
]


@pytest.mark.parametrize("what,change,message", BAD, ids=[b[0] for b in BAD])
def test_params_stage_refuses_what_would_fail_later(what, change, message, tmp_path, monkeypatch):
    from pipeline.common.config import ParamsError
    from pipeline.validate import check_params

    monkeypatch.chdir(REPO)  # the repository's relative paths (the shipped model, the demo folder)
    params = _params()
    change(params, tmp_path)
    with pytest.raises(ParamsError) as info:
        check_params(params)
    text = str(info.value)
    assert message in text and "\n" not in text, text


def test_params_stage_accepts_the_shipped_files(monkeypatch):
    from pipeline.validate import check_params

    monkeypatch.chdir(REPO)
    assert "train" in check_params(_params())
    recipe = yaml.safe_load((REPO / "recipes" / "cpu" / "params.yaml").read_text())
    monkeypatch.chdir(REPO / "recipes" / "cpu")
    if (REPO.parent / "shared" / "data" / "TNO").is_dir():
        assert "ship" in check_params(recipe)
