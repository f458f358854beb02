"""run_stage: the stage scripts' common runner."""

from __future__ import annotations

from pipeline.common.config import ParamsError, param, section
from pipeline.common.stage import Arg, run_stage


def _stage(args, params):
    value = param(section(params, "s"), "n", int, where="s", minimum=1)
    if args.fail_with == "oserror":
        raise FileNotFoundError(f"{args.out}: missing")
    return f"s: n={value} -> {args.out}"


def _run(tmp_path, params_text, *extra):
    params = tmp_path / "params.yaml"
    params.write_text(params_text)
    return run_stage("s", "Stage s.\n\nmore", _stage, Arg("--out", "output"),
                     Arg("--fail-with", "failure to raise", {"default": None}),
                     argv=["--params", str(params), "--out", "o", *extra])


def test_success_prints_the_summary(tmp_path, capsys):
    assert _run(tmp_path, "s: {n: 3}\n") == 0
    assert capsys.readouterr().out.strip() == "s: n=3 -> o"


def test_user_errors_are_one_line_and_exit_1(tmp_path, capsys):
    assert _run(tmp_path, "s: {n: 0}\n") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["s: error: params: 's.n' must be >= 1, got 0"]
    assert _run(tmp_path, "s: {n: 2}\n", "--fail-with", "oserror") == 1
    assert capsys.readouterr().err.strip() == "s: error: o: missing"
    assert _run(tmp_path, "other: {}\n") == 1
    assert "missing section 's'" in capsys.readouterr().err
    assert issubclass(ParamsError, ValueError)


def test_outputs_are_checked_before_the_stage_runs(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("s: {n: 1}\n")
    (tmp_path / "plain").write_text("x")
    ran = []
    out = tmp_path / "plain" / "o.json"
    rc = run_stage("s", "Stage s.", lambda a, p: ran.append(1), Arg("--out", "output", output="file"),
                   argv=["--params", str(tmp_path / "params.yaml"), "--out", str(out)])
    assert rc == 1 and not ran
    assert capsys.readouterr().err.strip() == f"s: error: --out {out}: cannot be created, {tmp_path / 'plain'} is a file, not a folder"


def test_mlflow_stage_fails_in_one_line_when_the_server_is_away(tmp_path, capsys, monkeypatch):
    from mlflow_fixtures import free_port

    (tmp_path / "params.yaml").write_text("s: {n: 1}\n")
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    ran = []
    rc = run_stage("s", "Stage s.", lambda a, p: ran.append(1), mlflow=True, argv=["--params", str(tmp_path / "params.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and not ran and len(err) == 1
    assert err[0].startswith(f"s: error: MLflow tracking server {url} is not reachable")


def test_ctrl_c_exits_130_in_one_line(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("s: {n: 1}\n")

    def interrupted(args, params):
        raise KeyboardInterrupt

    assert run_stage("s", "Stage s.", interrupted, argv=["--params", str(tmp_path / "params.yaml")]) == 130
    assert capsys.readouterr().err.startswith("s: interrupted")
