"""The fault-injection suite's workspace: a tiny pipeline run once per module.

``workspace`` holds a ``params.yaml`` with small settings and the outputs of the register -> crop
-> stats stages on 8 generated pairs, made through the real stage scripts (in this process, on the
session's Ray). Tests write their own outputs elsewhere and compare with these. The pairs are
128x160 unless the test module sets ``WORKSPACE_SIZE`` (height, width): a module that must catch a
Ray task while it runs needs tasks that last longer than a 128x160 crop (about 25 ms).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from fault_fixtures import stage_argv, stage_main


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, request) -> Path:
    import ray
    from train_fixtures import tiny_params

    from pipeline.data.demo import generate_demo

    ws = tmp_path_factory.mktemp("faults")
    params = tiny_params(ws, epochs=1, batch_size=8)
    params["demo"].update(num_pairs=2, height=32, width=40)
    params["crop"].update(patch_size=32, stride=32, pairs_per_shard=2)
    params["ray"] = {"address": None, "num_cpus": 2}
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    height, width = getattr(request.module, "WORKSPACE_SIZE", (128, 160))
    generate_demo(ws / "raw", num_pairs=8, height=height, width=width, seed=0)
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        for name in ("register", "crop", "stats"):
            assert stage_main(name)(["--params", "params.yaml", *stage_argv(name, ws)]) == 0, name
    finally:
        os.chdir(cwd)
    return ws


