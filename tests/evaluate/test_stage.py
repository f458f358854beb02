"""The ``evaluate`` stage end to end on tiny generated data with a tiny real MDA checkpoint."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from pipeline.common.config import ParamsError
from pipeline.evaluate.report import markdown_table, means_for_json
from pipeline.evaluate.stage import EvalConfig, fuse_average, fuse_maximum, resolve_methods
from pipeline.data.images import write_image
from pipeline.evaluate.metrics import DIAGNOSTICS, HEADLINE, METRICS, brightness_gaps, compute_all

from conftest import shared_file

TINY_ARGS = {"width": 8, "reduction": 4, "up2_channels": 4, "up4_channels": 4}


def _scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """An IR/visible pair sharing edges: warm blobs in IR, textured colour regions in visible."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ir = 40 + 20 * np.sin(xx / 7.0)
    for _ in range(3):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(5, 12)
        ir += 150 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    base = 90 + 60 * (xx > w / 2) + rng.normal(0, 12, (h, w))
    vi = np.dstack([base, base * 0.8 + 30 * (yy > h / 2), base * 0.6 + 40])
    return np.clip(ir, 0, 255).astype(np.uint8), np.clip(vi, 0, 255).astype(np.uint8)


@pytest.fixture()
def tiny_project(tmp_path):
    """registered/{ir,vi} with 4 pairs (one gray visible), split.json, a tiny checkpoint."""
    import torch

    from pipeline.model.network import build_model
    from pipeline.model.weights import save_checkpoint

    rng = np.random.default_rng(7)
    names = ["p0", "p1", "p2", "p3"]
    for i, name in enumerate(names):
        ir, vi = _scene(rng, 40 + 8 * i, 56)
        if name == "p2":
            vi = cv2.cvtColor(vi, cv2.COLOR_BGR2GRAY)
        write_image(tmp_path / "registered" / "ir" / f"{name}.png", ir)
        write_image(tmp_path / "registered" / "vi" / f"{name}.png", vi)
    split = {"seed": 0, "fractions": [0.25, 0, 0.75], "train": ["p0"], "val": [], "test": ["p3", "p1", "p2"]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "best.pt", build_model("mda", **TINY_ARGS), "mda", TINY_ARGS)
    return tmp_path


def test_evaluate_stage_end_to_end(tiny_project, ray_local, monkeypatch, capsys):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from pipeline.evaluate.score import evaluate_folder
    from stages.evaluate import main

    root = tiny_project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    run_id = MlflowClient().create_run(MlflowClient().create_experiment("t", artifact_location=(root / "art").as_uri())).info.run_id
    (root / "train.json").write_text(json.dumps({"run_id": run_id, "model_uri": "models:/m-x", "checkpoint": str(root / "best.pt")}))
    (root / "params.yaml").write_text(
        f"evaluate:\n  official_weights: {root / 'absent.pth'}\n  batch_size: 2\n  grid_pairs: 2\n  grid_tile: [40, 56]\n"
    )
    out, metrics = root / "eval", root / "metrics" / "eval"
    rc = main(["--params", str(root / "params.yaml"), "--train-info", str(root / "train.json"),
               "--registered", str(root / "registered"), "--split", str(root / "split.json"),
               "--out", str(out), "--metrics", str(metrics)])
    assert rc == 0

    df = pd.read_csv(out / "per_image.csv")
    assert list(df.columns) == ["method", "name", *METRICS, *DIAGNOSTICS]
    assert sorted(zip(df.method, df.name)) == sorted((m, n) for m in ("average", "maximum", "ours") for n in ("p1", "p2", "p3"))
    assert np.isfinite(df[list(METRICS)].to_numpy()).all()

    # the means file is {method: {metric: mean}} and agrees with the CSV; the DVC metrics are the
    # headline means, one file per method (null for the skipped baseline)
    means = json.loads((out / "means.json").read_text())
    for method in ("average", "maximum", "ours"):
        assert json.loads((metrics / f"{method}.json").read_text()) == {m: means[method][m] for m in HEADLINE}
    assert set(json.loads((metrics / "official.json").read_text()).values()) == {None}
    assert list(means) == ["average", "maximum", "ours"]
    for method, vals in means.items():
        expected = df[df.method == method][list(METRICS)].mean()
        assert {m: vals[m] for m in METRICS} == pytest.approx(expected.to_dict(), abs=1e-5)
        gaps = df[df.method == method][list(DIAGNOSTICS)].mean()  # over the pairs that have such pixels
        assert all(vals[m] is None if np.isnan(gaps[m]) else vals[m] == pytest.approx(gaps[m], abs=1e-5)
                   for m in DIAGNOSTICS)
    # the pixel maximum keeps the brighter input (within the luma round trip of a colour image)
    assert all(means["maximum"][m] is None or abs(means["maximum"][m]) < 0.5 for m in DIAGNOSTICS)

    # the baselines are what they claim, scored with the published convention
    ir = cv2.imread(str(root / "registered" / "ir" / "p1.png"), cv2.IMREAD_GRAYSCALE)
    vi = cv2.imread(str(root / "registered" / "vi" / "p1.png"))
    y = cv2.cvtColor(vi, cv2.COLOR_BGR2GRAY)
    avg = cv2.imread(str(out / "fused" / "average" / "p1.png"))
    assert np.abs(cv2.cvtColor(avg, cv2.COLOR_BGR2GRAY).astype(int) - (ir.astype(int) + y) / 2).max() <= 1.5
    row = df[(df.method == "average") & (df.name == "p1")].iloc[0]
    assert row[list(METRICS)].to_dict() == pytest.approx(compute_all(ir, y, cv2.cvtColor(avg, cv2.COLOR_BGR2GRAY)), abs=1e-5)
    gaps = brightness_gaps(ir, y, cv2.cvtColor(avg, cv2.COLOR_BGR2GRAY))
    assert all(np.isnan(gaps[m]) if np.isnan(row[m]) else row[m] == pytest.approx(gaps[m], abs=1e-5) for m in DIAGNOSTICS)

    # scoring the written fused images with `mda evaluate`'s code gives the same numbers
    ours = evaluate_folder(root / "registered" / "ir", root / "registered" / "vi", out / "fused" / "ours", parallel=False)
    mine = df[df.method == "ours"].set_index("name").loc[list(ours.name), list(METRICS)]
    np.testing.assert_allclose(ours[list(METRICS)].to_numpy(), mine.to_numpy(), atol=1e-5)
    assert cv2.imread(str(out / "fused" / "ours" / "p2.png"), cv2.IMREAD_UNCHANGED).ndim == 2  # gray in, gray out

    table = (out / "table.md").read_text()
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    assert lines[0] == "| method | " + " | ".join((*METRICS, *DIAGNOSTICS)) + " |" and len(lines) == 2 + 3
    assert "Baseline `official` skipped" in table and "absent.pth" in table

    grid = cv2.imread(str(out / "grid.png"))
    assert grid.shape == (24 + 2 * 40, 5 * 56, 3)  # 2 pairs; IR | visible | average | maximum | ours

    logged = MlflowClient().get_run(run_id).data.metrics
    assert logged["test_ours_VIF"] == pytest.approx(means["ours"]["VIF"])
    assert logged["test_average_Qabf"] == pytest.approx(means["average"]["Qabf"])
    artifacts = {a.path for a in MlflowClient().list_artifacts(run_id, "eval")}
    assert {"eval/per_image.csv", "eval/table.md", "eval/grid.png", "eval/means.json", "eval/ours.json"} <= artifacts

    # the evaluated test set is identified (promote compares like with like)
    test_set = json.loads((out / "test_set.json").read_text())
    assert test_set["pairs"] == ["p1", "p2", "p3"] and len(test_set["digest"]) == 64
    assert not [p for p in root.iterdir() if p.name.startswith(".eval.")]  # no staging folder left

    # a corrupt registered image: one clear line naming the file, exit 1, the old report kept
    (root / "registered" / "ir" / "p2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    capsys.readouterr()
    rc = main(["--params", str(root / "params.yaml"), "--train-info", str(root / "train.json"),
               "--registered", str(root / "registered"), "--split", str(root / "split.json"),
               "--out", str(out), "--metrics", str(metrics)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("evaluate: error: ") and "p2.png" in err[-1] and "cannot decode" in err[-1]
    assert "Traceback" not in err[-1] and "RayTaskError" not in err[-1]
    assert pd.read_csv(out / "per_image.csv").equals(df) and json.loads((out / "means.json").read_text()) == means
    assert not [p for p in root.iterdir() if p.name.startswith(".eval.")]


def test_official_baseline_scored_when_present(tiny_project, ray_local):
    from pipeline.evaluate.stage import evaluate

    weights = shared_file("models", "mda_official", "fusion_model.pth")
    root = tiny_project
    cfg = EvalConfig(official_weights=str(weights), max_pairs=1, grid_pairs=1, grid_tile=(32, 32))
    result = evaluate(root / "best.pt", root / "registered", root / "split.json", root / "eval", root / "metrics", cfg)
    assert list(result.means) == ["average", "maximum", "official", "ours"] and not result.skipped
    assert [r["name"] for r in result.per_image if r["method"] == "official"] == ["p1"]
    assert cv2.imread(str(root / "eval" / "grid.png")).shape == (24 + 32, 6 * 32, 3)


def test_bad_inputs_are_clear_errors(tiny_project):
    from pipeline.evaluate.stage import evaluate, list_test_pairs
    from pipeline.train.summary import read_train_info

    root = tiny_project
    with pytest.raises(FileNotFoundError, match="trained checkpoint not found: .*nope.pt"):
        resolve_methods(root / "nope.pt", None)
    methods, skipped = resolve_methods(root / "best.pt", None)
    assert list(methods) == ["average", "maximum", "ours"] and "null" in skipped["official"]
    (root / "garbage.pth").write_bytes(b"not weights")
    with pytest.raises(ValueError, match="garbage.pth: not a readable PyTorch weights file"):
        evaluate(root / "best.pt", root / "registered", root / "split.json", root / "eval", root / "m.json",
                 EvalConfig(official_weights=str(root / "garbage.pth")))
    assert not (root / "eval").exists() and not (root / "m.json").exists()
    (root / "split.json").write_text(json.dumps({"train": [], "val": [], "test": ["p1", "zz"]}))
    with pytest.raises(FileNotFoundError, match=r"no registered IR/visible images for test pairs \['zz'\]"):
        list_test_pairs(root / "registered", root / "split.json")
    (root / "split.json").write_text(json.dumps({"train": [], "val": [], "test": []}))
    with pytest.raises(ValueError, match="test split is empty"):
        list_test_pairs(root / "registered", root / "split.json")
    (root / "train.json").write_text(json.dumps({"run_id": "r"}))
    with pytest.raises(ValueError, match="train.json: missing 'model_uri'"):
        read_train_info(root / "train.json")
    with pytest.raises(ParamsError, match=r"evaluate\.grid_tile"):
        EvalConfig.from_params({"grid_tile": [10]})
    with pytest.raises(ParamsError, match=r"evaluate\.concurrency"):
        EvalConfig.from_params({"concurrency": 0})


def test_pixel_baselines_and_table():
    ir = np.array([[0, 100], [200, 255], [1, 3]], np.uint8)
    vi = np.array([[50, 50], [50, 250], [0, 0]], np.uint8)
    # integer halving: odd sums go down (1 -> 0, 3 -> 1), never to the even neighbour above
    assert fuse_average(ir, vi).tolist() == [[25, 75], [125, 252], [0, 1]]
    ir, vi = ir[:2], vi[:2]
    assert fuse_maximum(ir, vi).tolist() == [[50, 100], [200, 255]]
    colour = np.dstack([vi, vi, vi])
    assert fuse_maximum(ir, colour).shape == (2, 2, 3)
    table = markdown_table({"a": {"VIF": 0.5, "EN": 7.0}, "b": {"VIF": 0.7, "EN": 6.0}}, ["VIF", "EN"])
    assert "| a | 0.5000 | **7.0000** |" in table and "| b | **0.7000** | 6.0000 |" in table
    nan_means = {"a": {"VIF": float("nan"), "EN": 7.0}, "b": {"VIF": 0.7, "EN": float("inf")}}
    assert "| a | n/a | **7.0000** |" in markdown_table(nan_means, ["VIF", "EN"])
    assert means_for_json(nan_means) == {"a": {"VIF": None, "EN": 7.0}, "b": {"VIF": 0.7, "EN": None}}
