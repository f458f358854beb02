"""The shipped model: the promoted checkpoint copied to ``models/pretrained/`` with its model card.

The ``ship`` stage of a recipe pipeline (``recipes/cpu/dvc.yaml``) runs last. It ships only a
model that the promotion gate made ``champion``; the card records what made it (command, data,
parameters, steps, time, machine, commit, MLflow run and registry version) and its test scores,
which are the evaluate stage's means for the same file and the same test pairs, the files as
shipped (``register.align: check`` writes them pixel-identical).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pipeline.common.atomic_io import copy_atomic, write_json
from pipeline.common.config import read_settings, setting
from pipeline.common.machine import describe_machine
from pipeline.data.contracts import read_split
from pipeline.data.gather import read_datasets
from pipeline.evaluate.metrics import HEADLINE
from pipeline.model.weights import load_model

#: eval/means.json method -> name in the card
CARD_NAMES = {"official": "authors' weights", "average": "average", "maximum": "maximum"}


@dataclass(frozen=True)
class ShipConfig:
    """The ``ship:`` section."""

    file: str = setting("mda_cpu", str)
    name: str = setting("mda-cpu-recipe", str)
    command: str = setting("dvc repro recipes/cpu/dvc.yaml", str)
    test_set: str = setting("TNO-25", str)

    @classmethod
    def from_params(cls, cfg: Mapping[str, Any]) -> "ShipConfig":
        return read_settings(cls, cfg, "ship")


def git_commit() -> str | None:
    """HEAD of the repository around the current folder, ``+dirty`` when tracked files differ."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return json.loads(path.read_text())


def data_record(split_json: str | Path, raw_dir: str | Path | None, test_list: str | None) -> dict[str, Any]:
    """Pairs per split, and per dataset for a gathered raw folder."""
    split = read_split(split_json)
    datasets = read_datasets(raw_dir) if raw_dir else {}
    parts = {k: split[k] for k in ("train", "val", "test")}
    record: dict[str, Any] = {f"{k}_pairs_total": len(v) for k, v in parts.items()}
    if datasets:
        for k, ids in parts.items():
            record[f"{k}_pairs"] = dict(Counter(datasets.get(i, "?") for i in ids))
    record["test_list"] = test_list
    return record


def ship(cfg: ShipConfig, checkpoint: str | Path, train_info: str | Path, eval_metrics: str | Path,
         promotion: str | Path, split_json: str | Path, out_model: str | Path, out_card: str | Path,
         raw_dir: str | Path | None = None, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Copy ``checkpoint`` to ``out_model`` and write its card ``out_card``; returns the card.

    Raises:
        ValueError: the model was not promoted to ``champion`` (the gate's reasons named), or its
            evaluation lacks our row.
    """
    decision = _read_json(promotion)
    if decision.get("decision") != "champion":
        raise ValueError(f"{promotion}: the model was not promoted ({decision.get('decision')}: "
                         f"{'; '.join(decision.get('reasons', []))}); nothing shipped")
    means = _read_json(eval_metrics)
    if "ours" not in means:
        raise ValueError(f"{eval_metrics}: no 'ours' row")
    info = _read_json(train_info)
    load_model(checkpoint)  # refuses a file that does not load (or holds non-finite weights)
    params = params or {}
    card = {
        "name": cfg.name,
        "command": cfg.command,
        "output": str(out_model),
        "sha256": hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest(),
        "model": params.get("model", {}),
        "postprocess": "clip",
        "data": data_record(split_json, raw_dir, (params.get("crop") or {}).get("test_list")),
        "params": {k: params.get(k) for k in ("stats", "loss", "train") if k in params},
        "train_steps": info.get("steps"),
        "train_stopped_by": info.get("stopped_by"),
        "train_seconds": info.get("fit_time_s"),
        "machine": describe_machine(),
        "git_commit": git_commit(),
        "mlflow_run_id": info.get("run_id"),
        "registry": {"model_name": decision.get("model_name"), "version": decision.get("version"),
                     "alias": decision.get("decision")},
        "test_set": cfg.test_set,
        "licence": ("the network: Apache-2.0 (this project); trained with the style term on ImageNet VGG-16 "
                    "features (torchvision, BSD-3-Clause; ImageNet-1k is for non-commercial research: "
                    "models/vgg16/SOURCE.md)" if (params.get("loss") or {}).get("style", {}).get("enabled")
                    else "Apache-2.0 (this project)"),
        "tno25": means["ours"],
        "tno25_baselines": {CARD_NAMES.get(k, k): v for k, v in means.items() if k != "ours"},
    }
    # only now, with the card complete: nothing is shipped by a stage that fails
    copy_atomic(Path(checkpoint), Path(out_model))
    write_json(Path(out_card), card)
    return card


def wins(card: Mapping[str, Any], baseline: str) -> list[str]:
    """Headline metrics on which the card's model beats ``baseline`` of its card."""
    ours, ref = card["tno25"], card["tno25_baselines"][baseline]
    return [m for m in HEADLINE if ours[m] > ref[m]]
