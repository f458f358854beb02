"""Settings of the register step (the ``register`` section of ``params.yaml``).

Kept apart from ``pipeline.data.register`` so that reading the defaults (``mda --help``, parameter
validation) imports no image or array library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

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

    motion: str = "euclidean"
    max_shift_px: float = 1.0
    max_correction_px: float = 40.0
    max_size: int = 640
    levels: int = 3
    max_iterations: int = 100
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.motion not in MOTION_NAMES:
            raise ValueError(f"register.motion must be one of {list(MOTION_NAMES)}, got {self.motion!r}")

    @classmethod
    def from_params(cls, cfg: Mapping[str, Any]) -> "AlignOptions":
        """Read the options from the ``register`` section (missing keys take the defaults)."""
        from pipeline.common.config import param

        d = cls()
        return cls(
            motion=param(cfg, "motion", str, where="register", default=d.motion, choices=list(MOTION_NAMES)),
            max_shift_px=param(cfg, "max_shift_px", float, where="register", default=d.max_shift_px, minimum=0.0),
            max_correction_px=param(
                cfg, "max_correction_px", float, where="register", default=d.max_correction_px, minimum=0.0
            ),
            max_size=param(cfg, "max_size", int, where="register", default=d.max_size, minimum=32),
            levels=param(cfg, "levels", int, where="register", default=d.levels, minimum=1, maximum=6),
            max_iterations=param(cfg, "max_iterations", int, where="register", default=d.max_iterations, minimum=1),
            eps=param(cfg, "eps", float, where="register", default=d.eps, minimum=0.0),
        )
