"""The recipe pipeline end to end at tiny sizes on real pairs: ``dvc repro`` in a temporary git copy,
through the same stage scripts as the demo (gather, register, crop, stats, Ray Train with
whole-image crops, evaluate with the baselines, promote into the MLflow registry, ship). It runs
the GPU recipe's folder on CPU (``train.use_gpu: false``): its dvc.yaml is the CPU recipe's
(checked below), so this is the smoke test of both. Skipped without ``../shared``."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from test_dvc_pipeline import GIT, _copy_repo, _override, _run

SHARED = REPO.parent / "shared"

#: small enough for CI: TNO only (17 pairs outside TNO-25 for train/val), 3 test pairs scored
TINY_RECIPE: dict[str, object] = {
    "ray.num_cpus": 2,
    "train.use_gpu": False,
    "train.num_workers": 2,
    "train.torch_threads": 1,
    "train.max_seconds": 600,
    "gather.root": str(SHARED / "data"),
    "gather.datasets": ["TNO"],
    "crop.test_list": str(SHARED / "data" / "TNO" / "subset_CDDFuse_test25.txt"),
    "evaluate.official_weights": str(SHARED / "models" / "mda_official" / "fusion_model.pth"),
    "evaluate.max_pairs": 3,
    "evaluate.grid_pairs": 1,
    "train.steps": 6,
    "train.epochs": 2,
    "train.crop_size": 32,
    "train.batch_size": 2,
    "train.lr": 1.0e-5,
    "train.warmup_steps": 0,
    "train.val_max_pairs": 2,
    "evaluate.batch_size": 2,
    "train.log_every_steps": 1,
    "train.init_weights": "../../models/pretrained/mda_cpu.pt",  # a good start: the gate then passes
    "promote.model_name": "mda-cpu-test",
    "promote.gates": {"Qabf": 0.05, "SSIM": 0.1},  # 3 pairs after 6 tiny steps: the plumbing, not the model
}


@pytest.mark.slow
def test_recipe_pipeline_records_the_shipped_model(tmp_path):
    if not (SHARED / "data" / "TNO" / "ir").is_dir():
        pytest.skip(f"no real pairs at {SHARED / 'data'} (../shared is absent)")
    repo = tmp_path / "repo"
    _copy_repo(repo)
    recipe = repo / "recipes" / "gpu"
    _override(recipe / "params.yaml", TINY_RECIPE)
    for f in ("dvc.lock",):
        (recipe / f).unlink(missing_ok=True)
    shipped_cpu = (repo / "models" / "pretrained" / "mda_cpu.pt").read_bytes()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run([*GIT, "commit", "-q", "-m", "copy"], repo, env)
    out = _run(["dvc", "repro", "recipes/gpu/dvc.yaml"], repo, env, timeout=1200)

    lock = yaml.safe_load((recipe / "dvc.lock").read_text())
    stages = lock["stages"]
    assert "../../stages/train.py" in stages["train"]["cmd"]
    shipped = {o["path"]: o["md5"] for o in stages["ship"]["outs"]}
    model = repo / "models" / "pretrained" / "mda_gpu.pt"
    import hashlib

    assert shipped["../../models/pretrained/mda_gpu.pt"] == hashlib.md5(model.read_bytes()).hexdigest()
    assert (repo / "models" / "pretrained" / "mda_cpu.pt").read_bytes() == shipped_cpu  # the CPU model untouched
    best = {o["path"]: o["md5"] for o in stages["train"]["outs"]}["models/best.pt"]
    assert best == shipped["../../models/pretrained/mda_gpu.pt"]

    card = json.loads((repo / "models" / "pretrained" / "mda_gpu.json").read_text())
    assert card["command"] == "dvc repro recipes/gpu/dvc.yaml"
    assert card["train_steps"] == 6 and card["train_stopped_by"] == "steps"
    assert card["data"]["test_pairs_total"] == 25 and card["data"]["test_pairs"] == {"TNO": 25}
    assert card["data"]["train_pairs_total"] + card["data"]["val_pairs_total"] == 17
    means = json.loads((recipe / "eval" / "means.json").read_text())
    assert card["tno25"] == means["ours"] and set(card["tno25_baselines"]) == {"authors' weights", "average", "maximum"}

    decision = json.loads((recipe / "models" / "promotion.json").read_text())
    assert decision["decision"] == "champion", decision
    with sqlite3.connect(recipe / "mlflow.db") as db:
        aliases = db.execute("select name, alias, version from registered_model_aliases").fetchall()
    assert ("mda-cpu-test", "champion", int(decision["version"])) in aliases, aliases
    assert "ship: " in out, out[-3000:]


def test_gpu_recipe_runs_the_cpu_recipe_pipeline():
    """One pipeline definition: the GPU recipe differs from the CPU one by its params.yaml only."""
    assert (REPO / "recipes" / "gpu" / "dvc.yaml").read_text() == (REPO / "recipes" / "cpu" / "dvc.yaml").read_text()
    cpu = yaml.safe_load((REPO / "recipes" / "cpu" / "params.yaml").read_text())
    gpu = yaml.safe_load((REPO / "recipes" / "gpu" / "params.yaml").read_text())
    assert gpu["train"]["use_gpu"] is True and gpu["train"]["crop_size"] > cpu["train"]["crop_size"]
    assert gpu["train"]["max_seconds"] <= 360 and gpu["ship"]["file"] != cpu["ship"]["file"]
    assert {k: v for k, v in gpu.items() if k not in ("train", "evaluate", "promote", "ship")} == \
        {k: v for k, v in cpu.items() if k not in ("train", "evaluate", "promote", "ship")}
