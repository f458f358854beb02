"""Crop registered IR/visible pairs into patch pairs and split them train/val/test by pair.

Input: a registered folder (``register`` stage): ``ir/<stem>.png``, ``vi/<stem>.png`` and
``manifest.parquet`` whose rows with ``status == "ok"`` are used (columns ``pair_id``, ``height``,
``width``).

Output folder (``crop`` stage), written atomically (a temporary sibling folder renamed into place):

- ``part-NNNNN.parquet``: shard ``NNNNN`` holds ``pairs_per_shard`` consecutive pairs (sorted by
  ``pair_id``; each Ray task writes the shards dealt to it, one after the other), one row per
  patch, schema ``PATCH_SCHEMA``:

  ============ ======== =====================================================================
  ``pair_id``  string   stem of the registered pair
  ``split``    string   ``"train"``, ``"val"`` or ``"test"`` (the split of the pair)
  ``y``        int32    top row of the patch in the registered image (pixels)
  ``x``        int32    left column of the patch (pixels)
  ``size``     int32    patch side ``S`` (pixels)
  ``ir``       binary   IR patch, ``uint8``, ``S*S`` bytes, row-major
  ``vi``       binary   luma (``Y`` of YCrCb, see ``pipeline.data.images.split_luma``) of the visible
                        patch, ``uint8``, ``S*S`` bytes, row-major
  ============ ======== =====================================================================

  Decode a patch with ``np.frombuffer(row["ir"], np.uint8).reshape(S, S)``.
- ``split.json``: ``{"seed", "fractions", "test_list", "test_list_sha256", "train": [ids], "val": [ids],
  "test": [ids], "no_patches": {id: reason}, "counts": {...}}``.

Patch positions: a grid with step ``stride`` from the top-left corner; when the last step does not
reach the bottom/right border, one more row/column of patches is placed flush with that border, so
every pixel is covered. Rows are ordered by pair, then row-major by ``(y, x)``. A pair smaller than
one patch yields no patch (it is not padded: padding would invent content); it keeps its place in
the split (its whole image can still be used for validation/testing), is logged, and is listed
under ``no_patches`` in ``split.json``.

Optional ``drop_flat``: a patch whose IR *and* visible standard deviations are both below the
threshold (gray levels, 0-255) carries no information for either modality and is dropped.

Determinism: the split depends only on the sorted pair ids, the seed, the fractions and the test
list; the shards only on the pairs and the params (shard ``i`` = pairs ``i*k .. i*k+k-1``, whatever
the cluster size, the number of tasks or their order), so the same params give the same files,
rows and bytes.

Execution: one Ray Data execution (``pipeline.common.ray_runtime.map_groups``) whose tasks each
take a group of shard descriptors (``task_count``: one task per CPU, more for a large input;
shards dealt round-robin) and crop them one shard at a time, so a task holds one shard in memory
whatever the input size.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.common.atomic_io import replace_dir, staging_dir, write_json
from pipeline.common.config import REQUIRED, ParamsError, param, read_settings, setting
from pipeline.common.ray_runtime import Runner, configure_data_context, map_groups, task_count, task_groups
from pipeline.data.contracts import PATCH_SCHEMA, SPLITS, column_list, read_accepted_pairs, read_registered_pair
from pipeline.data.images import split_luma

log = logging.getLogger(__name__)

def _check_fractions(raw: Mapping[str, Any], key: str) -> dict[str, float]:
    """``crop.fractions``: a fraction > 0 for each split, summing to 1."""
    fractions = {name: param(raw, name, float, where=key, minimum=0.0, maximum=1.0) for name in SPLITS}
    extra = sorted(set(raw) - set(SPLITS))
    if extra:
        raise ParamsError(f"params: '{key}' has unknown keys {extra} (expected {list(SPLITS)})")
    if any(v <= 0 for v in fractions.values()) or not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
        raise ParamsError(f"params: '{key}' must be > 0 each and sum to 1, got {fractions}")
    return fractions


@dataclass(frozen=True)
class CropConfig:
    """Parameters of the crop step (the ``crop`` section of ``params.yaml``).

    Attributes:
        patch_size: patch side in pixels.
        stride: step between patch origins in pixels (``== patch_size``: no overlap).
        drop_flat: std threshold (gray levels) under which a patch is dropped when both
            modalities are below it; ``None`` keeps every patch.
        fractions: ``{"train", "val", "test"}`` fractions of the pairs (each > 0, sum 1).
        seed: seed of the pair shuffle for the split.
        test_list: text file of pair names pinned to the test split, or ``None``.
        pairs_per_shard: consecutive pairs per Parquet shard (and per Ray task).
    """

    patch_size: int = setting(REQUIRED, int, minimum=8)
    stride: int | None = setting(None, int, minimum=1)
    drop_flat: float | None = setting(1.0, float, minimum=0.0, allow_none=True)
    fractions: Mapping[str, float] = setting({"train": 0.8, "val": 0.1, "test": 0.1}, dict, convert=_check_fractions)
    seed: int = setting(0, int)
    test_list: str | None = setting(None, str, allow_none=True)
    pairs_per_shard: int = setting(8, int, minimum=1)

    def __post_init__(self) -> None:
        if self.stride is None:  # default: no overlap
            object.__setattr__(self, "stride", self.patch_size)

    @classmethod
    def from_params(cls, cfg: Mapping[str, Any]) -> "CropConfig":
        """Read and validate the ``crop`` section; raises ``ParamsError`` naming the key."""
        return read_settings(cls, cfg, "crop")


# ----------------------------------------------------------------------------- positions, crops


def patch_positions(height: int, width: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners ``(y, x)`` of the patches of an image, row-major.

    Args:
        height, width: image size in pixels.
        size: patch side in pixels.
        stride: step between patch origins in pixels.

    Returns:
        The positions; the last row/column is flush with the border so the patches cover every
        pixel. Empty when the image is smaller than one patch.
    """
    if size < 1 or stride < 1:
        raise ValueError(f"patch size and stride must be >= 1, got {size} and {stride}")

    def axis(n: int) -> list[int]:
        if n < size:
            return []
        starts = list(range(0, n - size + 1, stride))
        if starts[-1] != n - size:
            starts.append(n - size)
        return starts

    return [(y, x) for y in axis(height) for x in axis(width)]


def crop_arrays(
    ir: np.ndarray, vi: np.ndarray, size: int, stride: int, drop_flat: float | None = None
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """Cut two registered single-channel images into patch pairs.

    Args:
        ir: ``uint8`` (H, W) IR image.
        vi: ``uint8`` (H, W) visible luma.
        size, stride: patch side and step in pixels.
        drop_flat: skip patches whose two standard deviations (gray levels) are both below it.

    Yields:
        ``(y, x, ir_patch, vi_patch)`` with ``uint8`` (size, size) C-contiguous patches.
    """
    if ir.shape != vi.shape or ir.ndim != 2:
        raise ValueError(f"IR {ir.shape} and visible luma {vi.shape} must be 2-D and the same size")
    for y, x in patch_positions(ir.shape[0], ir.shape[1], size, stride):
        a = np.ascontiguousarray(ir[y : y + size, x : x + size])
        b = np.ascontiguousarray(vi[y : y + size, x : x + size])
        if drop_flat is not None and drop_flat > 0 and a.std() < drop_flat and b.std() < drop_flat:
            continue
        yield y, x, a, b


def crop_batch(batch: Mapping[str, Any], registered_dir: str, size: int, stride: int, drop_flat: float | None) -> pa.Table:
    """Crop a batch of pairs (Ray Data ``map_batches`` function, also usable in a plain loop).

    Args:
        batch: columns ``pair_id`` and ``split`` (sequences of the same length).
        registered_dir: the registered folder.
        size, stride, drop_flat: see ``CropConfig``.

    Returns:
        A table with ``PATCH_SCHEMA``, pairs in batch order, patches row-major.
    """
    cols: dict[str, list[Any]] = {name: [] for name in PATCH_SCHEMA.names}
    for pair_id, split in zip(column_list(batch, "pair_id"), column_list(batch, "split")):
        pair_id, split = str(pair_id), str(split)
        ir, vi = read_registered_pair(registered_dir, pair_id)
        y, _ = split_luma(vi)
        for py, px, a, b in crop_arrays(ir, y, size, stride, drop_flat):
            cols["pair_id"].append(pair_id)
            cols["split"].append(split)
            cols["y"].append(py)
            cols["x"].append(px)
            cols["size"].append(size)
            cols["ir"].append(a.tobytes())
            cols["vi"].append(b.tobytes())
    return pa.Table.from_pydict(cols, schema=PATCH_SCHEMA)


# ----------------------------------------------------------------------------- pairs and split


def read_test_list(path: str | Path) -> list[str]:
    """Pair stems listed in a text file.

    Format: one pair per line; blank lines and lines starting with ``#`` are ignored; when a line
    holds several whitespace-separated names (``their_name local_name``, as in
    ``TNO/subset_CDDFuse_test25.txt``), the last one is the local file name. Extensions are
    dropped (``FLIR_00211.jpg`` -> ``FLIR_00211``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it names no pair.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"test list not found: {path}")
    stems: list[str] = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        stem = Path(line.split()[-1]).stem
        if stem not in stems:
            stems.append(stem)
    if not stems:
        raise ValueError(f"{path}: the test list names no pair")
    return stems


def _cut(n: int, fraction: float) -> int:
    return int(math.floor(n * fraction + 0.5))


def split_pairs(
    pair_ids: Sequence[str], fractions: Mapping[str, float], seed: int, test_ids: Sequence[str] | None = None
) -> dict[str, list[str]]:
    """Split pairs (not patches) into train/val/test.

    The sorted ids are shuffled with ``numpy.random.default_rng(seed)``; the first ``round(n *
    test)`` go to test, the next ``round(n * val)`` to val, the rest to train. With 3 pairs or more
    every split gets at least one pair (train keeps at least one). With ``test_ids``, those pairs
    (the ones present) form the test split and the others are divided between train and val in
    the ratio of their fractions.

    Args:
        pair_ids: pair ids (any order; duplicates are an error).
        fractions: ``{"train", "val", "test"}``.
        seed: shuffle seed.
        test_ids: pairs pinned to the test split, or ``None``.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``, each sorted.

    Raises:
        ValueError: duplicated ids, or a test list of which no pair is present.
    """
    ids = sorted(pair_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("split_pairs: duplicated pair ids")
    rng = np.random.default_rng(seed)
    order = [ids[i] for i in rng.permutation(len(ids))]
    if test_ids is not None:
        present = set(ids) & set(test_ids)
        absent = sorted(set(test_ids) - set(ids))
        if not present:
            raise ValueError(f"none of the {len(set(test_ids))} pairs of the test list is in the data")
        if absent:
            log.warning("test list: %d listed pairs are not in the data (e.g. %s)", len(absent), absent[:3])
        test = [p for p in order if p in present]
        rest = [p for p in order if p not in present]
        share = fractions["val"] / (fractions["train"] + fractions["val"])
        n_val = _cut(len(rest), share)
        if len(rest) >= 2:
            n_val = min(max(n_val, 1), len(rest) - 1)
        val, train = rest[:n_val], rest[n_val:]
    else:
        n = len(order)
        n_test, n_val = _cut(n, fractions["test"]), _cut(n, fractions["val"])
        if n >= 3:
            n_test, n_val = max(n_test, 1), max(n_val, 1)
            while n_test + n_val > n - 1:  # keep one training pair
                if n_test >= n_val:
                    n_test -= 1
                else:
                    n_val -= 1
        elif n == 2:
            n_test, n_val = 0, 1
        else:
            n_test, n_val = 0, 0
        test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    if len(ids) < 3:
        log.warning("only %d pair(s): some of train/val/test are empty", len(ids))
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


# ----------------------------------------------------------------------------- outputs


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``part-NNNNN.parquet``."""
    return f"part-{index:05d}.parquet"


def plan_shards(items: Sequence[Mapping[str, Any]], pairs_per_shard: int) -> list[dict[str, Any]]:
    """Group consecutive pairs into shards: ``[{"shard", "pair_ids", "splits"}]``."""
    return [
        {
            "shard": i // pairs_per_shard,
            "pair_ids": [r["pair_id"] for r in items[i : i + pairs_per_shard]],
            "splits": [r["split"] for r in items[i : i + pairs_per_shard]],
        }
        for i in range(0, len(items), pairs_per_shard)
    ]


def crop_shard(
    shard: Mapping[str, Any], registered_dir: str, out_dir: str, size: int, stride: int, drop_flat: float | None
) -> dict[str, Any]:
    """Crop the pairs of one shard and write ``out_dir/part-NNNNN.parquet`` (a Ray Data ``map`` row).

    Returns:
        ``{"shard", "file", "train", "val", "test"}``: patch counts per split of the shard.
    """
    table = crop_batch(
        {"pair_id": list(shard["pair_ids"]), "split": list(shard["splits"])}, registered_dir, size, stride, drop_flat
    )
    name = shard_name(int(shard["shard"]))
    pq.write_table(table, Path(out_dir) / name)
    splits = table.column("split").to_pylist()
    return {"shard": int(shard["shard"]), "file": name, **{s: splits.count(s) for s in SPLITS}}


def crop_shards(
    shards: Sequence[Mapping[str, Any]], registered_dir: str, out_dir: str, size: int, stride: int,
    drop_flat: float | None,
) -> dict[str, int]:
    """Crop a group of shards one after the other (one Ray task's work); patch counts per split."""
    counts = {name: 0 for name in SPLITS}
    for shard in shards:
        row = crop_shard(shard, registered_dir, out_dir, size, stride, drop_flat)
        for name in SPLITS:
            counts[name] += row[name]
    return counts


def plan_crop(registered_dir: str | Path, cfg: CropConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Decide the split and which pairs yield patches, from the manifest only (no image read).

    Returns:
        ``(items, split_record)``: ``items`` = ``[{"pair_id", "split"}]`` of the pairs at least one
        patch large, sorted by id; ``split_record`` = the content of ``split.json`` (without counts).
    """
    pairs = read_accepted_pairs(registered_dir)
    test_ids = read_test_list(cfg.test_list) if cfg.test_list else None
    splits = split_pairs([p["pair_id"] for p in pairs], cfg.fractions, cfg.seed, test_ids)
    split_of = {pid: name for name in SPLITS for pid in splits[name]}
    no_patches: dict[str, str] = {}
    items = []
    for p in pairs:
        if p["height"] < cfg.patch_size or p["width"] < cfg.patch_size:
            reason = f"image {p['height']}x{p['width']} smaller than one {cfg.patch_size}x{cfg.patch_size} patch"
            log.warning("crop: pair '%s' skipped: %s", p["pair_id"], reason)
            no_patches[p["pair_id"]] = reason
        else:
            items.append({"pair_id": p["pair_id"], "split": split_of[p["pair_id"]]})
    record = {
        "seed": cfg.seed,
        "fractions": dict(cfg.fractions),
        "test_list": cfg.test_list,
        # DVC cannot depend on a file named by a parameter: record its content so a change shows
        "test_list_sha256": hashlib.sha256(Path(cfg.test_list).read_bytes()).hexdigest() if cfg.test_list else None,
        **splits,
        "no_patches": no_patches,
    }
    return items, record


def crop_dataset(
    registered_dir: str | Path, out_dir: str | Path, cfg: CropConfig, runner: Runner = map_groups
) -> dict[str, Any]:
    """The crop step: Ray Data over the shards of pairs -> Parquet shards + split.json.

    Must run inside ``pipeline.common.ray_runtime.ray_session``. One Ray Data execution; the driver
    holds only the pair ids; each Ray task crops its group of shards (one shard at a time), writes
    them itself and returns only patch counts.

    Args:
        registered_dir: output of the register stage.
        out_dir: the patch folder to (re)write atomically.
        cfg: crop parameters.
        runner: how the task groups run (``map_groups``: Ray Data; ``run_serially``: the same
            work in this process, for benchmarks and tests).

    Returns:
        The ``split.json`` record, with ``counts`` (patches per split).

    Raises:
        FileNotFoundError / ValueError: missing manifest, no usable pair, no patch at all.
    """

    registered_dir, out_dir = str(registered_dir), Path(out_dir)
    items, record = plan_crop(registered_dir, cfg)
    if not items:
        raise ValueError(f"{registered_dir}: no pair is at least {cfg.patch_size}x{cfg.patch_size} pixels")
    shards = plan_shards(items, cfg.pairs_per_shard)
    configure_data_context()
    tmp = staging_dir(out_dir)
    try:
        kwargs = {"registered_dir": registered_dir, "out_dir": str(tmp), "size": cfg.patch_size,
                  "stride": cfg.stride, "drop_flat": cfg.drop_flat}
        groups = task_groups(shards, task_count(len(shards)))
        counts = {name: 0 for name in SPLITS}
        for row in runner("crop", crop_shards, groups, kwargs):
            for name in SPLITS:
                counts[name] += int(row[name])
        if sum(counts.values()) == 0:
            raise ValueError(f"{registered_dir}: every patch was dropped (crop.drop_flat={cfg.drop_flat} too high?)")
        record["counts"] = counts
        write_json(tmp / "split.json", record)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("crop: %d patches (%s) from %d pairs -> %s", sum(counts.values()), counts, len(items), out_dir)
    return record

