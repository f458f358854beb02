"""``models/train.json``: the train stage's hand-off to evaluate and promote, and its one reader.

It names the MLflow run (``run_id``), the logged model (``model_uri``) and the best checkpoint
(``checkpoint``), plus the run's figures. Kept apart from the training code so that the stages that
read it do not depend on (and are not re-run by changes to) the trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.common.atomic_io import read_json_object

#: Keys every training summary carries.
REQUIRED_KEYS: tuple[str, ...] = ("run_id", "model_uri", "checkpoint")


def read_train_info(path: str | Path) -> dict[str, Any]:
    """Read ``models/train.json`` (``run_id``, ``model_uri``, ``checkpoint``, ...).

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: not JSON, not an object, or a required key is missing.
    """
    return read_json_object(path, "training summary", hint="run the train stage", required=REQUIRED_KEYS)
