"""Helpers that build a registered folder (the register stage's layout) for crop/stats tests."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.images import find_pairs, read_ir, read_visible, write_image


def write_registered(root: Path, pairs: Iterable[tuple[str, np.ndarray, np.ndarray]], rejected: Sequence[str] = ()) -> Path:
    """Write ``ir/<id>.png``, ``vi/<id>.png`` and ``manifest.parquet`` (+ rejected rows) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for pair_id, ir, vi in pairs:
        write_image(root / "ir" / f"{pair_id}.png", ir)
        write_image(root / "vi" / f"{pair_id}.png", vi)
        rows.append({"pair_id": pair_id, "status": "ok", "height": ir.shape[0], "width": ir.shape[1], "reason": ""})
    for pair_id in rejected:
        rows.append({"pair_id": pair_id, "status": "rejected", "height": 0, "width": 0, "reason": "test"})
    pq.write_table(pa.Table.from_pylist(rows), root / "manifest.parquet")
    return root


def registered_from_dataset(dataset: Path, root: Path, count: int, rejected: Sequence[str] = ()) -> list[str]:
    """Copy the first ``count`` pairs of a real ``ir/``+``vi/`` dataset into the registered layout."""
    pairs, _ = find_pairs(dataset / "ir", dataset / "vi")
    chosen = pairs[:count]
    write_registered(root, ((p.stem, read_ir(p.ir), read_visible(p.vi)) for p in chosen), rejected)
    return [p.stem for p in chosen]
