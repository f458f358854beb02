"""Scoring fused images from files: one triplet, or a whole folder on Ray (``mda evaluate``).

The metric maths is :mod:`pipeline.evaluate.metrics`; files are read with the published
convention (:func:`pipeline.data.images.read_gray`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas
import ray
from tqdm import tqdm

from pipeline.common.ray_runtime import ray_session
from pipeline.data.images import list_images, read_gray
from pipeline.evaluate.metrics import DIAGNOSTICS, METRICS, brightness_gaps, compute_all

log = logging.getLogger(__name__)



def score_files(name: str, ir_path: str | Path, vi_path: str | Path, fused_path: str | Path) -> dict[str, Any]:
    """Read one (IR, visible, fused) triplet with the metric convention and score it.

    Never raises for bad files: the returned row has ``error`` set (naming the file) and ``nan``
    metrics instead, so one bad image does not stop a folder.

    Returns:
        ``{"name": name, "error": "" or message, **metrics}``.
    """
    row: dict[str, Any] = {"name": name, "error": ""}
    try:
        ir = read_gray(ir_path)
        vi = read_gray(vi_path)
        fused = read_gray(fused_path)
        if not (ir.shape == vi.shape == fused.shape):
            raise ValueError(
                f"{fused_path}: size {fused.shape[1]}x{fused.shape[0]} (WxH) does not match its sources "
                f"(IR {ir.shape[1]}x{ir.shape[0]}, visible {vi.shape[1]}x{vi.shape[0]})"
            )
        row.update(compute_all(ir, vi, fused))
        row.update(brightness_gaps(ir, vi, fused))
    except (ValueError, OSError) as exc:  # ImageError is a ValueError and names the file
        msg = str(exc)
        if str(fused_path) not in msg and str(ir_path) not in msg and str(vi_path) not in msg:
            msg = f"{fused_path}: {msg}"
        row["error"] = msg
        row.update({m: float("nan") for m in (*METRICS, *DIAGNOSTICS)})
    return row


def _score_row(row: dict[str, Any]) -> dict[str, Any]:
    return score_files(row["name"], row["ir"], row["vi"], row["fused"])


def evaluate_folder(
    ir_dir: str | Path,
    vi_dir: str | Path,
    fused_dir: str | Path,
    parallel: bool = True,
    progress: bool = False,
    address: str | None = None,
) -> "pandas.DataFrame":  # noqa: F821
    """Score every fused image of ``fused_dir`` against the IR and visible images of the same stem.

    Files are paired by stem (``a.png`` fused with ``ir/a.jpg`` and ``vi/a.bmp``: any of
    :data:`pipeline.data.images.IMAGE_EXTENSIONS`). Fused images without both sources, unreadable
    files and size mismatches are not scored: one warning names them all, and each is listed in
    ``df.attrs["skipped"]`` as ``{"name", "path" (the fused file), "reason"}`` (``reason`` is a full
    message that names the offending file); the others are still scored.

    Args:
        ir_dir, vi_dir: source folders.
        fused_dir: folder of fused images.
        parallel: score through Ray Data (``from_items`` + ``map``) inside
            :func:`pipeline.common.ray_runtime.ray_session` (reuses a running Ray, else ``address`` /
            ``RAY_ADDRESS``, else a local one); ``False``: a plain loop in this process.
        progress: show a progress bar in the plain loop (Ray Data shows its own).
        address: Ray cluster address for ``parallel``.

    Returns:
        One row per scored image, sorted by name, columns ``name`` + :data:`METRICS` +
        :data:`DIAGNOSTICS` (``nan`` where a pair has no pixel for it).

    Raises:
        FileNotFoundError: a folder is missing.
        ValueError: ``fused_dir`` holds no image.
    """
    fused = list_images(fused_dir)
    if not fused:
        raise ValueError(f"no fused images found in {fused_dir}")
    items, skipped = _triplets(ir_dir, vi_dir, fused)
    how = "Ray Data" if parallel else "a plain loop"
    log.info("scoring %d fused image(s) of %s through %s", len(items), fused_dir, how)
    rows = _score_rows(items, parallel, progress, address)
    by_name = {it["name"]: it for it in items}
    good = []
    for row in sorted(rows, key=lambda r: r["name"]):
        if row["error"]:
            skipped.append({"name": row["name"], "path": by_name[row["name"]]["fused"], "reason": row["error"]})
        else:
            good.append({k: (row["name"] if k == "name" else float(row[k])) for k in ("name", *METRICS, *DIAGNOSTICS)})
    if skipped:
        log.warning(
            "%d of %d fused image(s) not scored: %s",
            len(skipped), len(fused), ", ".join(sorted(item["name"] for item in skipped)),
        )
    df = pandas.DataFrame(good, columns=["name", *METRICS, *DIAGNOSTICS])
    df.attrs["skipped"] = sorted(skipped, key=lambda s: s["name"])
    return df


def _triplets(
    ir_dir: str | Path, vi_dir: str | Path, fused: dict[str, Path]
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Pair each fused image with its IR and visible sources: ``(items, skipped)``."""
    ir = list_images(ir_dir)
    vi = list_images(vi_dir)
    skipped: list[dict[str, str]] = []
    items: list[dict[str, str]] = []
    for stem, path in fused.items():
        missing = [f"{kind} '{stem}.*' in {folder}" for kind, folder, found in
                   (("IR", ir_dir, ir), ("visible", vi_dir, vi)) if stem not in found]
        if missing:
            reason = f"{path}: no source image: missing " + " and ".join(missing)
            skipped.append({"name": stem, "path": str(path), "reason": reason})
            continue
        items.append({"name": stem, "ir": str(ir[stem]), "vi": str(vi[stem]), "fused": str(path)})
    return items, skipped


def _score_rows(items: list[dict[str, str]], parallel: bool, progress: bool, address: str | None) -> list[dict[str, Any]]:
    """Score the triplets through Ray Data (``parallel``) or a plain loop."""
    if not items:
        return []
    if parallel:
        with ray_session(address=address):
            ds = ray.data.from_items(items, override_num_blocks=min(len(items), 64))
            return ds.map(_score_row).take_all()
    iterator = tqdm(items, desc="scoring", unit="image") if progress else items
    return [_score_row(it) for it in iterator]
