"""The register step: validate IR/visible pairs, check their alignment and correct only what is proven, on Ray Data.

Per pair (in Ray Data tasks of a few pairs each):

1. Read with :func:`pipeline.data.images.read_ir` / :func:`pipeline.data.images.read_visible`
   (IR: one ``uint8`` channel, 16-bit stretched; visible: ``uint8`` BGR or gray).
2. Validate; a bad pair is *rejected* with a reason code, the others go on:
   ``missing_partner``, ``unreadable`` (missing, corrupt or not an image), ``unsupported_format``
   (bit depth other than 8/16, odd channel layout), ``size_mismatch``, ``constant_image``.
3. Alignment, by ``register.align`` (:data:`pipeline.data.register_options.ALIGN_MODES`):

   - ``off``: nothing is estimated;
   - ``check`` (default): the offset is estimated and judged (:func:`pipeline.data.align.check_alignment`:
     a gradient ECC and a mutual-information search must agree) and recorded in the manifest;
     the images are written exactly as decoded;
   - ``correct``: as ``check``, and the visible image of a *confident* pair whose rigid fit
     (:func:`pipeline.data.align.rigid_warp`) moves it by at least ``min_correction_px`` is warped
     onto the IR frame. A pair that is not confident is never moved; ``align_reason`` says why.

Outputs of :func:`register_dataset` in ``OUT``: ``ir/<stem>.png`` (``uint8`` gray), ``vi/<stem>.png``
(``uint8`` BGR or gray), ``manifest.parquet`` (:func:`manifest_schema`, one row per pair, accepted
and rejected) and ``rejected.json`` (``[{pair_id, ir, vi, reason}]``); and the alignment report
(``alignment.json``, ``counts.json``, ``alignment.png``: :func:`write_report`) in ``register.report_dir`` (``OUT``
when empty). The images are written by the Ray tasks, so on a multi-node cluster ``OUT`` must be
on storage shared by all nodes. Source paths (``ir_src``, ``vi_src``, and in the reasons) are
recorded relative to the working folder when they lie inside it (:func:`recorded_path`), so the
outputs of a DVC run do not depend on where the project is checked out.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.common.atomic_io import atomic_writer, replace_dir, staging_dir, write_json
from pipeline.common.ray_runtime import configure_data_context, map_groups, task_count, task_groups
from pipeline.data import align
from pipeline.data.contracts import MANIFEST_SCHEMA
from pipeline.data.images import ImageError, find_pairs, read_ir, read_visible, split_luma, write_image
from pipeline.data.register_options import AlignOptions

log = logging.getLogger(__name__)

#: File names of the alignment report.
REPORT_METRICS = "alignment.json"
#: The few counts shown by ``dvc metrics show`` (the details stay in ``alignment.json``).
REPORT_COUNTS = "counts.json"
REPORT_PICTURE = "alignment.png"


class NoPairsError(ValueError):
    """No pair survived validation (the message lists why)."""


# --------------------------------------------------------------------------------------------------
# one pair
# --------------------------------------------------------------------------------------------------


class _Rejected(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.reason = f"{code}: {detail}"


def _read(reader: Any, path: Path, what: str, shown: str) -> np.ndarray:
    try:
        return reader(path)
    except ImageError as exc:
        code = "unsupported_format" if "unsupported" in exc.reason else "unreadable"
        raise _Rejected(code, f"{what} {shown}: {exc.reason}") from None


def recorded_path(path: str | Path, root: str | Path | None = None) -> str:
    """``path`` as the manifest records it: relative to ``root`` (default: the working folder) when
    it lies inside it, else absolute. Links are kept (a dataset linked into the project is recorded
    at its place in the project), unless only the resolved path lies inside ``root``."""
    root = Path(os.path.abspath(root or Path.cwd()))
    absolute = Path(os.path.normpath(root / path))
    for candidate, base in ((absolute, root), (absolute.resolve(), root.resolve())):
        if candidate.is_relative_to(base):
            return candidate.relative_to(base).as_posix()
    return str(absolute)


def _empty_row(pair_id: str, ir: str | None, vi: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {name: None for name in MANIFEST_SCHEMA.names}
    row.update(pair_id=pair_id, ir_src=ir, vi_src=vi, corrected=False, status="rejected")
    return row


#: Decimals the manifest keeps of the alignment figures: far below what they can tell apart, and
#: enough to hide the last-bit noise of OpenCV's SIMD sums (scores differed by 1e-11 between runs
#: of one pair), so a rerun writes the same manifest and DVC sees an unchanged output.
_DECIMALS = 6


def _finite(value: float) -> float | None:
    return round(float(value), _DECIMALS) if np.isfinite(value) else None


def _values(values: Any) -> list[float]:
    return [round(float(v), _DECIMALS) for v in np.asarray(values).ravel()]


def _alignment_fields(check: align.AlignmentCheck, warp: np.ndarray, h: int, w: int) -> dict[str, Any]:
    """Manifest values of an alignment check whose recorded warp is ``warp`` (rounded, ``_DECIMALS``)."""
    return {
        "transform": _values(warp),
        "align_score": _finite(check.score),
        "shift_px": _finite(align.displacement_px(warp, h, w)),
        "confident": check.confident,
        "align_reason": check.reason,
        "align_error": None if check.confident else check.reason,
        "ecc_shift": None if check.ecc_shift is None else _values(check.ecc_shift),
        "mi_shift": _values(check.mi_shift),
        "identity_score": _finite(check.identity_score),
        "disagreement_px": _finite(check.disagreement_px),
    }


def register_pair(
    pair_id: str, ir_path: str, vi_path: str, out_dir: str | Path, options: AlignOptions, root: str | Path = "."
) -> dict[str, Any]:
    """Validate, check (and in ``correct`` mode maybe align) and write one pair; never raises for bad input.

    Args:
        pair_id: stem; the outputs are ``out_dir/ir/<pair_id>.png`` and ``out_dir/vi/<pair_id>.png``.
        ir_path, vi_path: source files, as recorded in the row and the messages.
        out_dir: output root (written only for accepted pairs).
        options: alignment settings.
        root: folder that relative source paths are read from (a Ray worker's own working folder
            need not be the driver's).

    Returns:
        The manifest row (:func:`manifest_schema` columns as Python values).
    """
    row = _empty_row(pair_id, str(ir_path), str(vi_path))
    try:
        ir = _read(read_ir, Path(root, ir_path), "IR", ir_path)
        vi = _read(read_visible, Path(root, vi_path), "visible", vi_path)
        if ir.shape[:2] != vi.shape[:2]:
            raise _Rejected(
                "size_mismatch",
                f"IR {ir.shape[1]}x{ir.shape[0]} vs visible {vi.shape[1]}x{vi.shape[0]} (WxH)",
            )
        for img, what, path in ((ir, "IR", ir_path), (vi, "visible", vi_path)):
            if int(img.min()) == int(img.max()):
                raise _Rejected("constant_image", f"{what} {path} is constant (value {int(img.min())})")
        h, w = ir.shape
        row.update(height=h, width=w, vi_channels=1 if vi.ndim == 2 else int(vi.shape[2]), align_mode=options.align)
        vi_out = vi
        if options.align != "off":
            y, _ = split_luma(vi)
            check = align.check_alignment(ir, y, options)
            warp = check.warp
            if options.align == "correct" and check.confident:
                warp = align.rigid_warp(ir, y, check, options)
                if align.displacement_px(warp, h, w) >= options.min_correction_px:
                    vi_out = align.warp_visible(vi, warp, h, w)
                    row["corrected"] = True
            row.update(_alignment_fields(check, warp, h, w))
        out = Path(out_dir)
        write_image(out / "ir" / f"{pair_id}.png", ir)
        write_image(out / "vi" / f"{pair_id}.png", vi_out)
        row["status"] = "ok"
    except _Rejected as rej:
        row["reason"] = rej.reason
    except Exception as exc:  # keep the stage going; the manifest says what happened
        log.exception("pair %s failed", pair_id)
        row["reason"] = f"internal_error: {type(exc).__name__}: {exc}"
    return row


# --------------------------------------------------------------------------------------------------
# the whole step on Ray Data
# --------------------------------------------------------------------------------------------------


@dataclass
class RegisterSummary:
    """Counts of a register run."""

    found: int = 0
    accepted: int = 0
    align: str = "check"
    confident: int = 0
    corrected: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    out_dir: str = ""
    report_dir: str = ""

    def format(self) -> str:
        """Human-readable multi-line summary."""
        lines = [f"register: {self.found} pairs found, {self.accepted} accepted, {sum(self.rejected.values())} rejected"]
        if self.align == "off":
            lines.append("  alignment not checked (register.align: off)")
        else:
            refused = ", ".join(f"{n} {code}" for code, n in self.refused.items()) or "none"
            lines.append(
                f"  alignment ({self.align}): {self.confident} confident, {self.corrected} corrected; "
                f"not confident (never moved): {refused}"
            )
        for code, n in sorted(self.rejected.items()):
            lines.append(f"  rejected {code}: {n}")
        if self.out_dir:
            lines.append(f"  outputs in {self.out_dir} (manifest.parquet, rejected.json, ir/, vi/)")
        if self.report_dir:
            lines.append(f"  alignment report in {self.report_dir} ({REPORT_METRICS}, {REPORT_PICTURE})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)


def _register_group(items: list[dict[str, str]], out_dir: str, options: dict[str, Any], root: str) -> list[dict[str, Any]]:
    """One Ray task: :func:`register_pair` for each item (``pair_id``, ``ir``, ``vi``); the manifest rows."""
    cv2.setNumThreads(1)  # one pair at a time per task; Ray runs as many tasks as there are CPUs
    opts = AlignOptions(**options)
    return [register_pair(it["pair_id"], it["ir"], it["vi"], out_dir, opts, root) for it in items]


def register_dataset(
    ir_dir: str | Path,
    vi_dir: str | Path,
    out_dir: str | Path,
    options: AlignOptions = AlignOptions(),
    progress: bool = True,
) -> RegisterSummary:
    """Run the register step on every pair of ``ir_dir`` / ``vi_dir`` with Ray Data.

    Ray must be initialised by the caller (``pipeline.common.ray_runtime.ray_session``). Outputs are
    built in a staging folder beside ``out_dir`` (``pipeline.common.atomic_io.staging_dir``) that
    replaces it as a whole at the end, so an earlier result is replaced only by a complete new one
    (and kept when no pair survives or a step fails). The alignment report goes to
    ``options.report_dir`` when set (written after the outputs), else into ``out_dir``.

    Args:
        ir_dir, vi_dir: folders of IR and visible images paired by stem.
        out_dir: output folder (see the module docstring for its content).
        options: alignment settings.
        progress: show a tqdm bar (stderr), advanced as results stream back.

    Returns:
        The :class:`RegisterSummary`.

    Raises:
        FileNotFoundError: a folder is missing.
        ValueError: both folders are empty.
        NoPairsError: no pair survived validation.
        ValueError: ``out_dir`` is a non-empty folder that is not a register output.
    """
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.parquet").is_file():
        raise ValueError(f"{out}: not empty and not the output of a register step (no manifest.parquet); refusing to replace it")
    pairs, unmatched = find_pairs(ir_dir, vi_dir)
    rows = _unmatched_rows(unmatched, ir_dir)

    staging = staging_dir(out)
    report_dir = Path(options.report_dir) if options.report_dir else None
    try:
        for sub in ("ir", "vi"):
            (staging / sub).mkdir()
        rows += _register_pairs(pairs, staging, options, progress)
        rows.sort(key=lambda r: r["pair_id"])
        summary = _summarise(rows, len(pairs) + len(unmatched), options, str(out), str(report_dir or out))
        if summary.accepted == 0:
            raise NoPairsError(_no_pairs_message(rows, ir_dir, vi_dir))
        _write_manifest(rows, staging / "manifest.parquet")
        write_json(staging / "rejected.json", [
            {"pair_id": r["pair_id"], "ir": r["ir_src"], "vi": r["vi_src"], "reason": r["reason"]}
            for r in rows if r["status"] != "ok"
        ])
        if report_dir is None:
            write_report(rows, staging, options)
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if report_dir is not None:
        write_report(rows, report_dir, options, written_dir=out)
    return summary


def _unmatched_rows(unmatched: list[tuple[str, str]], ir_dir: str | Path) -> list[dict[str, Any]]:
    """Manifest rows of the files ``find_pairs`` could not pair (``reason``: ``missing_partner: ...``,
    ``duplicate_stem: ...``, ``unreadable: ...``)."""
    rows = []
    for path, reason in unmatched:
        p = Path(path)
        is_ir = p.parent.resolve() == Path(ir_dir).resolve()
        row = _empty_row(p.stem, recorded_path(p) if is_ir else None, None if is_ir else recorded_path(p))
        row["reason"] = reason
        rows.append(row)
    return rows


def _register_pairs(pairs: list[Any], staging: Path, options: AlignOptions, progress: bool) -> list[dict[str, Any]]:
    """Validate, check and write every pair on Ray Data; the manifest rows.

    The pairs are dealt into a few tasks per CPU (``ray_runtime.task_groups``, as crop and stats):
    a task per pair cost Ray Data about 11 ms of CPU each, a third of a pair's own work.
    """
    if not pairs:
        return []
    configure_data_context()
    items = [{"pair_id": p.stem, "ir": recorded_path(p.ir), "vi": recorded_path(p.vi)} for p in pairs]
    groups = task_groups(items, task_count(len(items)))
    fn_kwargs = {"out_dir": str(staging.resolve()), "options": asdict(options), "root": str(Path.cwd())}
    with tqdm(total=len(items), desc="register", unit="pair", disable=not progress) as bar:
        done = map_groups("register", _register_group, groups, fn_kwargs, on_result=lambda _, rows: bar.update(len(rows)))
    return [row for rows in done for row in rows]


def _summarise(
    rows: list[dict[str, Any]], found: int, options: AlignOptions, out_dir: str, report_dir: str
) -> RegisterSummary:
    ok = [r for r in rows if r["status"] == "ok"]
    codes = Counter(str(r["reason"]).split(":", 1)[0] for r in rows if r["status"] != "ok")
    refused = Counter(str(r["align_reason"]).split(":", 1)[0] for r in ok if r["confident"] is False)
    return RegisterSummary(
        found=found,
        accepted=len(ok),
        align=options.align,
        confident=sum(r["confident"] is True for r in ok),
        corrected=sum(bool(r["corrected"]) for r in ok),
        refused=dict(sorted(refused.items())),
        rejected=dict(sorted(codes.items())),
        out_dir=out_dir,
        report_dir=report_dir,
    )


def _no_pairs_message(rows: list[dict[str, Any]], ir_dir: str | Path, vi_dir: str | Path) -> str:
    shown = "; ".join(f"{r['pair_id']}: {r['reason']}" for r in rows[:5])
    more = f" (and {len(rows) - 5} more)" if len(rows) > 5 else ""
    return f"no valid IR/visible pair in {ir_dir} and {vi_dir}: {shown}{more}"


def _write_manifest(rows: list[dict[str, Any]], path: Path) -> None:
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    with atomic_writer(path, "wb") as fh:
        pq.write_table(table, fh)


# --------------------------------------------------------------------------------------------------
# alignment report
# --------------------------------------------------------------------------------------------------


def alignment_metrics(rows: list[dict[str, Any]], options: AlignOptions) -> dict[str, Any]:
    """The DVC metric of a run: pairs checked, confident, corrected, refused (by code), and the median
    and max displacement (``shift_px``) of the confident estimates (0 when there is none)."""
    checked = [r for r in rows if r["status"] == "ok" and r["confident"] is not None]
    shifts = [float(r["shift_px"]) for r in checked if r["confident"]]
    refused = Counter(str(r["align_reason"]).split(":", 1)[0] for r in checked if not r["confident"])
    return {
        "align": options.align,
        "pairs_checked": len(checked),
        "confident": len(shifts),
        "corrected": sum(bool(r["corrected"]) for r in checked),
        "refused": {code: refused.get(code, 0) for code in align.REFUSALS},
        "median_shift_px": round(float(np.median(shifts)), 3) if shifts else 0.0,
        "max_shift_px": round(float(np.max(shifts)), 3) if shifts else 0.0,
    }


def flagged_pairs(rows: list[dict[str, Any]], options: AlignOptions) -> list[dict[str, Any]]:
    """The pairs a person should look at: up to half of ``report_pairs`` confident estimates of at
    least ``min_correction_px`` (largest displacement first), the rest refused estimates (largest
    ECC displacement first); either group fills what the other leaves."""
    checked = [r for r in rows if r["status"] == "ok" and r["confident"] is not None]

    def by_shift(row: dict[str, Any]) -> float:
        return -float(row["shift_px"] or 0.0)

    moved = sorted((r for r in checked if r["confident"] and r["shift_px"] >= options.min_correction_px), key=by_shift)
    refused = sorted((r for r in checked if not r["confident"]), key=by_shift)
    n_moved = min(len(moved), max(options.report_pairs - len(refused), (options.report_pairs + 1) // 2))
    return moved[:n_moved] + refused[: options.report_pairs - n_moved]


def write_report(
    rows: list[dict[str, Any]], report_dir: str | Path, options: AlignOptions, written_dir: str | Path | None = None
) -> None:
    """Write ``alignment.json`` (:func:`alignment_metrics`), ``counts.json`` (its pairs checked and
    confident: the DVC metric) and ``alignment.png`` (edge overlays of
    :func:`flagged_pairs`; a blank note when there is none) into ``report_dir``.

    Args:
        rows: manifest rows of the run.
        report_dir: folder (created).
        options: the run's settings.
        written_dir: folder of the written ``vi/<pair_id>.png`` (default: ``report_dir``).
    """
    folder = Path(report_dir)
    folder.mkdir(parents=True, exist_ok=True)
    metrics = alignment_metrics(rows, options)
    write_json(folder / REPORT_METRICS, metrics)
    write_json(folder / REPORT_COUNTS, {"pairs": metrics["pairs_checked"], "confident": metrics["confident"]})
    picture = overlay_sheet(flagged_pairs(rows, options), Path(written_dir or folder))
    ok, data = cv2.imencode(".png", picture)
    if not ok:
        raise ValueError(f"{folder / REPORT_PICTURE}: PNG encoding failed")
    with atomic_writer(folder / REPORT_PICTURE, "wb") as fh:
        fh.write(data.tobytes())


_TILE_WIDTH = 320
_IR_COLOUR = np.array([255, 0, 255], np.uint8)  # BGR magenta
_VI_COLOUR = np.array([0, 255, 0], np.uint8)  # green; where both edges meet: white


def edge_overlay(ir: np.ndarray, vi_y: np.ndarray) -> np.ndarray:
    """BGR picture of the IR edges (magenta) over the visible edges (green), on the dimmed IR;
    coinciding edges are white."""
    def edges(img: np.ndarray) -> np.ndarray:
        g = align.gradient_magnitude(img)
        return g > max(1.0, float(np.percentile(g, 93)))

    out = np.repeat((ir.astype(np.float32) * 0.3).astype(np.uint8)[..., None], 3, axis=2)
    e_ir, e_vi = edges(ir), edges(vi_y)
    out[e_ir] = _IR_COLOUR
    out[e_vi] = _VI_COLOUR
    out[e_ir & e_vi] = 255
    return out


def overlay_sheet(rows: list[dict[str, Any]], written_dir: Path) -> np.ndarray:
    """One row per pair: the edge overlay as decoded and, for a corrected pair, as written; with the
    pair id, the estimates and the reason."""
    tiles: list[np.ndarray] = []
    for r in rows:
        ir = read_ir(r["ir_src"])
        y, _ = split_luma(read_visible(r["vi_src"]))
        before = edge_overlay(ir, y)
        if r["corrected"]:
            after = edge_overlay(ir, split_luma(read_visible(written_dir / "vi" / f"{r['pair_id']}.png"))[0])
            label_after = "as written (corrected)"
        else:
            warp = np.asarray(r["transform"], np.float64).reshape(2, 3)
            after = edge_overlay(ir, align.warp_visible(y, warp, *ir.shape))
            label_after = "estimate applied (not written)"
        ecc = "failed" if r["ecc_shift"] is None else f"({r['ecc_shift'][0]:.1f}, {r['ecc_shift'][1]:.1f})"
        title = (
            f"{r['pair_id']}: {str(r['align_reason']).split(':', 1)[0]}  ECC {ecc}  "
            f"MI ({r['mi_shift'][0]:.1f}, {r['mi_shift'][1]:.1f})  corr {r['align_score'] or 0:.2f}  "
            f"estimate {r['shift_px']:.1f} px"
        )
        tiles.append(_sheet_row(title, [(before, "as decoded"), (after, label_after)]))
    if not tiles:
        blank = np.full((60, 2 * _TILE_WIDTH, 3), 255, np.uint8)
        cv2.putText(blank, "no flagged pair", (10, 38), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 0), 2, cv2.LINE_AA)
        return blank
    legend = np.full((28, tiles[0].shape[1], 3), 255, np.uint8)
    cv2.putText(legend, "IR edges magenta, visible edges green, both white", (8, 20),
                cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([legend, *tiles])


def _sheet_row(title: str, panels: list[tuple[np.ndarray, str]]) -> np.ndarray:
    scaled = []
    for img, label in panels:
        h, w = img.shape[:2]
        tile = cv2.resize(img, (_TILE_WIDTH, max(1, round(h * _TILE_WIDTH / w))), interpolation=cv2.INTER_AREA)
        cv2.putText(tile, label, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
        scaled.append(tile)
    height = max(t.shape[0] for t in scaled)
    scaled = [np.pad(t, ((0, height - t.shape[0]), (0, 0), (0, 0))) for t in scaled]
    header = np.full((26, _TILE_WIDTH * len(panels), 3), 255, np.uint8)
    cv2.putText(header, title[:100], (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([header, np.hstack(scaled)])
