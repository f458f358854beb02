"""The evaluation report: means per method, the per-image CSV, the Markdown table, the image grid,
the offline HTML page (``report.html``) and the image plots of ``dvc.yaml``."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from pipeline.common.atomic_io import write_text_atomic
from pipeline.data.images import read_pair, write_image
from pipeline.evaluate.metrics import DIAGNOSTICS

#: Order of the methods in tables and in the grid (ours last).
METHOD_ORDER: tuple[str, ...] = ("average", "maximum", "official", "ours")


def mean_per_method(per_image: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> dict[str, dict[str, float]]:
    """Means of every metric per method, methods in ``METHOD_ORDER`` (values rounded to 6 digits)."""
    means: dict[str, dict[str, float]] = {}
    present = [m for m in METHOD_ORDER if any(r["method"] == m for r in per_image)]
    present += sorted({r["method"] for r in per_image} - set(present))
    for method in present:
        sel = [r for r in per_image if r["method"] == method]
        means[method] = {m: round(_mean([r[m] for r in sel], m), 6) for m in metrics}
    return means


def _mean(values: Sequence[float], metric: str) -> float:
    """The mean; for a diagnostic (``metrics.DIAGNOSTICS``) over the pairs where it is defined."""
    arr = np.asarray(values, dtype=np.float64)
    if metric in DIAGNOSTICS:
        arr = arr[np.isfinite(arr)]
        return float(arr.mean()) if arr.size else float("nan")
    return float(np.mean(arr))


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
        # higher is better for every metric; a diagnostic (VIgap, IRgap: 0 best) is not ranked
        best[m] = max(vals) if vals and m not in DIAGNOSTICS else float("nan")
    head = "| method | " + " | ".join(metrics) + " |"
    sep = "|---|" + "---:|" * len(metrics)
    lines = []
    if n_pairs is not None:
        lines += [f"Means over the {n_pairs} test pairs (higher is better; best in bold).", ""]
    if any(m in DIAGNOSTICS for m in metrics):
        lines += ["VIgap / IRgap: mean of fused - max(IR, visible) where the visible (IR) image is at least 60 "
                  "levels brighter, over the pairs that have such pixels (gray levels; 0 keeps the brighter input).", ""]
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


# --------------------------------------------------------------------------------------------
# Visual report: eval/report.html (offline, self-contained) and the DVC image plots

#: Folder under the report folder with one sub-folder per grid pair: the images DVC plots show.
PLOTS_DIR = "plots"
#: Folder under the report folder with full-size copies of the test inputs (``ir/``, ``vi/``).
INPUTS_DIR = "inputs"
#: File name of the HTML report under the report folder.
REPORT_FILE = "report.html"
#: Longest side in pixels of the thumbnails embedded in the report.
THUMB_PX = 160


def plot_image_name(label: str) -> str:
    """File name of one image of a grid pair under ``plots/<pair>/``: ``<k>_<label>.png``.

    ``k`` is the position of ``label`` in IR, visible, ``METHOD_ORDER`` (other methods after),
    so that DVC lists the images of a pair in that order and a method keeps its file name from
    one experiment to the next (``dvc plots diff`` pairs images by path).
    """
    order = ["ir", "visible", *METHOD_ORDER]
    k = order.index(label) if label in order else len(order)
    return f"{k}_{label}.png"


def thumbnail_data_uri(img: np.ndarray, max_side: int = THUMB_PX, quality: int = 85) -> tuple[str, int, int]:
    """A JPEG thumbnail (longest side at most ``max_side``) as a ``data:`` URI, with its width and height."""
    h, w = img.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    small = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA) if scale < 1 else img
    ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("OpenCV could not encode a thumbnail")
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii"), nw, nh


def worst_pairs(
    per_image: Sequence[Mapping[str, Any]], metrics: Sequence[str], ours: str = "ours", primary: str = "VIF", n: int = 3
) -> list[dict[str, Any]]:
    """The ``n`` pairs where ``ours`` scores lowest on ``primary``, with the baselines that beat it there.

    Returns:
        ``[{"name", "value", "beaten_by": [{"method", "value", "wins"}], "note"}]``, worst first;
        ``beaten_by`` lists every other method with a higher ``primary`` on that pair (best first),
        ``wins`` the number of ``metrics`` on which it beats ``ours`` on that pair.
    """
    by_method: dict[str, dict[str, Mapping[str, Any]]] = {}
    for r in per_image:
        by_method.setdefault(r["method"], {})[r["name"]] = r
    mine = by_method.get(ours, {})
    ranked = sorted((r for r in mine.values() if np.isfinite(r[primary])), key=lambda r: (r[primary], r["name"]))
    out = []
    for r in ranked[:n]:
        beaten_by = []
        for method, rows in by_method.items():
            other = rows.get(r["name"])
            if method == ours or other is None or not np.isfinite(other[primary]) or other[primary] <= r[primary]:
                continue
            wins = sum(1 for m in metrics if np.isfinite(other[m]) and np.isfinite(r[m]) and other[m] > r[m])
            beaten_by.append({"method": method, "value": float(other[primary]), "wins": wins})
        beaten_by.sort(key=lambda b: -b["value"])
        if beaten_by:
            note = f"{primary} {r[primary]:.4f}; beaten by " + ", ".join(
                f"{b['method']} ({b['value']:.4f}, better on {b['wins']} of {len(metrics)} metrics)" for b in beaten_by
            )
        else:
            note = f"{primary} {r[primary]:.4f}; no baseline beats it"
        out.append({"name": r["name"], "value": float(r[primary]), "beaten_by": beaten_by, "note": note})
    return out


def write_visual_report(
    out_dir: str | Path,
    pairs: Sequence[Mapping[str, str]],
    per_image: Sequence[Mapping[str, Any]],
    means: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str],
    skipped: Mapping[str, str] | None = None,
    plot_pairs: Sequence[str] = (),
    primary: str = "VIF",
    n_worst: int = 3,
) -> Path:
    """Write ``report.html`` and the files it links to into ``out_dir``; returns the page's path.

    Reads the fused images already written to ``out_dir/fused/<method>/<name>.png`` and the test
    inputs (``pairs``: ``name``, ``ir``, ``vi`` paths). Writes:

    - ``inputs/ir/<name>.png``, ``inputs/vi/<name>.png``: full-size copies of the inputs;
    - ``plots/<pair>/<k>_<label>.png`` for each of ``plot_pairs``: IR, visible and every method
      (``plot_image_name``), the image plots of ``dvc.yaml``;
    - ``report.html``: one offline page (inline CSS and script, thumbnails as ``data:`` URIs, no
      external resource): the means table, one row per pair (thumbnails of IR, visible and each
      method, linking to the full-size files; the pair's metrics of ``ours``), columns sortable by
      a click on their header, and a note for the ``n_worst`` pairs of ``ours`` by ``primary``.
    """
    out_dir = Path(out_dir)
    methods = list(means)
    ours = "ours" if "ours" in methods else methods[-1]
    by_key = {(r["method"], r["name"]): r for r in per_image}
    worst = {w["name"]: w for w in worst_pairs(per_image, metrics, ours, primary, n_worst)}
    wanted_plots = set(plot_pairs)

    body_rows = []
    for pair in sorted(pairs, key=lambda p: p["name"]):
        name = pair["name"]
        ir, vi = read_pair(pair["ir"], pair["vi"])
        cells: list[tuple[str, str, np.ndarray, str]] = []  # label, relative href, image, tooltip
        write_image(out_dir / INPUTS_DIR / "ir" / f"{name}.png", ir)
        write_image(out_dir / INPUTS_DIR / "vi" / f"{name}.png", vi)
        cells.append(("ir", f"{INPUTS_DIR}/ir/{name}.png", ir, f"{name}: IR"))
        cells.append(("visible", f"{INPUTS_DIR}/vi/{name}.png", vi, f"{name}: visible"))
        for method in methods:
            path = out_dir / "fused" / method / f"{name}.png"
            img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if img is None:
                raise FileNotFoundError(f"{path}: fused image missing or unreadable")
            row = by_key.get((method, name), {})
            tip = f"{name}: {method}" + "".join(f"\n{m} {_fmt(row.get(m))}" for m in metrics if m in row)
            cells.append((method, f"fused/{method}/{name}.png", img, tip))
        if name in wanted_plots:
            for label, href, img, _ in cells:
                write_image(out_dir / PLOTS_DIR / name / plot_image_name(label), img)
        body_rows.append(_pair_row(name, cells, by_key.get((ours, name), {}), by_key, methods, ours, metrics, primary, worst.get(name)))

    page = _PAGE.format(
        title=html.escape(f"Evaluation: {_count(len(pairs), 'test pair')}"),
        css=_CSS,
        script=_SCRIPT,
        summary=html.escape(
            f"{_count(len(pairs), 'test pair')}; methods: {', '.join(methods)}. Higher is better for every metric; "
            f"best mean in bold. Metrics per pair are those of '{ours}'."
        ),
        means=_means_table(means, metrics),
        skipped="".join(f"<p class=\"skipped\">Baseline <code>{html.escape(m)}</code> skipped: {html.escape(r)}.</p>"
                        for m, r in (skipped or {}).items()),
        worst=_worst_list(list(worst.values()), ours, primary),
        head="".join(f"<th class=\"nosort\">{html.escape(c)}</th>" for c in ["IR", "visible", *methods])
        + "".join(f"<th data-type=\"num\" title=\"{html.escape(ours)} {m}\">{html.escape(m)}</th>" for m in metrics),
        rows="\n".join(body_rows),
    )
    return write_text_atomic(out_dir / REPORT_FILE, page)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and np.isfinite(value) else "n/a"


def _num_cell(value: Any, bold: bool = False) -> str:
    ok = isinstance(value, (int, float)) and np.isfinite(value)
    text = _fmt(value)
    return f"<td data-value=\"{repr(float(value)) if ok else ''}\">{'<b>' + text + '</b>' if bold else text}</td>"


def _means_table(means: Mapping[str, Mapping[str, float]], metrics: Sequence[str]) -> str:
    best = {}
    for m in metrics:
        vals = [v[m] for v in means.values() if v[m] is not None and np.isfinite(v[m])]
        best[m] = max(vals) if vals and m not in DIAGNOSTICS else float("nan")  # diagnostics are not ranked
    head = "<th data-type=\"text\">method</th>" + "".join(f"<th data-type=\"num\">{html.escape(m)}</th>" for m in metrics)
    rows = []
    for method, vals in means.items():
        cells = "".join(
            _num_cell(vals[m], bold=vals[m] is not None and np.isfinite(vals[m]) and bool(np.isclose(vals[m], best[m])))
            for m in metrics
        )
        rows.append(f"<tr><td data-value=\"{html.escape(method)}\">{html.escape(method)}</td>{cells}</tr>")
    return f"<table id=\"means\" class=\"sortable\"><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _worst_list(worst: Sequence[Mapping[str, Any]], ours: str, primary: str) -> str:
    if not worst:
        return "<p>No pairs scored.</p>"
    items = "".join(
        f"<li><a href=\"#pair-{html.escape(w['name'])}\">{html.escape(w['name'])}</a>: {html.escape(w['note'])}</li>"
        for w in worst
    )
    return f"<p>The {_count(len(worst), 'pair')} where <code>{html.escape(ours)}</code> has the lowest {html.escape(primary)}:</p><ol id=\"worst\">{items}</ol>"


def _pair_row(
    name: str,
    cells: Sequence[tuple[str, str, np.ndarray, str]],
    mine: Mapping[str, Any],
    by_key: Mapping[tuple[str, str], Mapping[str, Any]],
    methods: Sequence[str],
    ours: str,
    metrics: Sequence[str],
    primary: str,
    worst: Mapping[str, Any] | None,
) -> str:
    tds = [f"<td data-value=\"{html.escape(name)}\"><span class=\"name\">{html.escape(name)}</span>"
           + (f"<div class=\"note\">{html.escape(worst['note'])}</div>" if worst else "") + "</td>"]
    for label, href, img, tip in cells:
        uri, w, h = thumbnail_data_uri(img)
        score = by_key.get((label, name), {}).get(primary) if label in methods else None
        caption = f"<figcaption>{html.escape(primary)} {_fmt(score)}</figcaption>" if label in methods else ""
        tds.append(
            f"<td class=\"thumb\"><figure><a class=\"full\" href=\"{html.escape(href)}\" title=\"{html.escape(tip)}\">"
            f"<img src=\"{uri}\" width=\"{w}\" height=\"{h}\" alt=\"{html.escape(f'{name} {label}')}\"></a>{caption}</figure></td>"
        )
    tds += [_num_cell(mine.get(m)) for m in metrics]
    cls = " class=\"worst\"" if worst else ""
    return f"<tr id=\"pair-{html.escape(name)}\"{cls}>{''.join(tds)}</tr>"


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.5em;margin:0 0 .3em}h2{font-size:1.15em;margin:1.4em 0 .4em}
table{border-collapse:collapse;margin:.4em 0}th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;vertical-align:middle}
th{background:#f0f0f0;position:sticky;top:0;z-index:1}
th:not(.nosort){cursor:pointer;user-select:none}th:not(.nosort):hover{background:#e0e6ef}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td:first-child,th:first-child{text-align:left}
td.thumb{padding:2px;text-align:center}figure{margin:0}figcaption{font-size:11px;color:#555}
td.thumb img{display:block;margin:auto;image-rendering:auto}
th.nosort{text-align:center}tr.worst{background:#fff4e5}.note{font-size:12px;color:#a04000;min-width:16em;max-width:24em}
.skipped{color:#666}code{background:#f4f4f4;padding:0 3px}
#viewer{position:fixed;inset:0;background:rgba(0,0,0,.85);display:flex;flex-direction:column;align-items:center;justify-content:center;z-index:10;cursor:zoom-out}
#viewer[hidden]{display:none}#viewer img{max-width:95vw;max-height:88vh;background:#000}
#viewer p{color:#eee;margin:.5em}
"""

_SCRIPT = r"""
(function () {
  "use strict";
  function key(td, type) {
    var v = td ? td.getAttribute("data-value") : null;
    if (v === null) v = td ? td.textContent : "";
    if (type === "num") { var x = parseFloat(v); return isNaN(x) ? null : x; }
    return v;
  }
  function sortBy(table, th) {
    var idx = Array.prototype.indexOf.call(th.parentNode.children, th);
    var type = th.getAttribute("data-type") || "text";
    var dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (c) { c.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir);
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var sign = dir === "ascending" ? 1 : -1;
    rows.sort(function (a, b) {
      var x = key(a.cells[idx], type), y = key(b.cells[idx], type);
      if (x === null && y === null) return 0;
      if (x === null) return 1;   /* missing values last either way */
      if (y === null) return -1;
      if (type === "num") return sign * (x - y);
      return sign * String(x).localeCompare(String(y));
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
      if (th.classList.contains("nosort")) return;
      th.tabIndex = 0;
      th.addEventListener("click", function () { sortBy(table, th); });
      th.addEventListener("keydown", function (e) { if (e.key === "Enter") sortBy(table, th); });
    });
  });
  var viewer = document.getElementById("viewer"), cap = document.getElementById("viewer-cap");
  function close() {  /* the full-size <img> exists only while shown */
    viewer.hidden = true;
    Array.prototype.forEach.call(viewer.querySelectorAll("img"), function (i) { i.remove(); });
  }
  Array.prototype.forEach.call(document.querySelectorAll("a.full"), function (a) {
    a.addEventListener("click", function (e) {
      if (e.ctrlKey || e.metaKey || e.shiftKey || e.button !== 0) return;  /* new tab as usual */
      e.preventDefault();
      close();
      var big = document.createElement("img");
      big.id = "viewer-img";
      big.alt = "full-size image";
      big.src = a.getAttribute("href");
      viewer.insertBefore(big, cap);
      cap.textContent = a.getAttribute("title").split("\n")[0] + " (" + a.getAttribute("href") + "; click or Esc to close)";
      viewer.hidden = false;
    });
  });
  viewer.addEventListener("click", close);
  document.addEventListener("keydown", function (e) { if (e.key === "Escape") close(); });
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="icon" href="data:,">
<style>{css}</style>
</head>
<body>
<h1>{title}</h1>
<p>{summary}</p>
<h2>Means</h2>
{means}
{skipped}
<h2>Worst pairs</h2>
{worst}
<h2>Per pair</h2>
<p>Click a column header to sort; click a thumbnail for the full-size image (files beside this page).</p>
<table id="pairs" class="sortable">
<thead><tr><th data-type="text">pair</th>{head}</tr></thead>
<tbody>
{rows}
</tbody>
</table>
<div id="viewer" hidden><p id="viewer-cap"></p></div>
<script>{script}</script>
</body>
</html>
"""
