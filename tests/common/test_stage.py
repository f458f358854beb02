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
