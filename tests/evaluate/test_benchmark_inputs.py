"""The evaluate stage scores the benchmark inputs as shipped.

Published tables are computed on the TNO files as shipped. With the register stage's default
(``register.align: check``) the registered images are the decoded source pixels, so the evaluate
stage's baseline rows (average, maximum, the authors' weights) on the TNO test list must be
identical to ``mda fuse`` + ``mda evaluate`` run on the raw files. Checked on the two smallest
test-list pairs, to stay fast (``tests/data/test_register.py`` checks the decoded pixels of all 42
TNO pairs). ``mda fuse`` runs with one thread like the stage's 1-CPU actors: with several threads,
CPU convolutions can round a few pixels of the authors' network output differently (by one gray
level, measured on TNO 12).
"""

from __future__ import annotations

import json
import os

from conftest import shared_dataset, shared_file

TINY_ARGS = {"width": 8, "reduction": 4, "up2_channels": 4, "up4_channels": 4}
PAIRS = ("08", "35")


def test_evaluate_baselines_equal_mda_evaluate_on_raw_tno_files(tmp_path, ray_local):
    import torch

    from pipeline.cli import main as mda
    from pipeline.data.crop import read_test_list
    from pipeline.data.images import read_pair, write_image
    from pipeline.data.register import register_dataset
    from pipeline.evaluate.metrics import METRICS
    from pipeline.evaluate.score import evaluate_folder
    from pipeline.evaluate.stage import EvalConfig, evaluate, fuse_average, fuse_maximum
    from pipeline.model.network import build_model
    from pipeline.model.weights import save_checkpoint

    tno = shared_dataset("TNO")
    weights = shared_file("models", "mda_official", "fusion_model.pth")
    test_list = tno / "subset_CDDFuse_test25.txt"
    assert set(PAIRS) <= set(read_test_list(test_list))
    raw = tmp_path / "raw"
    for sub in ("ir", "vi"):
        (raw / sub).mkdir(parents=True)
        for stem in PAIRS:
            os.symlink((tno / sub / f"{stem}.png").resolve(), raw / sub / f"{stem}.png")

    # the pipeline: register (defaults) -> evaluate on the test split
    summary = register_dataset(raw / "ir", raw / "vi", tmp_path / "registered", progress=False)
    assert summary.align == "check" and summary.corrected == 0
    split = {"seed": 0, "fractions": [0.0, 0.0, 1.0], "test_list": str(test_list),
             "train": [], "val": [], "test": list(PAIRS)}
    (tmp_path / "split.json").write_text(json.dumps(split))
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "best.pt", build_model("mda", **TINY_ARGS), "mda", TINY_ARGS)
    cfg = EvalConfig(official_weights=str(weights), batch_size=2, grid_pairs=0)
    result = evaluate(tmp_path / "best.pt", tmp_path / "registered", tmp_path / "split.json",
                      tmp_path / "eval", tmp_path / "metrics", cfg)
    stage = {(r["method"], r["name"]): [r[m] for m in METRICS] for r in result.per_image}

    # the same baselines from the raw files, scored by `mda evaluate`'s code
    for method, fuse in (("average", fuse_average), ("maximum", fuse_maximum)):
        for stem in PAIRS:
            write_image(tmp_path / "raw_fused" / method / f"{stem}.png", fuse(*read_pair(raw / "ir" / f"{stem}.png",
                                                                                         raw / "vi" / f"{stem}.png")))
    assert mda(["fuse", "--ir", str(raw / "ir"), "--vi", str(raw / "vi"), "-o", str(tmp_path / "raw_fused" / "official"),
                "--weights", str(weights), "--threads", "1"]) == 0  # as the stage's 1-CPU actors
    for method in ("average", "maximum", "official"):
        df = evaluate_folder(raw / "ir", raw / "vi", tmp_path / "raw_fused" / method, parallel=False)
        assert sorted(df["name"]) == sorted(PAIRS)
        for row in df.to_dict("records"):
            assert [row[m] for m in METRICS] == stage[(method, row["name"])], (method, row["name"])
    # and the CLI writes those rows too
    assert mda(["evaluate", "--ir", str(raw / "ir"), "--vi", str(raw / "vi"), "--fused",
                str(tmp_path / "raw_fused" / "average"), "-o", str(tmp_path / "average.csv"), "--no-ray"]) == 0
    assert (tmp_path / "average.csv").read_text().count("\n") == len(PAIRS) + 1

