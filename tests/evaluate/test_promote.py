"""Gated promotion in the MLflow Model Registry, against a temporary sqlite store.

The registered models are real MDA networks (a narrow width keeps them small) logged through the
training's pyfunc wrapper; the evaluation means fed to the gate are chosen per test.
"""

from __future__ import annotations

import json

import pytest

from pipeline.common.config import ParamsError
from pipeline.evaluate.promote import (
    CHALLENGER,
    CHAMPION,
    TAG_DECISION,
    TAG_REASONS,
    PromoteConfig,
    compare,
    promote,
)

EXPERIMENT = "test-promotion"
CFG = PromoteConfig(model_name="unused", primary="VIF", gates={"Qabf": 0.01, "SSIM": 0.02})


def _means(vif: float, qabf: float, ssim: float, **extra: float) -> dict[str, float]:
    return {"EN": 6.5, "VIF": vif, "Qabf": qabf, "SSIM": ssim, **extra}


# ----------------------------------------------------------------------------------------- pure


def test_compare_primary_must_improve_and_gates_allow_tolerance():
    ref = _means(0.60, 0.40, 1.00)
    ok, reasons = compare(_means(0.61, 0.395, 0.985), ref, CFG)  # within both tolerances
    assert ok and len(reasons) == 3 and all("meets" in r for r in reasons)
    ok, reasons = compare(_means(0.60, 0.45, 1.10), ref, CFG)  # primary only equal
    assert not ok and "VIF (primary): 0.6000 fails" in reasons[0]
    ok, reasons = compare(_means(0.70, 0.38, 1.00), ref, CFG)  # Qabf 0.02 worse > 0.01 tolerance
    assert not ok and any(r.startswith("Qabf (gate)") and "fails" in r for r in reasons)
    ok, reasons = compare(_means(0.70, 0.40, 0.97), ref, CFG)  # SSIM 0.03 worse > 0.02
    assert not ok and any(r.startswith("SSIM (gate)") and "fails" in r for r in reasons)


def test_compare_reference_without_a_metric_fails_closed():
    ok, reasons = compare(_means(0.9, 0.9, 1.9), {"VIF": 0.1, "Qabf": 0.1}, CFG)
    assert not ok and any("SSIM" in r and "no recorded value" in r for r in reasons)
    ok, reasons = compare({"VIF": 0.9, "Qabf": float("nan"), "SSIM": 1.9}, _means(0.1, 0.1, 0.1), CFG)
    assert not ok and any(r.startswith("Qabf: the candidate has no finite value") for r in reasons)


def test_min_improvement_margin():
    cfg = PromoteConfig(primary="VIF", min_improvement=0.05, gates={})
    assert not compare({"VIF": 0.64}, {"VIF": 0.60}, cfg)[0]
    assert compare({"VIF": 0.66}, {"VIF": 0.60}, cfg)[0]


def test_params_validation_names_the_key():
    with pytest.raises(ParamsError, match=r"promote\.gates\.Qabf"):
        PromoteConfig.from_params({"gates": {"Qabf": -0.1}})
    with pytest.raises(ParamsError, match=r"promote\.gates\.SSIM"):
        PromoteConfig.from_params({"gates": {"SSIM": "loose"}})
    for bad in ("", "a' or name != '", "two words"):
        with pytest.raises(ParamsError, match=r"promote\.model_name"):
            PromoteConfig.from_params({"model_name": bad})
    cfg = PromoteConfig.from_params({"model_name": "x", "primary": "Qabf", "gates": {"VIF": 0}})
    assert cfg.compared_metrics() == ["Qabf", "VIF"] and cfg.gates == {"VIF": 0.0}


# ------------------------------------------------------------------------------------ registry


def _cfg(name: str) -> PromoteConfig:
    return PromoteConfig(model_name=name, primary="VIF", gates={"Qabf": 0.01, "SSIM": 0.02})


def _aliases(name: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return {k: str(v) for k, v in MlflowClient().get_registered_model(name).aliases.items()}


def _eval(ours: dict[str, float], average: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    return {"average": average or _means(0.50, 0.35, 1.20), "ours": ours}


def test_first_version_becomes_champion_only_if_it_beats_the_pixel_average(mlflow_store, logged_models):
    from mlflow import MlflowClient

    client = MlflowClient()
    # below the baseline on the primary metric: challenger, no champion
    d = promote(logged_models[0], _eval(_means(0.45, 0.50, 1.30)), _cfg("first-fails"))
    assert d.decision == CHALLENGER and d.created and d.version == "1"
    assert "baseline average" in d.compared_with
    v = client.get_model_version("first-fails", "1")
    assert v.tags[TAG_DECISION] == CHALLENGER and "VIF (primary): 0.4500 fails" in v.tags[TAG_REASONS]
    assert _aliases("first-fails") == {CHALLENGER: "1"}

    # above the baseline on every compared metric: champion
    d = promote(logged_models[0], _eval(_means(0.55, 0.36, 1.19)), _cfg("first-passes"))
    assert d.decision == CHAMPION and d.promoted
    assert str(client.get_model_version_by_alias("first-passes", CHAMPION).version) == "1"
    v = client.get_model_version("first-passes", "1")
    assert float(v.tags["eval.VIF"]) == pytest.approx(0.55) and v.tags[TAG_DECISION] == CHAMPION
    assert v.run_id == logged_models[0]["run_id"]


def test_gate_both_ways_moves_aliases(mlflow_store, logged_models):
    from mlflow import MlflowClient

    client, cfg = MlflowClient(), _cfg("gated")
    d1 = promote(logged_models[0], _eval(_means(0.60, 0.40, 1.25)), cfg)
    assert (d1.version, d1.decision) == ("1", CHAMPION)

    # better on VIF, Qabf within its tolerance: champion moves to version 2
    d2 = promote(logged_models[1], _eval(_means(0.65, 0.395, 1.25)), cfg)
    assert (d2.version, d2.decision) == ("2", CHAMPION) and d2.compared_with == "champion v1"
    assert d2.reference["VIF"] == pytest.approx(0.60)  # read back from version 1's tags
    assert str(client.get_model_version_by_alias("gated", CHAMPION).version) == "2"

    # better on VIF but Qabf 0.05 worse than the champion: challenger, champion stays on 2
    d3 = promote(logged_models[2], _eval(_means(0.70, 0.345, 1.25)), cfg)
    assert (d3.version, d3.decision) == ("3", CHALLENGER)
    assert _aliases("gated") == {CHAMPION: "2", CHALLENGER: "3"}
    reasons = client.get_model_version("gated", "3").tags[TAG_REASONS]
    assert "Qabf (gate): 0.3450 fails >= champion v2 0.3950 - 0.01" in reasons


def test_champion_from_another_test_set_is_not_the_reference(mlflow_store, logged_models):
    from mlflow import MlflowClient

    from pipeline.evaluate.promote import TAG_TEST_SET

    cfg = _cfg("sets")
    d1 = promote(logged_models[0], _eval(_means(0.90, 0.60, 1.40)), cfg, test_set="a" * 64)
    assert d1.decision == CHAMPION
    assert MlflowClient().get_model_version("sets", "1").tags[TAG_TEST_SET] == "a" * 64
    # worse than v1's numbers, but those come from another test set: the baseline decides
    d2 = promote(logged_models[1], _eval(_means(0.65, 0.40, 1.25)), cfg, test_set="b" * 64)
    assert d2.decision == CHAMPION and d2.compared_with == "baseline average"
    assert "champion v1 was evaluated on another test set" in d2.reasons[0] and d2.reference["VIF"] == pytest.approx(0.50)
    # same test set as the new champion: compared with it, and VIF is not better
    d3 = promote(logged_models[2], _eval(_means(0.64, 0.40, 1.25)), cfg, test_set="b" * 64)
    assert d3.decision == CHALLENGER and d3.compared_with == "champion v2"


def test_promote_twice_for_the_same_model_creates_no_second_version(mlflow_store, logged_models, tmp_path):
    from mlflow import MlflowClient

    from pipeline.evaluate.promote import write_decision

    cfg = _cfg("idem")
    first = promote(logged_models[0], _eval(_means(0.60, 0.40, 1.25)), cfg)
    again = promote(logged_models[0], _eval(_means(0.60, 0.40, 1.25)), cfg)
    assert first.created and not again.created
    assert (again.version, again.decision) == (first.version, first.decision)
    assert again.reasons == first.reasons
    assert len(MlflowClient().search_model_versions("name = 'idem'")) == 1
    out = json.loads(write_decision(tmp_path / "promotion.json", again).read_text())
    assert out["version"] == "1" and out["decision"] == CHAMPION and out["promoted"] is True


def test_promote_stage_script(mlflow_store, logged_models, tmp_path):
    from stages.promote import main

    (tmp_path / "train.json").write_text(json.dumps({**logged_models[1], "checkpoint": "unused.pt"}))
    (tmp_path / "eval.json").write_text(json.dumps(_eval(_means(0.61, 0.41, 1.21))))
    (tmp_path / "params.yaml").write_text("promote:\n  model_name: staged\n  primary: VIF\n  gates: {Qabf: 0.01}\n")
    argv = ["--params", str(tmp_path / "params.yaml"), "--train-info", str(tmp_path / "train.json"),
            "--eval-metrics", str(tmp_path / "eval.json"), "--out", str(tmp_path / "out" / "promotion.json")]
    assert main(argv) == 0
    out = json.loads((tmp_path / "out" / "promotion.json").read_text())
    assert out["model_name"] == "staged" and out["decision"] == CHAMPION
    assert out["metrics"]["VIF"] == pytest.approx(0.61) and out["reference"]["VIF"] == pytest.approx(0.50)

    (tmp_path / "eval.json").write_text(json.dumps({"average": _means(0.5, 0.3, 1.0)}))
    assert main(argv) == 1  # no 'ours' entry: one-line error, no traceback


def test_missing_model_uri_is_a_clear_error(mlflow_store, logged_models):
    bad = {"run_id": logged_models[0]["run_id"], "model_uri": "models:/m-0000000000000000000000000000dead"}
    with pytest.raises(ValueError, match="cannot register models:/m-0+dead as 'broken'"):
        promote(bad, _eval(_means(0.6, 0.4, 1.25)), _cfg("broken"))
    with pytest.raises(ValueError, match="lacks 'run_id' or 'model_uri'"):
        promote({"run_id": "x"}, _eval(_means(0.6, 0.4, 1.25)), _cfg("broken"))


# ------------------------------------------------------------------------------ failed reads


def _two_versions(name: str, logged_models) -> None:
    """v1 (logged_models[0]) is the champion, v2 (logged_models[1], worse) the challenger."""
    assert promote(logged_models[0], _eval(_means(0.80, 0.60, 1.40)), _cfg(name)).decision == CHAMPION
    assert promote(logged_models[1], _eval(_means(0.60, 0.40, 1.25)), _cfg(name)).decision == CHALLENGER


def _versions(name: str, client=None) -> list[str]:
    from mlflow import MlflowClient

    client = client or MlflowClient()
    return sorted(str(v.version) for v in client.search_model_versions(f"name = '{name}'"))


@pytest.mark.parametrize("method", ["search_model_versions", "get_registered_model", "get_model_version"])
def test_a_failed_registry_read_aborts_and_moves_nothing(mlflow_store, logged_models, monkeypatch, method):
    """Issue 13: a read that fails is "could not ask", never "not found": no v3, no new champion."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    from pipeline.common.mlflow_store import MlflowUnavailable

    name = f"outage-{method.replace('_', '-')}"
    _two_versions(name, logged_models)

    def refuse(self, *args, **kwargs):
        raise MlflowException("API request failed: Connection refused\n(details)", TEMPORARILY_UNAVAILABLE)

    monkeypatch.setattr(MlflowClient, method, refuse)
    # a new run that beats the pixel baseline but not the champion (before: registered as v3 and
    # made champion, "no champion yet: compared with the pixel baseline")
    with pytest.raises(MlflowUnavailable, match="promotion aborted, aliases and versions untouched") as err:
        promote(logged_models[2], _eval(_means(0.70, 0.50, 1.30)), _cfg(name))
    assert "\n" not in str(err.value) and "Connection refused" in str(err.value)
    monkeypatch.undo()
    assert _versions(name) == ["1", "2"]
    assert _aliases(name) == {CHAMPION: "1", CHALLENGER: "2"}


def test_only_resource_does_not_exist_means_no_champion(mlflow_store, logged_models, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR

    from pipeline.common.mlflow_store import MlflowUnavailable
    from pipeline.evaluate.promote import champion_version

    client = MlflowClient()
    assert champion_version(client, "never-registered") is None  # RESOURCE_DOES_NOT_EXIST
    _two_versions("only-rdne", logged_models)
    assert str(champion_version(client, "only-rdne").version) == "1"
    monkeypatch.setattr(MlflowClient, "get_registered_model",
                        lambda self, name: (_ for _ in ()).throw(MlflowException("db locked", INTERNAL_ERROR)))
    with pytest.raises(MlflowUnavailable, match="could not read the registered model 'only-rdne': db locked"):
        champion_version(client, "only-rdne")


@pytest.mark.slow
def test_mlflow_server_stopped_mid_promotion_moves_nothing(tmp_path, logged_models, monkeypatch):
    """A real ``mlflow server`` stops after the first read of ``promote``: one line, nothing moved."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow_fixtures import MlflowServer

    import pipeline.evaluate.promote as promote_mod
    from pipeline.common.mlflow_store import MlflowUnavailable

    server = MlflowServer(tmp_path / "server")
    previous = mlflow.get_tracking_uri()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        mlflow.set_tracking_uri(server.url)
        mlflow.set_experiment("promotion-outage")
        models = [log_test_model(tmp_path / f"m{i}", seed=i) for i in range(3)]
        _two_versions("served", models)
        original = promote_mod.champion_version

        def stop_then_read(client, name):
            server.stop()  # after find_version succeeded, before the champion is read
            return original(client, name)

        monkeypatch.setattr(promote_mod, "champion_version", stop_then_read)
        with pytest.raises(MlflowUnavailable) as err:
            promote(models[2], _eval(_means(0.70, 0.50, 1.30)), _cfg("served"))
        assert server.url in str(err.value) and "\n" not in str(err.value)
    finally:
        server.stop()
        mlflow.set_tracking_uri(previous)
        mlflow.set_experiment(EXPERIMENT)
    stored = MlflowClient(tracking_uri=server.sqlite_uri, registry_uri=server.sqlite_uri)
    assert _versions("served", stored) == ["1", "2"]
    assert {k: str(v) for k, v in stored.get_registered_model("served").aliases.items()} == {CHAMPION: "1", CHALLENGER: "2"}


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """A fresh sqlite tracking + registry store for this module (``MLFLOW_TRACKING_URI``)."""
    import mlflow

    from pipeline.common.mlflow_store import configure_mlflow

    root = tmp_path_factory.mktemp("mlflow")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    previous = mlflow.get_tracking_uri()
    configure_mlflow(root, experiment=EXPERIMENT)
    yield root
    mp.undo()
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def logged_models(mlflow_store, tmp_path_factory):
    """Three training runs, each with a logged model: ``[{"run_id", "model_uri"}, ...]``."""
    return [log_test_model(tmp_path_factory.mktemp(f"model{i}"), seed=i) for i in range(3)]


def log_test_model(folder, seed: int) -> dict[str, str]:
    """Log a small MDA network as the train stage does; return ``{"run_id", "model_uri"}``."""
    import mlflow
    import torch

    from pipeline.model.pyfunc import log_fusion_model
    from pipeline.model.network import build_model
    from pipeline.model.weights import save_checkpoint

    torch.manual_seed(seed)
    args = {"width": 8, "reduction": 4, "up2_channels": 4, "up4_channels": 4}
    ckpt = save_checkpoint(folder / "best.pt", build_model("mda", **args), "mda", args)
    with mlflow.start_run() as run:
        model_uri = log_fusion_model(ckpt, name="model")
    return {"run_id": run.info.run_id, "model_uri": model_uri}
