"""pipeline.train.settings: the checked ``train:`` section and the workers' CPU share."""

from __future__ import annotations

import pytest
from train_fixtures import tiny_params

from pipeline.common.config import ParamsError
from pipeline.train.settings import TrainSettings, cpus_per_worker, train_settings


def test_code_defaults_match_params_yaml():
    from conftest import REPO

    from pipeline.common.config import load_params

    assert train_settings(load_params(REPO / "params.yaml")) == TrainSettings(), \
        "TrainSettings defaults must equal the train: section of params.yaml"


@pytest.mark.parametrize("bad", ["a'b", "x y", "-lead", "a/b", "", "n\"ame"])
def test_run_names_are_validated(tmp_path, bad):
    with pytest.raises(ParamsError, match="train.run_name"):
        train_settings(tiny_params(tmp_path, run_name=bad))
    assert train_settings(tiny_params(tmp_path, run_name="ok-Run_1.2")).run_name == "ok-Run_1.2"


def test_settings_are_checked_and_name_the_key(tmp_path):
    params = tiny_params(tmp_path)
    s = train_settings(params)
    assert s.num_workers == 1 and s.checkpoint_mode == "max"
    params["train"]["batch_size"] = 0
    with pytest.raises(ParamsError, match="train.batch_size"):
        train_settings(params)
    params["train"]["batch_size"] = 4
    params["train"]["checkpoint_metric"] = "accuracy"
    with pytest.raises(ParamsError, match="train.checkpoint_metric"):
        train_settings(params)
    assert train_settings(dict(params, train={"checkpoint_metric": "val_loss"})).checkpoint_mode == "min"
    assert TrainSettings.from_params(dict(params, train={})) == TrainSettings()


@pytest.mark.parametrize("cpus, workers, expected", [(2, 2, 0.5), (2, 1, 1.0), (16, 8, 1.0), (4, 2, 1.0), (3, 4, 0.5)])
def test_workers_leave_a_cpu_to_ray_data(cpus, workers, expected):
    got = cpus_per_worker(TrainSettings(num_workers=workers), cpus)
    assert got == expected
    assert cpus - got * workers >= 1 or got == 0.25
