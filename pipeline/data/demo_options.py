"""Settings of the demo stage (the ``demo`` section of ``params.yaml``), shared by ``mda demo``.

Kept apart from ``pipeline.data.demo`` so that ``mda --help`` imports no image or array library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from pipeline.common.config import read_settings, setting


@dataclass(frozen=True)
class DemoOptions:
    """The synthetic demo dataset.

    Attributes:
        num_pairs: number of pairs (stems ``demo_000``, ...).
        height, width: image size in pixels.
        seed: dataset seed; the same settings give byte-identical files.
    """

    num_pairs: int = setting(12, int, minimum=1)
    height: int = setting(160, int, minimum=32)
    width: int = setting(224, int, minimum=32)
    seed: int = setting(2024, int)

    @classmethod
    def from_params(cls, cfg: Mapping[str, Any]) -> "DemoOptions":
        """Read the ``demo`` section (``out_dir`` is the stage's output folder, read by ``dvc.yaml``)."""
        return read_settings(cls, cfg, "demo", ignore=("out_dir",))
