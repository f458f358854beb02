"""Settings of the register step (the ``register`` section of ``params.yaml``).

Kept apart from ``pipeline.data.register`` and ``pipeline.data.align`` so that reading the defaults
(``mda --help``, parameter validation) imports no image or array library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from pipeline.common.config import ParamsError, read_settings, setting

#: What the step does with the alignment of each accepted pair (``register.align``):
#: ``off`` does not estimate it; ``check`` estimates and records it and writes the decoded images
#: unchanged; ``correct`` also warps the visible image of a *confident* pair onto the IR frame.
ALIGN_MODES: tuple[str, ...] = ("off", "check", "correct")


def _align_mode(value: str | bool, key: str) -> str:
    """``register.align``; YAML reads an unquoted ``off`` as ``false``, which means ``off`` here."""
    if value is False:
        return "off"
    if value not in ALIGN_MODES:
        raise ParamsError(f"params: '{key}' must be one of {list(ALIGN_MODES)}, got {value!r}")
    return str(value)


@dataclass(frozen=True)
class AlignOptions:
    """Settings of the alignment check (the ``register`` section of ``params.yaml``).

    The confidence thresholds were chosen from measurements on the real TNO, RoadScene and MSRS
    pairs (README, section "register").

    Attributes:
        align: ``off``, ``check`` or ``correct`` (see :data:`ALIGN_MODES`).
        search_px: plausibility bound: largest offset (per axis, pixels) that may be corrected;
            also the radius of the mutual-information search.
        min_score: least gradient correlation of the ECC estimate for it to count as evidence.
        max_disagreement_px: largest per-axis difference between the ECC and MI shifts.
        min_correction_px: ``correct`` leaves a confident pair alone when its displacement is
            smaller than this (resampling would blur more than it fixes).
        max_rotation_deg: largest rotation ``correct`` applies; a larger tile fit is not used.
        max_size: longest side of the images the estimates run on (larger pairs are downscaled).
        max_iterations: ECC iterations per level.
        eps: ECC convergence threshold (increment of the correlation coefficient).
        report_dir: folder of the alignment report (``alignment.json``, ``alignment.png``);
            empty: the output folder itself.
        report_pairs: how many flagged pairs the picture shows.
    """

    align: str = setting("check", (str, bool), convert=_align_mode)
    search_px: float = setting(12.0, float, minimum=1.0)
    min_score: float = setting(0.15, float, minimum=0.0, maximum=1.0)
    max_disagreement_px: float = setting(1.5, float, minimum=0.0)
    min_correction_px: float = setting(0.25, float, minimum=0.0)
    max_rotation_deg: float = setting(2.0, float, minimum=0.0)
    max_size: int = setting(640, int, minimum=64)
    max_iterations: int = setting(100, int, minimum=1)
    eps: float = setting(1e-5, float, minimum=0.0)
    report_dir: str = setting("", str)
    report_pairs: int = setting(6, int, minimum=0)

    def __post_init__(self) -> None:
        if self.align not in ALIGN_MODES:
            raise ValueError(f"register.align must be one of {list(ALIGN_MODES)}, got {self.align!r}")

    @classmethod
    def from_params(cls, cfg: Mapping[str, Any]) -> "AlignOptions":
        """Read the ``register`` section (``raw_dir`` is the stage's input folder, read by ``dvc.yaml``)."""
        return read_settings(cls, cfg, "register", ignore=("raw_dir",))
