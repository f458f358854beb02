"""Build registered folders (the register stage's output) for crop/stats tests.

Real data goes through the real register stage (:func:`registered_from_dataset`); tiny synthetic
folders get a manifest written with the stage's own schema (:func:`write_registered`), so neither
can drift from what the stage writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.common.ray_runtime import ray_session
from pipeline.data.contracts import MANIFEST_SCHEMA
from pipeline.data.images import find_pairs, write_image
from pipeline.data.register import register_dataset

_IDENTITY = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def write_registered(root: Path, pairs: Iterable[tuple[str, np.ndarray, np.ndarray]], rejected: Sequence[str] = ()) -> Path:
    """Write ``ir/<id>.png``, ``vi/<id>.png`` and a ``manifest.parquet`` with the register schema."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for pair_id, ir, vi in pairs:
        write_image(root / "ir" / f"{pair_id}.png", ir)
        write_image(root / "vi" / f"{pair_id}.png", vi)
        rows.append({"pair_id": pair_id, "ir_src": f"{pair_id}.png", "vi_src": f"{pair_id}.png",
                     "height": ir.shape[0], "width": ir.shape[1], "vi_channels": 1 if vi.ndim == 2 else vi.shape[2],
                     "transform": _IDENTITY, "align_score": None, "shift_px": 0.0, "corrected": False,
                     "status": "ok", "reason": None, "align_error": None})
    for pair_id in rejected:
        rows.append({"pair_id": pair_id, "ir_src": f"{pair_id}.png", "vi_src": None, "height": None, "width": None,
                     "vi_channels": None, "transform": None, "align_score": None, "shift_px": None,
                     "corrected": False, "status": "rejected", "reason": "missing_partner", "align_error": None})
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), root / "manifest.parquet")
    return root


def registered_from_dataset(dataset: Path, root: Path, count: int, rejected: Sequence[str] = ()) -> list[str]:
    """Run the real register stage on the first ``count`` pairs of a real ``ir/``+``vi/`` dataset.

    Each name in ``rejected`` gets an IR image without a visible partner, which the stage rejects.
    Returns the stems of the accepted pairs.
    """
    pairs, _ = find_pairs(dataset / "ir", dataset / "vi")
    chosen = pairs[:count]
    raw = root.parent / f"{root.name}_raw"
    for sub in ("ir", "vi"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    for p in chosen:
        os.symlink(p.ir.resolve(), raw / "ir" / p.ir.name)
        os.symlink(p.vi.resolve(), raw / "vi" / p.vi.name)
    for name in rejected:
        os.symlink(chosen[0].ir.resolve(), raw / "ir" / f"{name}{chosen[0].ir.suffix}")
    with ray_session(num_cpus=2):
        register_dataset(raw / "ir", raw / "vi", root, progress=False)
    return [p.stem for p in chosen]
