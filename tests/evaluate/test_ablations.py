"""pipeline.evaluate.ablations: the grid's DVC commands, reading `dvc exp show --json`, the table,
the chart, the model cost, and `mda ablations report` end to end on a fake document."""

from __future__ import annotations

from pathlib import Path

import copy
import json
import os
import shutil

import pytest

from conftest import REPO
from pipeline.evaluate import ablations as ab

METRICS = {"full": 0.50, "add": 0.45, "concat": 0.52}


def _exp(name: str, rev: str, vif: float | None, model_args: dict, ts: str, failed: bool = False) -> dict:
    metrics = {"metrics/train.json": {"data": {"fit_time_s": 321.5}}}
    if vif is not None:
        means = {m: 1.0 for m in ab.HEADLINE} | {"VIF": vif, "SSIM": 0.9}
        metrics["metrics/eval.json"] = {"data": {"ours": means, "average": {m: 0.1 for m in ab.HEADLINE}}}
    else:
        metrics["metrics/eval.json"] = {"error": {"type": "FileNotFoundError", "msg": "no file"}}
    data = {"rev": rev, "timestamp": ts, "metrics": metrics,
            "params": {"params.yaml": {"data": {"model": {"name": "mda", "args": model_args},
                                                "register": {"raw_dir": "/data/raw"}}}}}
    return {"executor": {"state": "failed" if failed else "success"}, "name": name,
            "revs": [{"rev": rev, "name": name, "data": data, "error": {"msg": "Experiment run failed"} if failed else None,
                      "experiments": None}]}


def fake_exp_show() -> list:
    """A `dvc exp show --json` document (DVC 3 layout, as seen on the smoke run)."""
    exps = [
        _exp("abl-full", "a" * 40, METRICS["full"], {}, "2026-11-30T10:00:00"),
        _exp("abl-add", "b" * 40, METRICS["add"], {"fusion": "add"}, "2026-11-30T10:10:00"),
        _exp("abl-concat", "c" * 40, METRICS["concat"], {"fusion": "concat"}, "2026-11-30T10:20:00"),
        _exp("abl-concat-old", "d" * 40, 0.1, {"fusion": "concat"}, "2026-11-29T10:20:00"),
        _exp("abl-single_scale", "e" * 40, None, {"scales": 1}, "2026-11-30T10:30:00", failed=True),
        _exp("other-exp", "f" * 40, 0.9, {}, "2026-11-30T10:40:00"),
    ]
    return [{"rev": "workspace", "name": None, "data": {"params": {}, "metrics": {}}, "error": None, "experiments": None},
            {"rev": "1234567" + "0" * 33, "name": "main", "data": {}, "error": None, "experiments": exps}]


def test_grid_commands_queue_every_variant_with_the_common_budget():
    common = ab.grid_common("raw", "list.txt")
    cmds = ab.grid_commands(ab.VARIANTS, common, tag="t1")
    assert len(cmds) == len(ab.VARIANTS) + 1 and cmds[-1] == ["dvc", "queue", "start", "-j", "1"]
    names = [c[c.index("-n") + 1] for c in cmds[:-1]]
    assert names == [f"abl-{v.name}-t1" for v in ab.VARIANTS] and len(set(names)) == len(names)
    for cmd, v in zip(cmds, ab.VARIANTS):
        assert cmd[:4] == ["dvc", "exp", "run", "--queue"]
        sets = dict(a.split("=", 1) for a in cmd[6:][1::2])
        # the same seed and number of optimiser steps for everyone; absolute data paths
        assert sets["train.seed"] == "2024" and sets["train.epochs"] == "3" and sets["train.max_train_patches"] == "640"
        assert sets["register.raw_dir"].startswith("/") and sets["crop.test_list"].startswith("/")
        for key, value in v.overrides.items():
            assert sets[key] == ab.format_value(value)
    # each switch is one parameter (blend_targets: the intensity and the gradient target)
    assert {v.name: len(v.overrides) for v in ab.VARIANTS} == {
        "full": 0, "add": 1, "concat": 1, "single_scale": 1, "fixed_weights": 1, "no_patch": 1, "no_style": 1,
        "blend_targets": 2}
    with pytest.raises(ValueError, match="raw folder"):
        ab.grid_common(None, None)
    with pytest.raises(ValueError, match="unknown ablation variant"):
        ab.select_variants(["full", "nope"])
    assert [v.name for v in ab.select_variants(["add", "full"])] == ["full", "add"]


def test_every_setting_survives_dvc_set_params_and_validates(tmp_path, monkeypatch):
    """-S values go through DVC's YAML 1.2 writer, params.yaml is read as YAML 1.1 by the stages:
    every value of the grid must come back as itself, and the result must pass stage `params`."""
    from dvc.utils.hydra import apply_overrides

    import importlib.util

    from pipeline.common.config import load_params

    spec = importlib.util.spec_from_file_location("stage_params", REPO / "stages" / "params.py")
    stage_params = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage_params)
    test_list = tmp_path / "list.txt"
    test_list.write_text("01.png\n")
    import numpy as np

    from pipeline.data.images import write_image

    monkeypatch.chdir(REPO)  # the files params.yaml names are relative to the repository
    for sub in ("ir", "vi"):  # the params stage looks at the raw folder too
        write_image(tmp_path / "raw" / sub / "01.png", np.zeros((96, 96), np.uint8))
    for v in ab.VARIANTS:
        path = tmp_path / f"{v.name}.yaml"
        shutil.copy(REPO / "params.yaml", path)
        settings = {**ab.grid_common(str(tmp_path / "raw"), str(test_list)), **v.overrides}
        apply_overrides(path, [f"{k}={ab.format_value(x)}" for k, x in settings.items()])
        params = load_params(path)
        for key, value in settings.items():
            assert ab.get_dotted(params, key, "MISSING") == value, (v.name, key)
        stage_params.check_params(params)


def test_parse_pick_and_table_from_a_fake_exp_show():
    records = ab.parse_exp_show(copy.deepcopy(fake_exp_show()))
    assert {r.name for r in records} == {"abl-full", "abl-add", "abl-concat", "abl-concat-old", "abl-single_scale",
                                         "other-exp"}
    assert [r.name for r in records if r.failed] == ["abl-single_scale"]
    names = [v.name for v in ab.VARIANTS]
    assert ab.variant_of("abl-single_scale-t1", names) == "single_scale" and ab.variant_of("other-exp", names) is None
    picked = ab.pick_records(records, names)
    assert sorted(picked) == ["add", "concat", "full"]  # the failed one is not picked
    assert picked["concat"].name == "abl-concat"  # the newest
    old = ab.pick_records(records, names, tag="old")
    assert list(old) == ["concat"] and old["concat"].name == "abl-concat-old"
    rows = ab.table_rows(picked, names)
    assert [r.variant for r in rows] == ["full", "add", "concat"]
    assert rows[1].means["VIF"] == 0.45 and rows[0].train_s == 321.5 and rows[0].rev == "a" * 40
    rel = ab.relative_differences(rows)
    assert rel["add"]["VIF"] == pytest.approx(-10.0) and rel["concat"]["VIF"] == pytest.approx(4.0)
    assert rel["add"]["EN"] == 0.0 and "full" not in rel
    for r in rows:
        r.params, r.gflops = 1000, 1.5
    md = ab.markdown_report(rows, ab.VARIANTS, command="mda ablations run", commit="1234567", machine="m", date="d")
    line: dict[str, str] = {}
    for l in md.splitlines():  # the first table's row of each variant
        if l.startswith("| "):
            line.setdefault(l.split(" | ")[0].strip("| "), l)
    assert "0.450 (-0.050)" in line["add"] and "0/8" in line["add"]
    assert "0.520 (+0.020 **+**)" in line["concat"] and "1/8" in line["concat"]
    assert "`abl-concat` (ccccccc)" in line["concat"] and "1,000" in line["full"] and "322" in line["full"]
    assert "**concat** beats the full model on 1/8: VIF." in md
    assert "No experiment found for: single_scale, fixed_weights" in md
    assert "- command: `mda ablations run`" in md and "- git commit: `1234567`" in md


def test_chart_is_written(tmp_path):
    records = ab.parse_exp_show(fake_exp_show())
    rows = ab.table_rows(ab.pick_records(records, [v.name for v in ab.VARIANTS]), [v.name for v in ab.VARIANTS])
    png = ab.write_chart(rows, tmp_path / "a.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_complexity_of_the_variants():
    full = ab.complexity({}, size=(1, 1, 64, 64))
    add = ab.complexity({"fusion": "add"}, size=(1, 1, 64, 64))
    single = ab.complexity({"scales": 1}, size=(1, 1, 64, 64))
    assert full[0] == 484_214 and add[0] < full[0] and single[0] < add[0]
    assert single[1] < add[1] < full[1]
    # FLOPs grow with the pixels (16x the pixels: 16x the FLOPs)
    assert ab.complexity({"scales": 1}, size=(1, 1, 256, 256))[1] == pytest.approx(16 * single[1], rel=1e-6)


def test_report_command_on_a_saved_exp_show(tmp_path, monkeypatch):
    from pipeline.cli import main

    doc = tmp_path / "show.json"
    doc.write_text(json.dumps(fake_exp_show()))
    md, png = tmp_path / "docs" / "ablations.md", tmp_path / "docs" / "ablations.png"
    monkeypatch.chdir(tmp_path)
    full_size = ab.complexity  # the real cost at 256x256 is tested above; a small input keeps this test fast
    monkeypatch.setattr(ab, "complexity", lambda args, name="mda": full_size(args, name, size=(1, 1, 32, 32)))
    assert main(["ablations", "report", "--json", str(doc), "--md", str(md), "--png", str(png),
                 "--command", "mda ablations run --tag x"]) == 0
    text = md.read_text()
    assert "| full | 1.000 |" in text and "484,214" in text and "405,158" in text
    assert "`mda ablations run --tag x`" in text and png.stat().st_size > 10_000
    assert main(["ablations", "report", "--json", str(doc), "--tag", "nope", "--md", str(md), "--png", str(png)]) == 1


def test_raw_folder_links_every_pair(tmp_path):
    import numpy as np

    from pipeline.data.images import write_image

    for ds, stems in (("A", ["a1", "a2"]), ("B", ["b1"])):
        for m in ("ir", "vi"):
            (tmp_path / ds / m).mkdir(parents=True)
            for s in stems:
                write_image(tmp_path / ds / m / f"{s}.png", np.zeros((8, 8), np.uint8))
    assert ab.build_raw_folder(tmp_path / "raw", tmp_path, ["A", "B"]) == {"A": 2, "B": 1}
    assert sorted(p.name for p in (tmp_path / "raw" / "vi").iterdir()) == ["a1.png", "a2.png", "b1.png"]
    assert (tmp_path / "raw" / "ir" / "b1.png").resolve() == (tmp_path / "B" / "ir" / "b1.png").resolve()
    (tmp_path / "B" / "ir" / "a1.png").write_bytes((tmp_path / "A" / "ir" / "a1.png").read_bytes())
    (tmp_path / "B" / "vi" / "a1.png").write_bytes((tmp_path / "A" / "vi" / "a1.png").read_bytes())
    with pytest.raises(ValueError, match="'a1' is in both A and B"):
        ab.build_raw_folder(tmp_path / "raw2", tmp_path, ["A", "B"])
    data = ab.recipe_data(REPO / "recipes" / "cpu" / "params.yaml")
    assert ab.dataset_list(data) == ["RoadScene", "MSRS", "TNO"]
    assert data["test_set"] == "TNO" and Path(data["test_list"]).name == "subset_CDDFuse_test25.txt"


def test_report_of_the_real_smoke_run(tmp_path, monkeypatch):
    """`dvc exp show --json --all-commits` as DVC 3.67 wrote it after `mda ablations run --smoke --tag s2`
    (two successful experiments and the two failed ones of a first attempt)."""
    from pipeline.cli import main

    doc = REPO / "tests" / "evaluate" / "data" / "ablations_exp_show_smoke.json"
    records = ab.load_exp_show(doc.read_text())
    assert sorted((r.name, r.failed) for r in records) == [
        ("abl-add", True), ("abl-add-s2", False), ("abl-full", True), ("abl-full-s2", False)]
    picked = ab.pick_records(records, [v.name for v in ab.VARIANTS])
    assert {k: r.name for k, r in picked.items()} == {"full": "abl-full-s2", "add": "abl-add-s2"}
    assert picked["add"].params["model"]["args"]["fusion"] == "add"
    rows = ab.table_rows(picked, [v.name for v in ab.VARIANTS])
    assert all(r.means[m] is not None for r in rows for m in ab.HEADLINE) and all(r.train_s > 0 for r in rows)
    monkeypatch.chdir(tmp_path)
    full_size = ab.complexity
    monkeypatch.setattr(ab, "complexity", lambda args, name="mda": full_size(args, name, size=(1, 1, 32, 32)))
    assert main(["ablations", "report", "--json", str(doc), "--md", "a.md", "--png", "a.png"]) == 0
    text = (tmp_path / "a.md").read_text()
    assert "SMOKE RUN" in text and "the test split of the demo data" in text and "`abl-add-s2`" in text


def test_run_dry_run_prints_the_dvc_commands(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.chdir(REPO)
    assert main(["ablations", "run", "--dry-run", "--variants", "full", "single_scale", "--tag", "t",
                 "--raw", str(tmp_path / "raw")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[-1] == "dvc queue start -j 1"
    assert lines[0].startswith("dvc exp run --queue -n abl-full-t -S ")
    assert "-S model.args.scales=1" in lines[1] and f"-S register.raw_dir={tmp_path / 'raw'}" in lines[1]
    assert not (tmp_path / "raw").exists()  # a dry run builds nothing


def _dvc_on_path(tmp_path, monkeypatch, body: str) -> None:
    """A ``dvc`` executable (shell script ``body``) first on PATH, counting its calls in ``calls``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    dvc = bin_dir / "dvc"
    dvc.write_text(f'#!/bin/sh\necho x >> "{tmp_path}/calls"\nn=$(wc -l < "{tmp_path}/calls")\n{body}\n')
    dvc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_wait_for_queue_outlasts_a_failed_status(tmp_path, monkeypatch):
    """A failing ``dvc queue status`` (a lock) no longer ends the wait while experiments still run."""
    from pipeline.cli.ablations import wait_for_queue

    _dvc_on_path(tmp_path, monkeypatch, """case $n in
  1) echo "ERROR: Unable to acquire lock" >&2; exit 1;;
  2) printf 'Task     Name        Created    Status\\n1a2b3c4  abl-full    10:00 AM   Running\\n';;
  *) printf 'Task     Name        Created    Status\\n1a2b3c4  abl-full    10:00 AM   Success\\n';;
esac""")
    assert wait_for_queue(poll_s=0) >= 0
    assert len((tmp_path / "calls").read_text().splitlines()) == 3


def test_wait_for_queue_gives_up_on_a_status_that_always_fails(tmp_path, monkeypatch):
    from pipeline.cli.ablations import wait_for_queue

    _dvc_on_path(tmp_path, monkeypatch, 'echo "ERROR: Unable to acquire lock" >&2; exit 1')
    with pytest.raises(RuntimeError, match="failed 3 times in a row: ERROR: Unable to acquire lock"):
        wait_for_queue(poll_s=0, attempts=3)
