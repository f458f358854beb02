"""Shared fixtures: paths to the real datasets in ../shared and one Ray instance per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MDA_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"


def shared_dataset(name: str) -> Path:
    """Return ``../shared/data/<name>`` or skip the test with the reason."""
    path = DATA / name
    if not (path / "ir").is_dir() or not (path / "vi").is_dir():
        pytest.skip(f"real dataset {path} not available (../shared is absent on this machine)")
    return path


def shared_file(*parts: str) -> Path:
    """Return a file under ``../shared`` or skip the test with the reason."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available (../shared is absent on this machine)")
    return path


@pytest.fixture()
def ray_local():
    """A local Ray instance (2 CPUs) shared by the tests that need one.

    Started on first use and left running for later tests (re-started only after a test that used
    ``ray_fresh``). Stages called inside tests see ``ray.is_initialized()`` and reuse it.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray


@pytest.fixture()
def ray_fresh():
    """Guarantee no Ray is initialised in this process (for tests that start their own cluster)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield ray
    if ray.is_initialized():
        ray.shutdown()
