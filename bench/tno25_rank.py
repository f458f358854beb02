"""Rank a model among the published methods on TNO-25 by mean rank over the 8 headline metrics.

The published rows are our evaluator's means on their fused images and the pixel baselines from
the files as shipped (``docs/metrics.md``); the model's row comes from a recipe's
``eval/means.json`` (``ours``). Prints the ranking and on how many metrics the model beats each row.

Usage: ``python bench/tno25_rank.py [recipes/cpu/eval/means.json]``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.evaluate.metrics import HEADLINE

#: method -> EN, SD, SF, MI, SCD, VIF, Qabf, SSIM (docs/metrics.md)
PUBLISHED = {
    "authors' MDA weights": (6.414, 25.70, 8.10, 1.477, 1.370, 0.455, 0.278, 0.733),
    "pixel average": (6.421, 26.11, 6.94, 1.614, 1.541, 0.575, 0.358, 1.016),
    "pixel maximum": (6.813, 40.01, 10.06, 4.713, 1.540, 0.924, 0.599, 1.000),
    "DenseFuse": (6.772, 33.36, 8.82, 1.635, 1.722, 0.630, 0.444, 1.046),
    "RFN-Nest": (6.892, 34.97, 5.97, 1.504, 1.723, 0.541, 0.336, 0.844),
    "FusionGAN": (6.480, 28.84, 6.27, 1.628, 1.272, 0.418, 0.224, 0.680),
    "SeAFusion": (7.104, 44.20, 12.41, 1.997, 1.717, 0.689, 0.507, 0.988),
    "PIAFusion": (6.869, 39.29, 10.28, 2.460, 1.557, 0.764, 0.557, 0.996),
    "IFCNN": (6.888, 38.40, 13.74, 1.499, 1.741, 0.619, 0.492, 1.022),
    "PMGI": (6.951, 35.83, 8.91, 1.651, 1.631, 0.603, 0.412, 0.978),
    "SDNet": (6.640, 32.65, 12.06, 1.516, 1.492, 0.557, 0.437, 0.997),
    "U2Fusion": (6.879, 35.72, 11.71, 1.440, 1.719, 0.592, 0.446, 0.984),
}


def mean_ranks(rows: dict[str, tuple[float, ...]]) -> dict[str, float]:
    """Mean over the metrics of each method's rank (1 = best; ties share the better rank)."""
    ranks = {name: 0.0 for name in rows}
    for j in range(len(HEADLINE)):
        for name, vals in rows.items():
            ranks[name] += 1 + sum(other[j] > vals[j] for other in rows.values())
    return {name: r / len(HEADLINE) for name, r in ranks.items()}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else "recipes/cpu/eval/means.json")
    ours = json.loads(path.read_text())["ours"]
    rows = {**PUBLISHED, "ours": tuple(float(ours[m]) for m in HEADLINE)}
    ranks = mean_ranks(rows)
    order = sorted(ranks, key=lambda n: ranks[n])
    for place, name in enumerate(order, 1):
        beats = "" if name == "ours" else f"  ours beats it on {sum(a > b for a, b in zip(rows['ours'], rows[name]))}/8"
        print(f"{place:2d}. {name:22s} mean rank {ranks[name]:.2f}{beats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
