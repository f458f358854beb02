"""Training and validation data for the ``train`` stage.

Training reads, by ``train.sampler``, either the patch table of the ``stats`` stage
(``data/stats/patches/part-*.parquet``) with Ray Data, keeping the ``split == "train"`` rows and
turning each batch into float tensors on the worker (``PatchCollate``), or the whole registered
``train`` images, from which each worker draws random crops with flips (``CropSampler``). Validation uses whole registered images of the ``val`` pairs
(``data/registered`` + ``data/patches/split.json``) with the image-level adaptive weights of
``data/stats/images.parquet``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from pipeline.common.ray_runtime import configure_data_context
from pipeline.data.contracts import WEIGHT_NAMES as WEIGHT_KEYS
from pipeline.data.contracts import decode_patches as decode_bytes
from pipeline.data.contracts import read_registered_pair, read_split
from pipeline.data.images import split_luma

#: ``train.sample_weights`` -> prefix of the stats stage's weight columns used as the loss weights:
#: ``image``: the image-level weights of the patch's source pair (``img_w_*``); ``patch``: the
#: patch's own weights (``w_*``).
WEIGHT_PREFIXES: dict[str, str] = {"image": "img_w_", "patch": "w_"}


def weight_columns(sample_weights: str = "image") -> tuple[str, ...]:
    """The patch-table columns holding the loss weights for ``train.sample_weights``.

    Raises:
        ValueError: an unknown ``sample_weights``.
    """
    if sample_weights not in WEIGHT_PREFIXES:
        raise ValueError(f"train.sample_weights must be one of {sorted(WEIGHT_PREFIXES)}, got {sample_weights!r}")
    return tuple(f"{WEIGHT_PREFIXES[sample_weights]}{k}" for k in WEIGHT_KEYS)


def patch_columns(sample_weights: str = "image") -> tuple[str, ...]:
    """Columns that training reads from the stats stage's patch table (see the team contract)."""
    return ("pair_id", "size", "ir", "vi") + weight_columns(sample_weights)


def _parquet_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no Parquet patch files in {folder} (run the crop and stats stages: dvc repro stats)")
    return files


def decode_patches(batch: Mapping[str, np.ndarray], sample_weights: str = "image") -> dict[str, np.ndarray]:
    """Decode a batch of patch rows into arrays.

    Args:
        batch: columns of ``patch_columns(sample_weights)``; ``ir``/``vi`` hold ``size * size``
            uint8 bytes (row-major, decoded by ``pipeline.data.contracts.decode_patches``).
        sample_weights: ``"image"`` (weights from the ``img_w_*`` columns) or ``"patch"``
            (``w_*``), see ``weight_columns``.

    Returns:
        ``ir``, ``vi``: (N, 1, S, S) float32 in [0, 1]; ``int_ir``, ``int_vi``, ``det_ir``,
        ``det_vi``: (N,) float32 loss weights.

    Raises:
        ValueError: a missing column, mixed patch sizes or a byte string of the wrong length.
    """
    wcols = weight_columns(sample_weights)
    missing = [c for c in ("size", "ir", "vi", *wcols) if c not in batch]
    if missing:
        raise ValueError(f"patch table lacks column(s) {missing} (expected the stats stage's output; "
                         f"train.sample_weights={sample_weights})")
    sizes = np.unique(np.asarray(batch["size"]))
    if sizes.size != 1:
        raise ValueError(f"patch batch mixes patch sizes {sizes.tolist()}; crop all patches to one size")
    s = int(sizes[0])
    out: dict[str, np.ndarray] = {}
    for key in ("ir", "vi"):
        try:
            u8 = decode_bytes(batch[key], s)
        except ValueError as exc:
            raise ValueError(f"patch column '{key}': {exc}") from exc
        out[key] = u8[:, None].astype(np.float32) / np.float32(255.0)
    for k, col in zip(WEIGHT_KEYS, wcols):
        out[k] = np.asarray(batch[col], dtype=np.float32)
    return out


class PatchCollate(NumpyBatchCollateFn):
    """``iter_torch_batches`` collate function: patch rows -> dict of tensors on ``device``.

    Output as in ``decode_patches``, as ``torch.float32`` tensors. On a CUDA device the decoded
    batch is copied into pinned (page-locked) host memory first, so that the copy to the GPU runs
    asynchronously (Ray Data calls the collate function on its prefetch thread, ahead of the step).
    """

    def __init__(self, device: Any = "cpu", sample_weights: str = "image") -> None:
        super().__init__()
        weight_columns(sample_weights)  # fail here, not in the first batch
        self.device = device
        self.sample_weights = sample_weights
        self.pin_memory = torch.device(device).type == "cuda"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        arrays = decode_patches(batch, self.sample_weights)
        tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
        if self.pin_memory:
            tensors = {k: t.pin_memory() for k, t in tensors.items()}
        return {k: t.to(self.device, non_blocking=True) for k, t in tensors.items()}


def select_train_rows(files: Sequence[Path], max_patches: int, seed: int) -> set[tuple[str, int, int]] | None:
    """A seeded uniform random subset of ``max_patches`` training rows, as ``(pair_id, y, x)`` keys
    (unique per patch); ``None`` when there are no more training rows than that (keep all).

    Reads only the key columns (pyarrow, no Ray). The same files and seed give the same subset.
    """

    keys: list[tuple[str, int, int]] = []
    for f in files:
        t = pq.read_table(f, columns=["pair_id", "y", "x", "split"]).to_pydict()
        keys += [(p, int(y), int(x)) for p, y, x, sp in zip(t["pair_id"], t["y"], t["x"], t["split"]) if sp == "train"]
    if len(keys) <= max_patches:
        return None
    pick = np.random.default_rng(seed).choice(len(keys), size=max_patches, replace=False)
    return {keys[i] for i in pick}


class _KeepRows:
    """Ray Data batch filter: keep the rows whose ``(pair_id, y, x)`` is in ``keep``."""

    def __init__(self, keep: set[tuple[str, int, int]]) -> None:
        self.keep = keep

    def __call__(self, batch: Any) -> Any:
        cols = batch.select(["pair_id", "y", "x"]).to_pydict()
        mask = [(p, int(y), int(x)) in self.keep for p, y, x in zip(cols["pair_id"], cols["y"], cols["x"])]
        return batch.filter(pa.array(mask, type=pa.bool_()))


def train_dataset(patches_dir: str | Path, max_patches: int | None = None, sample_weights: str = "image",
                  seed: int = 0):
    """Ray Dataset of the training patches (``split == "train"``) of the stats stage.

    Sets the driver's Ray Data context with ``pipeline.common.ray_runtime.configure_data_context`` (order
    preserved), so that the subset and ``materialize`` keep file order (deterministic epochs).

    Args:
        patches_dir: folder of ``part-*.parquet`` with the patch and weight columns.
        max_patches: keep a seeded uniform random subset of N training rows
            (:func:`select_train_rows`; not the first N in file order, which would favour the first
            pairs), ``None``: all.
        seed: seed of that subset (``train.seed``).
        sample_weights: which weight columns to read (``weight_columns``).

    Returns:
        ``ray.data.Dataset`` with ``patch_columns(sample_weights)`` (bytes undecoded:
        ``PatchCollate`` decodes them on the training worker).

    Raises:
        FileNotFoundError: no Parquet files in ``patches_dir``.
        ValueError: the files lack a needed column (named).
    """

    files = _parquet_files(Path(patches_dir))
    columns = list(patch_columns(sample_weights))
    missing = [c for c in [*columns, "split"] if c not in pq.read_schema(files[0]).names]
    if missing:
        raise ValueError(f"{files[0]}: lacks column(s) {missing} needed with train.sample_weights={sample_weights} "
                         "(run the stats stage: dvc repro stats)")
    configure_data_context()
    keep = select_train_rows(files, max_patches, seed) if max_patches is not None else None
    extra = [c for c in ("split", "y", "x", "pair_id") if c not in columns]
    ds = ray.data.read_parquet([str(f) for f in files], columns=columns + extra)
    ds = ds.filter(expr="split == 'train'")
    if keep is not None:
        ds = ds.map_batches(_KeepRows(keep), batch_format="pyarrow", batch_size=None)
    return ds.select_columns(columns)


def count_train_patches(patches_dir: str | Path) -> int:
    """Number of ``split == "train"`` rows, read from the Parquet files directly (no Ray)."""

    total = 0
    for f in _parquet_files(Path(patches_dir)):
        col = pq.read_table(f, columns=["split"])["split"]
        total += int(pc.sum(pc.equal(col, "train")).as_py() or 0)
    return total


@dataclass(frozen=True)
class ValPair:
    """One whole validation pair.

    Attributes:
        stem: pair id.
        ir: (H, W) uint8 IR image.
        vi_y: (H, W) uint8 visible luma (or the gray visible image).
        vi_crcb: (H, W, 2) uint8 chroma of a colour visible image, ``None`` for gray.
        weights: image-level adaptive weights ``int_ir``, ``int_vi``, ``det_ir``, ``det_vi``.
    """

    stem: str
    ir: np.ndarray
    vi_y: np.ndarray
    vi_crcb: np.ndarray | None
    weights: dict[str, float]


def val_pair_ids(split_json: str | Path) -> list[str]:
    """The ``val`` pair ids of the crop stage's ``split.json``."""
    return list(read_split(split_json)["val"])


def load_val_pairs(
    registered_dir: str | Path,
    split_json: str | Path,
    images_parquet: str | Path,
    max_pairs: int | None = None,
) -> list[ValPair]:
    """Load the whole registered images of the validation pairs.

    Args:
        registered_dir: the register stage's folder (``ir/<stem>.png``, ``vi/<stem>.png``).
        split_json: the crop stage's ``split.json``.
        images_parquet: the stats stage's per-pair table with the image weights ``w_int_ir``,
            ``w_int_vi``, ``w_det_ir``, ``w_det_vi`` (or the same with an ``img_`` prefix).
        max_pairs: keep the first N val pairs (sorted by id), ``None``: all.

    Returns:
        Pairs sorted by id (may be empty when the split has no val pairs).

    Raises:
        FileNotFoundError / ValueError: a missing file or a val pair absent from the tables.
    """

    ids = sorted(val_pair_ids(split_json))
    if max_pairs is not None:
        ids = ids[:max_pairs]
    return load_pairs(registered_dir, ids, images_parquet)


def load_train_pairs(registered_dir: str | Path, split_json: str | Path, images_parquet: str | Path) -> list[ValPair]:
    """The whole registered images of the ``train`` pairs with their image-level weights
    (``train.sampler: crops``), sorted by id; as :func:`load_val_pairs`."""
    return load_pairs(registered_dir, sorted(read_split(split_json)["train"]), images_parquet)


def load_pairs(registered_dir: str | Path, ids: Sequence[str], images_parquet: str | Path) -> list[ValPair]:
    """Whole registered pairs ``ids`` with their image-level weights from the stats stage's
    ``images.parquet``.

    Raises:
        FileNotFoundError / ValueError: a missing file or a pair absent from the table (named).
    """
    if not ids:
        return []
    images_parquet = Path(images_parquet)
    if not images_parquet.is_file():
        raise FileNotFoundError(f"per-pair statistics not found: {images_parquet} (run the stats stage)")
    table = pq.read_table(images_parquet).to_pandas().set_index("pair_id")
    prefix = "w_" if all(f"w_{k}" in table.columns for k in WEIGHT_KEYS) else "img_w_"
    missing = [f"{prefix}{k}" for k in WEIGHT_KEYS if f"{prefix}{k}" not in table.columns]
    if missing:
        raise ValueError(f"{images_parquet}: lacks the image weight column(s) {missing} (w_int_ir, ... expected)")
    registered_dir = Path(registered_dir)
    pairs = []
    for stem in ids:
        if stem not in table.index:
            raise ValueError(f"{images_parquet}: no row for pair '{stem}'")
        row = table.loc[stem]
        weights = {k: float(row[f"{prefix}{k}"]) for k in WEIGHT_KEYS}
        ir, vi = read_registered_pair(registered_dir, stem)
        vi_y, crcb = split_luma(vi)
        pairs.append(ValPair(stem, ir, vi_y, crcb, weights))
    return pairs


class CropSampler:
    """Random crops with flips of whole training images (``train.sampler: crops``).

    Each call draws ``batch`` pairs (``pairs``: each pair equally likely, so a small dataset is
    not drowned by a large one's pixels; ``area``: in proportion to its pixels), a uniformly
    placed ``size`` x ``size`` crop of each and a horizontal flip with probability 1/2. The loss
    weights are the pair's image-level weights. Seeded: the same pairs, size and seed give the
    same batches.

    Returns batches as :func:`decode_patches` does, as tensors on ``device``.

    Raises:
        ValueError: no pair is at least ``size`` pixels on each side (named).
    """

    def __init__(self, pairs: Sequence[ValPair], size: int, batch: int, pair_sampling: str = "pairs",
                 seed: int = 0, device: Any = "cpu") -> None:
        self.pairs = [p for p in pairs if min(p.ir.shape) >= size]
        if not self.pairs:
            raise ValueError(f"no training pair is at least train.crop_size={size} px on each side "
                             f"({len(pairs)} pairs)")
        if pair_sampling == "pairs":
            p = np.ones(len(self.pairs))
        elif pair_sampling == "area":
            p = np.array([pair.ir.size for pair in self.pairs], dtype=np.float64)
        else:
            raise ValueError(f"train.pair_sampling must be 'pairs' or 'area', got {pair_sampling!r}")
        self.p = p / p.sum()
        self.size, self.batch, self.device = size, batch, device
        self.rng = np.random.default_rng(seed)
        self.skipped = len(pairs) - len(self.pairs)

    def __iter__(self) -> "CropSampler":
        return self

    def __next__(self) -> dict[str, Any]:
        s, rng = self.size, self.rng
        irs, vis, weights = [], [], []
        for i in rng.choice(len(self.pairs), size=self.batch, p=self.p):
            pair = self.pairs[i]
            h, w = pair.ir.shape
            y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            a, b = pair.ir[y:y + s, x:x + s], pair.vi_y[y:y + s, x:x + s]
            if rng.random() < 0.5:
                a, b = a[:, ::-1], b[:, ::-1]
            irs.append(a)
            vis.append(b)
            weights.append([pair.weights[k] for k in WEIGHT_KEYS])
        out = {"ir": np.stack(irs)[:, None], "vi": np.stack(vis)[:, None]}
        tensors = {k: torch.from_numpy(v.astype(np.float32) / np.float32(255.0)) for k, v in out.items()}
        w = np.asarray(weights, dtype=np.float32)
        tensors.update({k: torch.from_numpy(w[:, j].copy()) for j, k in enumerate(WEIGHT_KEYS)})
        return {k: t.to(self.device) for k, t in tensors.items()}
