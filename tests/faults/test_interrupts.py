"""SIGINT (Ctrl-C, ``kill -INT``) during every stage: the stage stops with exit 130 and one line,
or had already finished (exit 0, complete outputs); a previous output is never left half-replaced
and no staging folder stays behind.

Each stage runs as DVC runs it (a child process); the signal is sent a moment after the stage's
"outputs checked, running" log line, i.e. while it works.
"""

from __future__ import annotations

import json
import shutil

import pytest
from fault_fixtures import files, interrupt_when, leftovers, stage_cmd

pytestmark = pytest.mark.faults

#: Output of each stage (relative to the run folder) and seconds to wait after "running".
STAGES = {
    "params": ("params_check.json", 0.0),
    "demo": ("demo", 0.2),
    "register": ("registered", 2.0),
    "crop": ("patches", 2.0),
    "stats": ("stats", 2.0),
    "train": ("models", 8.0),  # Ray Train is starting its workers
    "evaluate": ("eval", 2.0),
    "promote": ("promotion.json", 0.5),
}


@pytest.fixture(scope="module")
def trained(workspace):
    """A tiny model logged to the workspace's default MLflow store, its train.json and eval means."""
    import os

    import mlflow
    import torch
    from train_fixtures import TINY_MODEL

    from pipeline.common.mlflow_store import configure_mlflow
    from pipeline.model.network import build_model
    from pipeline.model.pyfunc import log_fusion_model
    from pipeline.model.weights import save_checkpoint

    cwd, previous = os.getcwd(), mlflow.get_tracking_uri()
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(workspace)
    try:
        configure_mlflow(workspace, experiment="faults")
        torch.manual_seed(0)
        args = dict(TINY_MODEL.get("args") or {})
        ckpt = save_checkpoint(workspace / "best.pt", build_model("mda", **args), "mda", args)
        with mlflow.start_run() as run:
            model_uri = log_fusion_model(ckpt, name="model")
        (workspace / "train.json").write_text(json.dumps(
            {"run_id": run.info.run_id, "model_uri": model_uri, "checkpoint": str(ckpt)}))
        means = {"EN": 6.5, "VIF": 0.6, "Qabf": 0.4, "SSIM": 1.2}
        (workspace / "eval_means.json").write_text(json.dumps({"ours": means, "average": means}))
    finally:
        os.chdir(cwd)
        mlflow.set_tracking_uri(previous)
        # set_tracking_uri also exports MLFLOW_TRACKING_URI: put the environment back as it was, so
        # the stage subprocesses below do not inherit another test's store
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env
    return workspace


@pytest.mark.parametrize("stage", list(STAGES))
def test_sigint_during_stage(trained, tmp_path, stage, ray_fresh):
    # ray_fresh: no Ray in this process while the stage starts its own (two local instances make
    # Ray's own actors in the child print "Found multiple active Ray instances")
    ws, (output, delay) = trained, STAGES[stage]
    out = tmp_path / "run"
    out.mkdir()
    previous = ws / {"params": "params_check.json", "demo": "raw", "train": "models"}.get(stage, output)
    if previous.is_dir():  # a complete previous output that must survive an interrupted run
        shutil.copytree(previous, out / output)
    elif previous.is_file():
        shutil.copy(previous, out / output)
    before = files(out / output)
    rc, err, sent = interrupt_when(stage_cmd(stage, ws, out), ws, "outputs checked, running", delay)
    assert "Traceback" not in err, err[-3000:]
    after = files(out / output)
    if rc == 130:
        assert sent and f"{stage}: interrupted" in err
        assert after == before or (stage == "demo" and set(before) <= set(after)), "output half-replaced"
    else:
        assert rc == 0, err[-3000:]  # finished before the signal arrived: complete outputs
        assert after, f"{stage} finished without its output"
    assert leftovers(out) == []
    print(f"{stage}: exit {rc} (signal {'sent' if sent else 'not sent: finished first'})")


@pytest.mark.parametrize("stage", ["register", "train"])
def test_sigterm_during_stage_stops_it_cleanly(trained, tmp_path, stage, ray_fresh):
    """``timeout`` and a caller giving up send SIGTERM: the stage stops like on Ctrl-C (issue 22)."""
    import signal

    ws, (output, delay) = trained, STAGES[stage]
    out = tmp_path / "run"
    out.mkdir()
    rc, err, sent = interrupt_when(stage_cmd(stage, ws, out), ws, "outputs checked, running", delay,
                                   timeout=60, sig=signal.SIGTERM)
    assert "Traceback" not in err, err[-3000:]
    assert (rc == 130 and sent and f"{stage}: interrupted" in err) or (rc == 0 and not sent), (rc, err[-2000:])
    assert leftovers(out) == []


def test_stage_whose_caller_is_killed_does_not_run_on(trained, tmp_path, ray_fresh):
    """A stage whose parent (``dvc repro``, a shell) is SIGKILLed gets SIGTERM and ends: no orphan."""
    import os
    import signal
    import subprocess
    import time

    ws = trained
    out = tmp_path / "run"
    out.mkdir()
    cmd = " ".join(stage_cmd("train", ws, out))
    shell = subprocess.Popen(["sh", "-c", f"{cmd} 2>{tmp_path / 'err.txt'} & echo $!; wait"], cwd=ws,
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    pid = int(shell.stdout.readline())
    deadline = time.monotonic() + 120
    err = tmp_path / "err.txt"
    while time.monotonic() < deadline and not (err.is_file() and "outputs checked, running" in err.read_text()):
        time.sleep(0.2)
    time.sleep(3)
    shell.kill()  # SIGKILL: the parent cannot pass anything on
    shell.wait()
    gone = time.monotonic() + 40
    while time.monotonic() < gone:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"the stage (pid {pid}) still ran 40 s after its parent was killed")
    assert "train: interrupted" in (tmp_path / "err.txt").read_text()
