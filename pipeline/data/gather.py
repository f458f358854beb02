"""One raw folder from several datasets: ``out/{ir,vi}/<stem><ext>`` relative symbolic links to
every pair of ``root/<dataset>/{ir,vi}``, and ``out/datasets.json`` (stem -> dataset).

The register stage reads one raw folder; a recipe that trains on several datasets (the CPU
recipe: RoadScene, MSRS and TNO, with TNO-25 pinned to test by ``crop.test_list``) gathers them
first. Links, not copies: nothing is duplicated, and the links are relative so that the folder
hashes the same in every checkout. Stems must be unique across the datasets.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pipeline.common.config import ParamsError, param, read_settings, setting
from pipeline.data.images import find_pairs

DATASETS_FILE = "datasets.json"


def _names(value: Any, key: str) -> tuple[str, ...]:
    if not value or not all(isinstance(v, str) and v for v in value):
        raise ParamsError(f"params: '{key}' must be a non-empty list of folder names, got {value!r}")
    if len(set(value)) != len(value):
        raise ParamsError(f"params: '{key}' names a dataset twice: {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class GatherConfig:
    """The ``gather:`` section: ``root`` holding ``<dataset>/{ir,vi}`` and the ``datasets``."""

    root: str = setting("../shared/data", str)
    datasets: tuple[str, ...] = setting(["RoadScene", "MSRS", "TNO"], list, convert=_names)

    @classmethod
    def from_params(cls, cfg: Mapping[str, Any]) -> "GatherConfig":
        """Read and check the section (types only; :meth:`check_inputs` looks at the folders)."""
        return read_settings(cls, cfg, "gather")

    def check_inputs(self) -> dict[str, int]:
        """Each dataset folder has ``ir/`` and ``vi/`` with at least one pair; returns the counts.

        Raises:
            ParamsError: naming ``gather.datasets`` and the folder.
        """
        counts = {}
        for name in self.datasets:
            folder = Path(self.root) / name
            for sub in ("ir", "vi"):
                if not (folder / sub).is_dir():
                    raise ParamsError(f"params: 'gather.datasets': {folder / sub} is not a folder "
                                      f"(gather.root={self.root!r})")
            try:
                counts[name] = len(find_pairs(folder / "ir", folder / "vi")[0])
            except ValueError:  # no images at all
                counts[name] = 0
            if counts[name] == 0:
                raise ParamsError(f"params: 'gather.datasets': no IR/visible pair in {folder}")
        return counts


def gather(cfg: GatherConfig, out: str | Path) -> dict[str, int]:
    """Write the raw folder ``out`` (see the module docstring); returns dataset -> pairs linked.

    Raises:
        ValueError: a stem present in two datasets (named).
    """
    out = Path(out)
    seen: dict[str, str] = {}
    counts: dict[str, int] = {}
    links: list[tuple[Path, Path]] = []
    for name in cfg.datasets:
        root = Path(cfg.root) / name
        pairs = find_pairs(root / "ir", root / "vi")[0]
        counts[name] = len(pairs)
        for p in pairs:
            if p.stem in seen:
                raise ValueError(f"pair '{p.stem}' is in both {seen[p.stem]} and {name}: stems must be unique")
            seen[p.stem] = name
            links += [(out / "ir" / Path(p.ir).name, Path(p.ir)), (out / "vi" / Path(p.vi).name, Path(p.vi))]
    for sub in ("ir", "vi"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for old in (out / sub).iterdir():
            if old.is_symlink():
                old.unlink()
    for link, target in links:
        link.symlink_to(os.path.relpath(target.resolve(), link.parent.resolve()))
    (out / DATASETS_FILE).write_text(json.dumps(dict(sorted(seen.items())), indent=1) + "\n")
    return counts


def read_datasets(raw_dir: str | Path) -> dict[str, str]:
    """stem -> dataset of a gathered folder (``{}`` for a folder that was not gathered)."""
    path = Path(raw_dir) / DATASETS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
