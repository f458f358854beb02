"""The files the data stages hand to each other: their schemas and the one reader of each.

- ``register`` -> ``<registered>/{ir,vi}/<pair_id>.png`` and ``manifest.parquet``
  (:data:`MANIFEST_SCHEMA`): :func:`read_accepted_pairs`, :func:`registered_paths`,
  :func:`read_registered_pair`.
- ``crop`` -> ``<patches>/part-*.parquet`` (:data:`PATCH_SCHEMA`; ``ir``/``vi`` hold ``size*size``
  ``uint8`` bytes, row-major): :func:`decode_patches`; and ``split.json`` (pair ids per split in
  :data:`SPLITS`): :func:`read_split`.
- ``stats`` -> per-patch and per-image adaptive weights named ``w_<name>`` / ``img_w_<name>`` for
  ``name`` in :data:`WEIGHT_NAMES`.

Readers raise ``FileNotFoundError`` naming the missing file (and the stage that writes it) and
``ValueError`` naming the file and what is wrong with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.common.atomic_io import read_json_object
from pipeline.data.images import read_pair

#: The splits of ``split.json``, by pair.
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Adaptive loss weights of a patch or image (each pair of ``*_ir``/``*_vi`` sums to 1).
WEIGHT_NAMES: tuple[str, ...] = ("int_ir", "int_vi", "det_ir", "det_vi")
#: ``stats.weighting``: the adaptive weights, or the ablation's constant 0.5/0.5 (the stats stage's
#: image/patch weights and the loss's per-pixel patch maps alike).
WEIGHTINGS: tuple[str, ...] = ("adaptive", "fixed")

#: Columns of a crop shard: one row per patch.
PATCH_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("split", pa.string()),
        ("y", pa.int32()),
        ("x", pa.int32()),
        ("size", pa.int32()),
        ("ir", pa.binary()),
        ("vi", pa.binary()),
    ]
)

#: Columns of ``manifest.parquet``: one row per pair found, accepted (``status == "ok"``) or
#: rejected (``status == "rejected"``, ``reason`` a code). ``ir_src``/``vi_src`` are the source
#: files, relative to the working folder of the run when inside it (so a DVC run's manifest does
#: not depend on where the project is checked out). ``transform`` is the estimated IR ->
#: visible warp (2x3 affine, row-major; the ECC translation, or in ``correct`` mode the rigid fit of
#: a confident pair; identity when no estimate), applied to the written visible image iff
#: ``corrected``; ``shift_px`` its largest displacement over the four corners and the centre;
#: ``align_score`` the gradient correlation of the ECC estimate; ``align_error`` the refusal reason
#: (null when confident or not checked). The alignment columns (null for rejected pairs; all but
#: ``align_mode`` null when ``register.align`` is ``off``):
#:
#: - ``align_mode``: ``off``, ``check`` or ``correct``;
#: - ``confident``: the estimate is proven (both estimators agree, see ``pipeline.data.align``);
#: - ``align_reason``: ``agree: ...`` or the refusal code (``ecc_failed``, ``implausible_shift``,
#:   ``low_score``, ``disagree``) and its figures;
#: - ``ecc_shift``, ``mi_shift``: the two estimates (dx, dy) in pixels (``ecc_shift`` null when
#:   the ECC failed);
#: - ``identity_score``: gradient correlation of the pair as decoded;
#: - ``disagreement_px``: largest per-axis difference of the two estimates.
MANIFEST_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("ir_src", pa.string()),
        ("vi_src", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("vi_channels", pa.int32()),
        ("transform", pa.list_(pa.float64())),
        ("align_score", pa.float64()),
        ("shift_px", pa.float64()),
        ("corrected", pa.bool_()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("align_error", pa.string()),
        ("align_mode", pa.string()),
        ("confident", pa.bool_()),
        ("align_reason", pa.string()),
        ("ecc_shift", pa.list_(pa.float64())),
        ("mi_shift", pa.list_(pa.float64())),
        ("identity_score", pa.float64()),
        ("disagreement_px", pa.float64()),
    ]
)


# ----------------------------------------------------------------------------- register output


def read_accepted_pairs(registered_dir: str | Path) -> list[dict[str, Any]]:
    """The accepted pairs of a registered folder, from its ``manifest.parquet``.

    Returns:
        ``[{"pair_id": str, "height": int, "width": int}]`` of the rows with ``status == "ok"``,
        sorted by ``pair_id``.

    Raises:
        FileNotFoundError: no ``manifest.parquet``.
        ValueError: a required column is missing, or no pair has ``status == "ok"``.
    """
    path = Path(registered_dir) / "manifest.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"registered manifest not found: {path} (run the register stage first)")
    table = pq.read_table(path)
    needed = ["pair_id", "status", "height", "width"]
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    rows = [r for r in table.select(needed).to_pylist() if r["status"] == "ok"]
    if not rows:
        raise ValueError(f"{path}: no pair with status 'ok' (every pair was rejected by the register stage)")
    out = [{"pair_id": str(r["pair_id"]), "height": int(r["height"]), "width": int(r["width"])} for r in rows]
    return sorted(out, key=lambda r: r["pair_id"])


def registered_paths(registered_dir: str | Path, pair_id: str) -> tuple[Path, Path]:
    """``(ir, vi)`` file paths of a registered pair (``<dir>/ir/<id>.png``, ``<dir>/vi/<id>.png``)."""
    root = Path(registered_dir)
    return root / "ir" / f"{pair_id}.png", root / "vi" / f"{pair_id}.png"


def read_registered_pair(registered_dir: str | Path, pair_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a registered pair: ``uint8`` IR (H, W) and visible (H, W, 3) BGR or (H, W).

    Raises:
        pipeline.data.images.ImageError: a file is missing or unreadable, or the sizes differ.
    """
    return read_pair(*registered_paths(registered_dir, pair_id))


# ----------------------------------------------------------------------------- crop output


def read_split(path: str | Path) -> dict[str, Any]:
    """Read the crop stage's ``split.json``; every split in :data:`SPLITS` is a list of pair ids.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: not a JSON object, or a split is missing or not a list of strings.
    """
    split = read_json_object(path, "split file", hint="run the crop stage")
    for name in SPLITS:
        ids = split.get(name)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError(f"{path}: expected a list of pair ids under '{name}'")
    return split


def column_list(batch: Any, name: str) -> list[Any]:
    """One column of a batch (pyarrow table, dict of numpy arrays or of lists) as a Python list."""
    col = batch[name]
    if hasattr(col, "to_pylist"):
        return col.to_pylist()
    if hasattr(col, "tolist"):
        return col.tolist()
    return list(col)


def decode_patches(column: Sequence[bytes], size: int) -> np.ndarray:
    """Turn an ``ir``/``vi`` binary column into a ``uint8`` (N, size, size) array.

    Raises:
        ValueError: the bytes do not hold ``N`` patches of ``size x size``.
    """
    if len(column) == 0:
        return np.zeros((0, size, size), np.uint8)
    flat = np.frombuffer(b"".join(bytes(v) for v in column), dtype=np.uint8)
    if flat.size != len(column) * size * size:
        raise ValueError(f"patch column holds {flat.size} bytes, expected {len(column)} x {size}x{size}")
    return flat.reshape(len(column), size, size)
