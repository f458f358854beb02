"""End to end: ``dvc repro`` in a temporary git copy of the repository, then a no-op second run.

Later stages extend ``TINY_OVERRIDES`` (small params so the run stays short) and ``REPRO_TARGETS``
(the last stage(s) to reproduce) and ``EXPECTED_OUTPUTS``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

#: dotted params.yaml key -> value written into the copy's params.yaml.
TINY_OVERRIDES: dict[str, object] = {
    "ray.address": None,
    "ray.num_cpus": 2,
    "demo.num_pairs": 6,
    "demo.height": 96,
    "demo.width": 128,
    "register.raw_dir": "data/demo",
    "crop.patch_size": 32,
    "crop.stride": 32,
    "crop.pairs_per_shard": 3,
    "evaluate.grid_pairs": 1,
    "evaluate.grid_tile": [48, 64],
    "promote.model_name": "mda-fusion-test",
}
#: stages given to ``dvc repro`` (it runs everything they depend on).
REPRO_TARGETS: list[str] = ["promote"]
#: files or folders every run must produce (relative to the repository root).
EXPECTED_OUTPUTS: list[str] = [
    "data/demo/ir",
    "data/registered/manifest.parquet",
    "data/patches/split.json",
    "data/patches/part-00000.parquet",
    "data/stats/images.parquet",
    "data/stats/normalisation.json",
    "data/stats/patches",
    "metrics/stats.json",
    "plots/weights_hist.csv",
    "models/train.json",
    "eval/per_image.csv",
    "eval/table.md",
    "eval/grid.png",
    "metrics/eval.json",
    "models/promotion.json",
]


def _copy_repo(dest: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout.split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():  # skips files deleted but still in the index
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _override(params_file: Path, overrides: dict[str, object]) -> None:
    params = yaml.safe_load(params_file.read_text())
    for key, value in overrides.items():
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise TypeError(f"TINY_OVERRIDES: {key}: '{part}' is not a mapping in params.yaml")
        node[leaf] = value
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


def _fingerprint(root: Path, paths: list[str]) -> dict[str, tuple[float, str]]:
    """mtime and content hash of every file under the given paths."""
    found: dict[str, tuple[float, str]] = {}
    for rel in paths:
        base = root / rel
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for f in files:
            found[str(f.relative_to(root))] = (f.stat().st_mtime, hashlib.md5(f.read_bytes()).hexdigest())
    return found


@pytest.mark.slow
def test_dvc_repro_in_a_fresh_git_copy_then_nothing_to_do(tmp_path):
    repo = tmp_path / "repo"
    _copy_repo(repo)
    _override(repo / "params.yaml", TINY_OVERRIDES)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run([*git, "commit", "-q", "-m", "copy"], repo, env)

    first = _run(["dvc", "repro", *REPRO_TARGETS], repo, env)
    missing = [p for p in EXPECTED_OUTPUTS if not (repo / p).exists()]
    assert not missing, f"declared outputs missing after dvc repro: {missing}\n{first[-3000:]}"
    shown = _run(["dvc", "metrics", "show"], repo, env)
    assert "metrics/stats.json" in shown and "patch.w_int_ir.p5" in shown, shown
    assert "metrics/eval.json" in shown and "ours.VIF" in shown and "average.Qabf" in shown, shown

    before = _fingerprint(repo, ["dvc.lock", *EXPECTED_OUTPUTS])
    second = _run(["dvc", "repro", *REPRO_TARGETS], repo, env)
    assert "up to date" in second, second
    assert _fingerprint(repo, ["dvc.lock", *EXPECTED_OUTPUTS]) == before
