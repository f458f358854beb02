"""A small synthetic IR/visible dataset whose two modalities are truly complementary.

Every pair is a road scene at dusk, rendered twice from the same layout:

- **visible** (``uint8`` BGR): sky, buildings with lit/unlit windows, trees, a road with lane
  marks, fine texture and colour; large parts are dark (night) or low-contrast, and the targets
  (people, vehicles) are painted in the colour of their surroundings, so they are faint there.
- **IR** (``uint8`` gray): a smooth thermal background (cold sky, mild ground, slightly warm road and
  buildings, no fine texture) with warm targets, clearly brighter than their surroundings.

The pairs are registered (pixel-aligned). Generation is vectorised numpy/OpenCV and deterministic:
pair ``i`` only depends on ``(seed, i, height, width)``, and the same arguments write byte-identical
PNG files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.data.demo_options import DemoOptions
from pipeline.data.images import write_image

_DEFAULTS = DemoOptions()

#: Per-target temperature rise in the IR image (gray levels above the local background).
_TARGET_WARMTH = (70.0, 110.0)


@dataclass(frozen=True)
class DemoPair:
    """One synthetic pair.

    Attributes:
        ir: ``uint8`` (H, W) thermal image.
        vi: ``uint8`` BGR (H, W, 3) visible image, registered with ``ir``.
        targets: ``bool`` (H, W) mask of the warm targets (people, vehicles).
    """

    ir: np.ndarray
    vi: np.ndarray
    targets: np.ndarray


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth random field in [0, 1], (h, w) float32, with about ``cells`` bumps across the width."""
    ch = max(2, int(round(cells * h / max(w, 1))))
    coarse = rng.random((ch, cells)).astype(np.float32)
    field = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    lo, hi = float(field.min()), float(field.max())
    return (field - lo) / max(hi - lo, 1e-6)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Zero-mean fine texture (h, w) float32, std about 1: pixel noise plus a mid-scale component."""
    fine = rng.standard_normal((h, w)).astype(np.float32)
    mid = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 1.5)
    mid /= max(float(mid.std()), 1e-6)
    return 0.6 * fine + 0.8 * mid


def _paint(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    canvas[mask] = colour


def synth_pair(seed: int, index: int, height: int = _DEFAULTS.height, width: int = _DEFAULTS.width) -> DemoPair:
    """Render pair ``index`` of the demo dataset.

    Args:
        seed: dataset seed.
        index: pair number (0-based); each pair has its own random stream ``(seed, index)``.
        height, width: image size in pixels (at least 32 x 32).

    Returns:
        The :class:`DemoPair` (IR, visible BGR, target mask).
    """
    if height < 32 or width < 32:
        raise ValueError(f"demo image size must be at least 32x32, got {height}x{width}")
    rng = np.random.default_rng([int(seed), int(index)])
    h, w = int(height), int(width)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    # ---- layout (shared by both modalities) -------------------------------------------------
    horizon = int(h * rng.uniform(0.30, 0.42))
    sky = yy < horizon
    ground = ~sky
    # road: trapezoid from a vanishing point on the horizon to the bottom edge
    vx = w * rng.uniform(0.35, 0.65)
    half_bottom = w * rng.uniform(0.25, 0.40)
    t = np.clip((yy - horizon) / max(h - horizon, 1), 0.0, 1.0)
    road = ground & (np.abs(xx - vx) < 2 + half_bottom * t)
    lanes = road & (np.abs(xx - vx) < 0.6 + 0.015 * w * t) & (np.mod(yy - horizon, 14) < 7)

    buildings = np.zeros((h, w), bool)
    windows = np.zeros((h, w), bool)
    lit = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(2, 5))):
        bw = int(w * rng.uniform(0.10, 0.22))
        bh = int(horizon * rng.uniform(0.35, 0.85))
        x0 = int(rng.integers(0, max(1, w - bw)))
        rect = (xx >= x0) & (xx < x0 + bw) & (yy >= horizon - bh) & (yy < horizon)
        buildings |= rect
        win = rect & (np.mod(xx - x0, 7) >= 3) & (np.mod(yy - (horizon - bh), 8) >= 4)
        windows |= win
        cell_on = rng.random((h // 8 + 1, w // 7 + 1)) < 0.35
        lit |= win & cell_on[(yy // 8).astype(int), (xx // 7).astype(int)]

    tree_field = _smooth_field(rng, h, w, 10)
    trees = ground & ~road & (tree_field > 0.62) & (yy < horizon + (h - horizon) * 0.6)

    # ---- targets: people (tall ellipses) and vehicles (wide boxes), preferably in the dark ----
    darkness = _smooth_field(rng, h, w, 3)  # 1 = darkest
    light = 1.0 - 0.9 * np.clip((darkness - 0.1) / 0.5, 0.0, 1.0)  # 0.1 .. 1 illumination
    targets = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(2, 5))):
        person = rng.random() < 0.55
        th = h * (rng.uniform(0.12, 0.20) if person else rng.uniform(0.07, 0.11))
        tw = th * (rng.uniform(0.30, 0.40) if person else rng.uniform(1.6, 2.2))
        # candidate feet positions on the ground; keep the darkest one
        cx = rng.uniform(tw, w - tw, size=8)
        cy = rng.uniform(horizon + th, h - 2, size=8)
        best = int(np.argmax(darkness[cy.astype(int), cx.astype(int)]))
        cx, cy = float(cx[best]), float(cy[best]) - th / 2
        if person:
            shape = ((xx - cx) / (tw / 2)) ** 2 + ((yy - cy) / (th / 2)) ** 2 <= 1.0
        else:
            shape = (np.abs(xx - cx) <= tw / 2) & (np.abs(yy - cy) <= th / 2)
        targets |= shape

    # ---- visible (float BGR 0-255 before lighting) ----------------------------------------------
    vis = np.zeros((h, w, 3), np.float32)
    sky_grad = (yy / max(horizon, 1))[..., None]
    sky_col = (1 - sky_grad) * np.array([120, 70, 40], np.float32) + sky_grad * np.array([170, 140, 150], np.float32)
    vis[sky] = sky_col[sky]
    grass = np.array([70, 150, 95], np.float32) * rng.uniform(0.85, 1.15)
    _paint(vis, ground, grass)
    _paint(vis, road, np.array([58, 56, 60], np.float32))  # asphalt: darker than the grass
    _paint(vis, lanes, np.array([225, 230, 230], np.float32))
    _paint(vis, trees, np.array([35, 85, 40], np.float32))
    _paint(vis, buildings, np.array([120, 130, 150], np.float32) * rng.uniform(0.8, 1.1))
    _paint(vis, windows, np.array([50, 45, 40], np.float32))
    _paint(vis, lit, np.array([120, 220, 250], np.float32))
    # targets take the local background colour (camouflaged), barely offset
    local = cv2.blur(vis, (15, 15))
    vis[targets] = local[targets] + 6.0
    tex = _texture(rng, h, w)
    amp = np.where(trees, 18.0, np.where(sky, 3.0, 8.0)).astype(np.float32)
    vis += (amp * tex)[..., None]
    # night: darkness everywhere it is dark, lit windows stay bright; then camera noise
    gain = np.where(lit, 1.0, light)[..., None]
    vis = vis * gain + rng.normal(0.0, 2.0, (h, w, 3)).astype(np.float32)
    vi = np.clip(np.round(vis), 0, 255).astype(np.uint8)

    # ---- IR: smooth thermal background + warm targets -----------------------------------------
    temp = np.where(sky, 25.0 + 20.0 * (yy / max(horizon, 1)), 80.0).astype(np.float32)
    temp += 25.0 * _smooth_field(rng, h, w, 4) * ground
    temp = np.where(road, temp + 30.0, temp)
    temp = np.where(lanes, temp - 12.0, temp)  # paint: lower emissivity
    temp = np.where(trees, temp - 20.0, temp)
    temp = np.where(buildings, 100.0, temp)
    temp = np.where(windows, temp - 12.0, temp)  # glass reflects the cold sky
    temp = np.where(lit, temp + 35.0, temp)
    temp = cv2.GaussianBlur(temp, (0, 0), 1.0)  # thermal optics: soft but not blurred away
    warmth = np.zeros((h, w), np.float32)
    n_lab, labels = cv2.connectedComponents(targets.astype(np.uint8))
    rises = rng.uniform(*_TARGET_WARMTH, size=max(n_lab, 1)).astype(np.float32)
    warmth[targets] = rises[labels[targets]]
    warmth = cv2.GaussianBlur(warmth, (0, 0), 1.2)
    ir_f = temp + warmth + rng.normal(0.0, 1.5, (h, w)).astype(np.float32)
    ir = np.clip(np.round(ir_f), 0, 255).astype(np.uint8)
    return DemoPair(ir=ir, vi=vi, targets=targets)


def generate_demo(
    out_dir: str | Path,
    num_pairs: int = _DEFAULTS.num_pairs,
    height: int = _DEFAULTS.height,
    width: int = _DEFAULTS.width,
    seed: int = _DEFAULTS.seed,
) -> list[str]:
    """Write the demo dataset: ``out_dir/ir/<stem>.png`` and ``out_dir/vi/<stem>.png``.

    Args:
        out_dir: destination folder (created; files of the same names are replaced atomically).
        num_pairs: number of pairs (>= 1).
        height, width: image size in pixels.
        seed: dataset seed; the same arguments give byte-identical files.

    Returns:
        The stems written (``demo_000``, ``demo_001``, ...).
    """
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    out = Path(out_dir)
    stems = []
    for i in range(num_pairs):
        pair = synth_pair(seed, i, height, width)
        stem = f"demo_{i:03d}"
        write_image(out / "ir" / f"{stem}.png", pair.ir)
        write_image(out / "vi" / f"{stem}.png", pair.vi)
        stems.append(stem)
    return stems
