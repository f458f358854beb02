"""dvc.yaml names every module a stage runs, and no more than the stage imports (by folder or file)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _module_file(module: str) -> Path | None:
    base = REPO / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """``pipeline.*`` modules imported anywhere in a file (also inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pipeline")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from pipeline.data import stats`
    return found


def import_closure(script: Path) -> set[Path]:
    """Every file of ``pipeline/`` that running ``script`` may import (package ``__init__`` excluded)."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for module in _imports(todo.pop()):
            f = _module_file(module)
            if f is not None and f not in seen:
                seen.add(f)
                todo.append(f)
    return {f for f in seen if f.name != "__init__.py" or f.parent == REPO / "pipeline"}


#: the pipelines: the demo's and the CPU recipe's (its paths are relative to its folder)
PIPELINES = {"dvc.yaml": "", "recipes/cpu/dvc.yaml": "../../", "recipes/gpu/dvc.yaml": "../../"}


def _stages(pipeline: str = "dvc.yaml") -> dict[str, dict]:
    return yaml.safe_load((REPO / pipeline).read_text())["stages"]


def _repo_deps(pipeline: str, stage: str) -> list[str]:
    prefix = PIPELINES[pipeline]
    deps = [d[len(prefix):] for d in _stages(pipeline)[stage]["deps"] if d.startswith(prefix)]
    return [d for d in deps if d.startswith(("pipeline", "stages/"))]


@pytest.mark.parametrize("pipeline,stage", [(p, s) for p in PIPELINES for s in sorted(_stages(p))])
def test_stage_deps_cover_exactly_the_code_it_imports(pipeline, stage):
    deps = _repo_deps(pipeline, stage)
    script = REPO / "stages" / f"{stage}.py"
    assert f"stages/{stage}.py" in deps
    needed = {f.relative_to(REPO).as_posix() for f in import_closure(script)} - {"pipeline/__init__.py"}
    covered = lambda f: any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)  # noqa: E731
    missing = sorted(f for f in needed if not covered(f))
    assert not missing, f"dvc.yaml stage '{stage}' lacks deps for {missing}"
    unused = sorted(d for d in deps if d != f"stages/{stage}.py" and not any(covered_by(f, d) for f in needed))
    assert not unused, f"dvc.yaml stage '{stage}' depends on code it never imports: {unused}"


def covered_by(f: str, d: str) -> bool:
    return f == d or f.startswith(d.rstrip("/") + "/")


def test_training_code_digest_hashes_what_dvc_tracks():
    from pipeline.train.runs import TRAIN_CODE

    for pipeline in PIPELINES:
        deps = {d for d in _repo_deps(pipeline, "train") if d.startswith("pipeline/")}
        assert {f"pipeline/{p}" for p in TRAIN_CODE} == deps, pipeline


def test_alignment_code_does_not_invalidate_training():
    deps = _stages()["train"]["deps"]
    assert "pipeline/data" not in deps and not any(d.startswith("pipeline/data/register") for d in deps)
