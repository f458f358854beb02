"""The evaluation report: means per method, the per-image CSV, the Markdown table and the image grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from pipeline.common.atomic_io import write_text_atomic

#: Order of the methods in tables and in the grid (ours last).
METHOD_ORDER: tuple[str, ...] = ("average", "maximum", "official", "ours")


def mean_per_method(per_image: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> dict[str, dict[str, float]]:
    """Means of every metric per method, methods in ``METHOD_ORDER`` (values rounded to 6 digits)."""
    means: dict[str, dict[str, float]] = {}
    present = [m for m in METHOD_ORDER if any(r["method"] == m for r in per_image)]
    present += sorted({r["method"] for r in per_image} - set(present))
    for method in present:
        sel = [r for r in per_image if r["method"] == method]
        means[method] = {m: round(float(np.mean([r[m] for r in sel])), 6) for m in metrics}
    return means


def means_for_json(means: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float | None]]:
    """The means with non-finite values (e.g. CC of a constant image) as ``None`` (JSON ``null``)."""
    return {k: {m: (v if np.isfinite(v) else None) for m, v in vals.items()} for k, vals in means.items()}


def write_per_image_csv(path: str | Path, per_image: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> Path:
    """Write ``method,name,<metrics>`` rows (atomic)."""
    lines = [",".join(["method", "name", *metrics])]
    for r in per_image:
        lines.append(",".join([r["method"], r["name"], *(f"{r[m]:.6f}" for m in metrics)]))
    return write_text_atomic(Path(path), "\n".join(lines) + "\n")


def markdown_table(
    means: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str],
    n_pairs: int | None = None,
    skipped: Mapping[str, str] | None = None,
) -> str:
    """A Markdown table of the means, one row per method, the best value per metric in bold."""
    best: dict[str, float] = {}
    for m in metrics:
        vals = [v[m] for v in means.values() if v[m] is not None and np.isfinite(v[m])]
        best[m] = max(vals) if vals else float("nan")  # higher is better for every metric
    head = "| method | " + " | ".join(metrics) + " |"
    sep = "|---|" + "---:|" * len(metrics)
    lines = []
    if n_pairs is not None:
        lines += [f"Means over the {n_pairs} test pairs (higher is better; best in bold).", ""]
    lines += [head, sep]
    for method, vals in means.items():
        cells = [_cell(vals[m], best[m]) for m in metrics]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    for method, reason in (skipped or {}).items():
        lines += ["", f"Baseline `{method}` skipped: {reason}."]
    return "\n".join(lines) + "\n"


def _cell(value: float | None, best: float) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"**{value:.4f}**" if np.isclose(value, best) else f"{value:.4f}"


def image_grid(
    sources: Mapping[str, tuple[np.ndarray, np.ndarray]],
    fused: Mapping[str, Mapping[str, np.ndarray]],
    n_pairs: int,
    tile: tuple[int, int],
    header: int = 24,
) -> np.ndarray | None:
    """Build the comparison grid: a labelled header, then one row per pair.

    Columns: IR | visible | each method of ``fused`` in ``METHOD_ORDER``. Every image is
    letterboxed into a ``tile`` (height, width) cell.

    Returns:
        ``uint8`` BGR ``(header + n * tile_h, n_cols * tile_w, 3)`` with ``n = min(n_pairs,
        len(sources))``, or ``None`` when there is nothing to show.
    """

    names = sorted(sources)[:n_pairs]
    if not names:
        return None
    methods = [m for m in METHOD_ORDER if m in fused] + sorted(set(fused) - set(METHOD_ORDER))
    labels = ["IR", "visible", *methods]
    th, tw = tile
    grid = np.zeros((header + len(names) * th, len(labels) * tw, 3), dtype=np.uint8)
    for j, label in enumerate(labels):
        cv2.putText(grid, label, (j * tw + 6, header - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    for i, name in enumerate(names):
        ir, vi = sources[name]
        cells = [ir, vi, *(fused[m][name] for m in methods)]
        for j, img in enumerate(cells):
            y0, x0 = header + i * th, j * tw
            grid[y0 : y0 + th, x0 : x0 + tw] = _letterbox(img, th, tw)
    return grid


def _letterbox(img: np.ndarray, th: int, tw: int) -> np.ndarray:

    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    h, w = img.shape[:2]
    scale = min(th / h, tw / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    cell = np.zeros((th, tw, 3), dtype=np.uint8)
    y0, x0 = (th - nh) // 2, (tw - nw) // 2
    cell[y0 : y0 + nh, x0 : x0 + nw] = small
    return cell
