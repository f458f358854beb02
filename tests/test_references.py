"""References point somewhere: every dotted ``pipeline.…`` name and every repository path named in
the code's docstrings and comments, the docs, the README and the pipeline files exists (issue 21)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Where references are read from.
SOURCES = [*sorted((REPO / "pipeline").rglob("*.py")), *sorted((REPO / "stages").glob("*.py")),
           *sorted((REPO / "bench").glob("*.py")), *sorted((REPO / "bench").glob("*.sh")),
           *sorted((REPO / "docs").glob("*.md")), REPO / "README.md", REPO / "params.yaml", REPO / "dvc.yaml",
           *sorted((REPO / "recipes").glob("*/*.yaml")), *sorted((REPO / "models").glob("*/*.md"))]
DOTTED = re.compile(r"\bpipeline(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
#: Folders of tracked files; a path under one of them must exist (outputs of the pipelines are not
#: under these, except the recipes' own outputs, skipped below).
PATH = re.compile(r"(?<![\w./-])((?:pipeline|stages|tests|bench|docs|recipes|models/pretrained|models/vgg16)"
                  r"/[A-Za-z0-9_./-]*[A-Za-z0-9_])")
GENERATED = ("bench/results", "recipes/cpu/data", "recipes/gpu/data", "recipes/cpu/eval", "recipes/gpu/eval",
             "recipes/cpu/models/best.pt", "recipes/gpu/models", "recipes/gpu/metrics", "recipes/cpu/ray_results",
             "recipes/cpu/mlflow.db", "recipes/gpu/mlflow.db", "models/pretrained/mda_gpu")


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def _references(pattern: re.Pattern[str]) -> list[tuple[str, str]]:
    found = []
    for path in SOURCES:
        for match in pattern.finditer(path.read_text()):
            found.append((path.relative_to(REPO).as_posix(), match.group(1) if match.groups() else match.group(0)))
    return found


def test_every_dotted_pipeline_name_resolves():
    dangling = sorted({(f, n.rstrip(".")) for f, n in _references(DOTTED) if not _resolves(n.rstrip("."))})
    assert not dangling, "names that point nowhere:\n" + "\n".join(f"{f}: {n}" for f, n in dangling)


@pytest.mark.parametrize("fragment", ["pipeline.weights", "pipeline/nowhere.py"])
def test_the_check_finds_a_dangling_reference(fragment):
    if "/" in fragment:
        assert not (REPO / fragment).exists() and PATH.search(f"see {fragment}.")
    else:
        assert not _resolves(fragment)


def test_every_repository_path_exists():
    dangling = []
    for f, ref in _references(PATH):
        ref = ref.split("::")[0].rstrip(".")
        if any(ch in ref for ch in "<>*{}$") or ref.startswith(GENERATED):
            continue
        if not (REPO / ref).exists() and not (REPO / ref).with_suffix(".py").exists():
            dangling.append(f"{f}: {ref}")
    assert not dangling, "paths that do not exist:\n" + "\n".join(sorted(set(dangling)))
