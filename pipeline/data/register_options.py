"""Settings of the register step (the ``register`` section of ``params.yaml``).

Kept apart from ``pipeline.data.register`` so that reading the defaults (``mda --help``, parameter
validation) imports no image or array library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from pipeline.common.config import read_settings, setting

#: Motion models of the alignment check, simplest first (``pipeline.data.register.MOTIONS`` maps
#: them to OpenCV's ECC motion types).
MOTION_NAMES: tuple[str, ...] = ("translation", "euclidean", "affine")


@dataclass(frozen=True)
class AlignOptions:
    """Settings of the alignment check (the ``register`` section of ``params.yaml``).

    Attributes:
        motion: ``translation``, ``euclidean`` or ``affine``.
        max_shift_px: correct a pair when its estimated displacement exceeds this (pixels).
        max_correction_px: a larger estimated displacement is implausible: recorded as a failure.
        max_size: longest side of the finest ECC level (pixels); larger images are downscaled.
        levels: pyramid levels (coarsest side kept >= 64 px).
        max_iterations: ECC iterations per level.
        eps: ECC convergence threshold (increment of the correlation coefficient).
    """

    motion: str = setting("euclidean", str, choices=list(MOTION_NAMES))
    max_shift_px: float = setting(1.0, float, minimum=0.0)
    max_correction_px: float = setting(40.0, float, minimum=0.0)
    max_size: int = setting(640, int, minimum=32)
    levels: int = setting(3, int, minimum=1, maximum=6)
    max_iterations: int = setting(100, int, minimum=1)
    eps: float = setting(1e-5, float, minimum=0.0)

    def __post_init__(self) -> None:
        if self.motion not in MOTION_NAMES:
            raise ValueError(f"register.motion must be one of {list(MOTION_NAMES)}, got {self.motion!r}")

    @classmethod
    def from_params(cls, cfg: Mapping[str, Any]) -> "AlignOptions":
        """Read the options from the ``register`` section (missing keys take the defaults;
        ``raw_dir`` is the stage's input folder, read by ``dvc.yaml``)."""
        return read_settings(cls, cfg, "register", ignore=("raw_dir",))
