"""End to end: ``dvc repro`` in a temporary git copy of the repository, then a no-op second run.

Later stages extend ``TINY_OVERRIDES`` (small params so the run stays short) and ``REPRO_TARGETS``
(the last stage(s) to reproduce) and ``EXPECTED_OUTPUTS``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
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
#: the demo's DVC metrics files (README: `dvc metrics show --precision 3 ...`)
DEMO_METRICS = ["metrics/register/counts.json", "metrics/stats.json", "metrics/train.json", "metrics/eval"]
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
    "eval/report.html",
    "metrics/eval/ours.json",
    "eval/means.json",
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


GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory):
    """A temporary git copy of the repository after one ``dvc repro`` of the demo pipeline.

    Shared by the tests of this module (the pipeline runs once): ``(repo, env, output of the run)``.
    """
    repo = tmp_path_factory.mktemp("dvc") / "repo"
    _copy_repo(repo)
    _override(repo / "params.yaml", TINY_OVERRIDES)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run([*GIT, "commit", "-q", "-m", "copy"], repo, env)
    first = _run(["dvc", "repro", *REPRO_TARGETS], repo, env)
    return repo, env, first


@pytest.mark.slow
def test_dvc_repro_in_a_fresh_git_copy_then_nothing_to_do(demo_repo):
    repo, env, first = demo_repo
    missing = [p for p in EXPECTED_OUTPUTS if not (repo / p).exists()]
    assert not missing, f"declared outputs missing after dvc repro: {missing}\n{first[-3000:]}"
    shown = _run(["dvc", "metrics", "show", "--precision", "3", *DEMO_METRICS], repo, env)
    assert "metrics/stats.json" in shown and "w_int_ir_p50" in shown and "patches" in shown, shown
    assert "metrics/eval/ours.json" in shown and "metrics/eval/average.json" in shown and "VIF" in shown, shown
    width = max(len(line) for line in shown.splitlines())
    assert width <= 200, f"dvc metrics show is {width} columns wide:\n{shown}"

    before = _fingerprint(repo, ["dvc.lock", *EXPECTED_OUTPUTS])
    second = _run(["dvc", "repro", *REPRO_TARGETS], repo, env)
    assert "up to date" in second, second
    assert _fingerprint(repo, ["dvc.lock", *EXPECTED_OUTPUTS]) == before


# --------------------------------------------------------------------------------------------
# Results you can see: DVC image plots and eval/report.html in headless Chromium (tests/test_browser.py)


def _grid_pair(repo: Path) -> str:
    pairs = sorted(p.name for p in (repo / "eval" / "plots").iterdir())
    assert len(pairs) == TINY_OVERRIDES["evaluate.grid_pairs"], pairs
    return pairs[0]


def _methods(repo: Path) -> list[str]:
    """The evaluated methods in the order of eval/per_image.csv (the official baseline only where
    the authors' weights are found)."""
    rows = (repo / "eval" / "per_image.csv").read_text().splitlines()[1:]
    return list(dict.fromkeys(r.split(",")[0] for r in rows))


@pytest.mark.slow
def test_dvc_plots_show_renders_the_fused_images(demo_repo):
    from test_browser import IMAGES_JS, Browser, artifact_dir, find_chromium

    repo, env, _ = demo_repo
    pair = _grid_pair(repo)
    out = _run(["dvc", "plots", "show"], repo, env)
    index = repo / "dvc_plots" / "index.html"
    assert index.is_file(), out
    page = index.read_text()
    from pipeline.evaluate.report import plot_image_name

    labels = [plot_image_name(x)[:-4] for x in ("ir", "visible", *_methods(repo))]
    assert labels[-1] == "5_ours" and len(labels) >= 5, labels
    for label in labels:  # image plots of every method of the grid pair, in this order
        assert f"eval/plots/{pair}/{label}.png" in page, label
    positions = [page.index(f"eval/plots/{pair}/{label}.png") for label in labels]
    assert positions == sorted(positions)
    assert "plots/train_loss.csv" in page  # the curves are still there
    stage_images = re.findall(r"^\s*- (\S+\.(?:png|jpe?g|gif|svg))\s*:?\s*$", (repo / "dvc.yaml").read_text(), re.M)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for declared in stage_images:  # e.g. the register stage's alignment overlays
        declared = re.sub(r"\$\{(\w+)\.(\w+)\}", lambda m: str(params[m.group(1)][m.group(2)]), declared)
        if (repo / declared).is_file():
            assert declared in page, declared

    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium): page not rendered")
    t0 = time.monotonic()
    with Browser(exe) as browser:
        tab = browser.open(index.as_uri())
        images = tab.eval(IMAGES_JS)
        shot = tab.screenshot(artifact_dir() / "dvc-plots-show.png")
        errors = tab.console_errors()
    assert len(images) == page.count("<img ") >= len(labels), images
    assert all(i["ok"] and i["w"] > 0 for i in images), images
    # DVC's own page template loads Vega from cdn.jsdelivr.net for the curves: offline (CI) those
    # loads fail; nothing else may.
    others = [e for e in errors if "cdn.jsdelivr.net" not in e and not re.search(r"\bvega", e, re.I)]
    assert not others, f"console errors in dvc_plots/index.html: {others}"
    print(f"\nscreenshot: {shot} ({time.monotonic() - t0:.1f} s in Chromium; "
          f"{len(errors) - len(others)} errors from DVC's Vega CDN scripts ignored)")


@pytest.mark.slow
def test_eval_report_in_headless_chromium(demo_repo):
    from test_browser import Browser, artifact_dir, check_report_page, chromium_or_skip

    repo, _, _ = demo_repo
    report = repo / "eval" / "report.html"
    n_test = len(json.loads((repo / "eval" / "test_set.json").read_text())["pairs"])
    exe = chromium_or_skip()
    shot = artifact_dir() / "eval-report.png"
    t0 = time.monotonic()
    with Browser(exe) as browser:
        seen = check_report_page(browser.open(report.as_uri()), shot)
    print(f"\nscreenshot: {shot} ({time.monotonic() - t0:.1f} s in Chromium); {seen}")
    assert seen["rows"] == n_test and seen["images"] == n_test * (2 + len(_methods(repo)))  # IR, visible, methods
    assert len(seen["notes"]) == min(3, n_test)


@pytest.mark.slow
def test_dvc_plots_diff_of_two_experiments_shows_both(demo_repo):
    """The demo run committed as the baseline, one ``dvc exp run`` with another training length and
    learning rate (train and after re-run), then ``dvc plots diff`` puts each image of the two side
    by side. (The length alone may not change the model: the best-SSIM checkpoint can be epoch 1 in
    both.) Runs last: it changes the copy's workspace."""
    repo, env, _ = demo_repo
    pair = _grid_pair(repo)
    _run(["git", "add", "dvc.lock"], repo, env)
    _run([*GIT, "commit", "-q", "-m", "baseline"], repo, env)
    _run([*GIT, "tag", "baseline"], repo, env)
    _run(["dvc", "exp", "run", "-n", "short", "-S", "train.epochs=1", "-S", "train.lr=0.002"], repo, env)
    _run(["dvc", "plots", "diff", "baseline", "short", "-o", "plots_diff"], repo, env)
    page = (repo / "plots_diff" / "index.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    ours = [s for s in srcs if s.endswith(f"eval_plots_{pair}_5_ours.png")]
    assert sorted(Path(s).name.split("_")[0] for s in ours) == ["baseline", "short"], srcs
    for label in (p.name for p in (repo / "eval" / "plots" / pair).iterdir()):
        assert sum(s.endswith(f"eval_plots_{pair}_{label}") for s in srcs) == 2, (label, srcs)
    files = [repo / "plots_diff" / s for s in ours]
    assert all(f.is_file() for f in files)
    assert files[0].read_bytes() != files[1].read_bytes(), "the two experiments' fused images are identical"

    from test_browser import IMAGES_JS, Browser, artifact_dir, find_chromium

    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium): page not rendered")
    with Browser(exe) as browser:
        tab = browser.open((repo / "plots_diff" / "index.html").as_uri())
        images = tab.eval(IMAGES_JS)
        shot = tab.screenshot(artifact_dir() / "dvc-plots-diff.png")
    assert len(images) == len(srcs) and all(i["ok"] and i["w"] > 0 for i in images), images
    print(f"\nscreenshot: {shot}")


@pytest.mark.slow
def test_ablation_grid_smoke_through_the_dvc_queue(demo_repo):
    """``mda ablations run --smoke`` for one variant: ``dvc exp run --queue`` with the switch,
    ``dvc queue start``, wait, then the table from ``dvc exp show --json``. The long grid itself is a
    documented command (README "Ablations"); this proves its machinery on the demo data."""
    repo, env, _ = demo_repo
    mda = str(Path(sys.executable).parent / "mda")
    out = _run([mda, "ablations", "run", "--smoke", "--variants", "add", "--tag", "t", "--allow-dirty",
                "--md", "abl.md", "--png", "abl.png"], repo, env, timeout=900)
    assert "dvc queue start -j 1" in out and "-S model.args.fusion=add" in out
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], repo, env))
    exps = {r.get("name"): r for base in shown for e in base.get("experiments") or [] for r in e.get("revs") or []}
    params = exps["abl-add-t"]["data"]["params"]["params.yaml"]["data"]
    assert params["model"]["args"]["fusion"] == "add" and params["train"]["max_train_patches"] == 16
    md = (repo / "abl.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| add |"))
    assert "`abl-add-t`" in row and "405,158" in row  # the add network's parameter count
    assert "SMOKE RUN" in md and (repo / "abl.png").stat().st_size > 10_000
