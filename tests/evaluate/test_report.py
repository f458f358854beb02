"""``pipeline/evaluate/report.py``: the offline HTML report, its thumbnails, the worst-pair notes and
the DVC image plots (no Ray; the page in a real browser is ``tests/test_browser.py``)."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.evaluate.metrics import METRICS
from pipeline.evaluate.report import (
    THUMB_PX, mean_per_method, plot_image_name, thumbnail_data_uri, worst_pairs, write_visual_report,
)

METHODS = ("average", "maximum", "ours")


def _row(method: str, name: str, vif: float, other: float = 0.5) -> dict:
    return {"method": method, "name": name, **{m: other for m in METRICS}, "VIF": vif}


@pytest.fixture()
def evaluated(tmp_path):
    """An ``eval`` folder as the stage leaves it before the report: fused/<method>/<name>.png, inputs."""
    rng = np.random.default_rng(1)
    out, src = tmp_path / "eval", tmp_path / "registered"
    pairs, per_image = [], []
    vif = {"average": [0.6, 0.2, 0.5, 0.4], "maximum": [0.7, 0.9, 0.1, 0.3], "ours": [0.5, 0.3, 0.8, 0.2]}
    for k in range(4):
        name = f"p{k}"
        h, w = (300, 400) if k == 0 else (60, 80)  # one large pair: its thumbnail is scaled down
        ir = rng.integers(0, 256, (h, w), dtype=np.uint8)
        vi = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if k != 1 else rng.integers(0, 256, (h, w), dtype=np.uint8)
        for folder, img in (("ir", ir), ("vi", vi)):
            (src / folder).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(src / folder / f"{name}.png"), img)
        pairs.append({"name": name, "ir": str(src / "ir" / f"{name}.png"), "vi": str(src / "vi" / f"{name}.png")})
        for method in METHODS:
            (out / "fused" / method).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out / "fused" / method / f"{name}.png"), vi)
            per_image.append(_row(method, name, vif[method][k]))
    per_image[0]["CC"] = float("nan")
    return out, pairs, per_image


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_report_page_is_self_contained_and_links_full_size_files(evaluated):
    out, pairs, per_image = evaluated
    means = mean_per_method(per_image, METRICS)
    path = write_visual_report(out, pairs, per_image, means, METRICS, {"official": "weights not found"},
                               plot_pairs=["p0", "p2"])
    assert path == out / "report.html"
    text = path.read_text()
    parser = _Collect()
    parser.feed(text)
    tags = parser.tags

    # offline: no external script, stylesheet, font or image; scripts and styles inline
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "@import" not in text and "url(" not in text
    assert all("src" not in a for t, a in tags if t == "script")
    assert not [a for t, a in tags if t == "link" and a.get("rel") == "stylesheet"]

    # thumbnails: data URIs, longest side <= THUMB_PX; each links to an existing full-size file
    imgs = [a for t, a in tags if t == "img"]
    assert len(imgs) == 4 * (2 + len(METHODS))
    for a in imgs:
        assert a["src"].startswith("data:image/jpeg;base64,")
        thumb = cv2.imdecode(np.frombuffer(base64.b64decode(a["src"].split(",", 1)[1]), np.uint8), cv2.IMREAD_UNCHANGED)
        assert max(thumb.shape[:2]) <= THUMB_PX and (int(a["width"]), int(a["height"])) == (thumb.shape[1], thumb.shape[0])
    links = [a["href"] for t, a in tags if t == "a" and "full" in a.get("class", "")]
    assert len(links) == len(imgs)
    for href in links:
        assert (out / href).is_file(), href
    assert "inputs/ir/p0.png" in links and "inputs/vi/p3.png" in links and "fused/ours/p2.png" in links
    assert cv2.imread(str(out / "inputs/ir/p0.png"), cv2.IMREAD_UNCHANGED).shape == (300, 400)

    # one row per pair with the 11 metrics of ours (NaN shown as n/a, sorted last), sortable headers
    rows = [a for t, a in tags if t == "tr" and a.get("id", "").startswith("pair-")]
    assert [r["id"] for r in rows] == ["pair-p0", "pair-p1", "pair-p2", "pair-p3"]
    headers = re.findall(r'<th data-type="num" title="ours (\w+)">', text)
    assert headers == list(METRICS)
    assert 'id="means" class="sortable"' in text and 'id="pairs" class="sortable"' in text
    assert "n/a" in text and "weights not found" in text

    # the worst 3 pairs of ours by VIF, with the baselines that beat it
    worst = re.findall(r'<li><a href="#pair-(\w+)">', text)
    assert worst == ["p3", "p1", "p0"]
    assert "p3</a>: VIF 0.2000; beaten by average (0.4000" in text and "maximum (0.3000" in text
    assert "p0</a>: VIF 0.5000; beaten by maximum (0.7000" in text and "average (0.6000" in text

    # DVC image plots for the chosen pairs only, in the order IR, visible, baselines, ours
    plots = sorted(p.relative_to(out / "plots").as_posix() for p in (out / "plots").rglob("*.png"))
    assert plots == [f"{n}/{f}" for n in ("p0", "p2")
                     for f in ("0_ir.png", "1_visible.png", "2_average.png", "3_maximum.png", "5_ours.png")]


def test_worst_pairs_notes():
    rows = [_row("average", "a", 0.5), _row("maximum", "a", 0.4), _row("ours", "a", 0.45),
            _row("average", "b", 0.1), _row("ours", "b", 0.9), _row("ours", "c", float("nan"))]
    rows[0]["EN"] = 0.9  # average beats ours on VIF and EN on pair a
    worst = worst_pairs(rows, METRICS, n=3)
    assert [w["name"] for w in worst] == ["a", "b"]  # NaN VIF is not ranked
    assert worst[0]["beaten_by"] == [{"method": "average", "value": 0.5, "wins": 2}]
    assert worst[0]["note"] == "VIF 0.4500; beaten by average (0.5000, better on 2 of 11 metrics)"
    assert worst[1]["beaten_by"] == [] and worst[1]["note"].endswith("no baseline beats it")


def test_plot_image_names_keep_their_place():
    assert [plot_image_name(x) for x in ("ir", "visible", "average", "maximum", "official", "ours")] == [
        "0_ir.png", "1_visible.png", "2_average.png", "3_maximum.png", "4_official.png", "5_ours.png"]
    assert plot_image_name("newmethod") == "6_newmethod.png"


def test_thumbnail_keeps_aspect_and_small_images():
    uri, w, h = thumbnail_data_uri(np.zeros((480, 640, 3), np.uint8))
    assert (w, h) == (160, 120) and uri.startswith("data:image/jpeg;base64,")
    _, w, h = thumbnail_data_uri(np.zeros((50, 30), np.uint8))
    assert (w, h) == (30, 50)


def test_missing_fused_image_is_named(evaluated):
    out, pairs, per_image = evaluated
    (out / "fused/maximum/p2.png").unlink()
    with pytest.raises(FileNotFoundError, match="fused/maximum/p2.png"):
        write_visual_report(out, pairs, per_image, mean_per_method(per_image, METRICS), METRICS)
