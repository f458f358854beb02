"""Small generated inputs of the ``train`` stage, following the team's data contract.

``make_train_inputs(root)`` writes, under ``root``: ``registered/{ir,vi}/<stem>.png``,
``patches/split.json``, ``stats/patches/part-0000.parquet`` (patch columns, patch weights ``w_*``
and the pair's image weights ``img_w_*``) and
``stats/images.parquet`` (per-pair image weights), and returns the paths.

Also the tiny network, loss and patch batch of the training tests (``tiny_model``, ``tiny_loss``,
``patch_batch``) and a fake Ray Train run folder (``fake_ray_run``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from conftest import REPO

TINY_MODEL = {"name": "mda", "args": {"width": 8, "reduction": 2, "up2_channels": 4, "up4_channels": 4}}


def _scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    vi = 90 + 60 * np.sin(xx / rng.uniform(3, 7)) * np.cos(yy / rng.uniform(3, 7)) + rng.normal(0, 6, (h, w))
    ir = np.full((h, w), 40.0) + rng.normal(0, 4, (h, w))
    cy, cx = rng.integers(8, h - 8), rng.integers(8, w - 8)
    ir += 180 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30.0)
    return np.clip(ir, 0, 255).astype(np.uint8), np.clip(vi, 0, 255).astype(np.uint8)


def make_train_inputs(
    root: Path, n_train: int = 3, n_val: int = 2, size: tuple[int, int] = (44, 60), patch: int = 16,
    colour_val: bool = True, seed: int = 0,
) -> dict[str, Path]:
    """Write generated registered pairs, split, patch table and image table under ``root``."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.images import write_image

    rng = np.random.default_rng(seed)
    root = Path(root)
    reg = root / "registered"
    (reg / "ir").mkdir(parents=True, exist_ok=True)
    (reg / "vi").mkdir(parents=True, exist_ok=True)
    train_ids = [f"t{i:02d}" for i in range(n_train)]
    val_ids = [f"v{i:02d}" for i in range(n_val)]
    rows: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    h, w = size
    for stem in train_ids + val_ids:
        ir, vi = _scene(rng, h, w)
        split = "train" if stem in train_ids else "val"
        write_image(reg / "ir" / f"{stem}.png", ir)
        if split == "val" and colour_val:
            vis = np.stack([vi, np.clip(vi.astype(int) + 20, 0, 255).astype(np.uint8), vi // 2], axis=-1)
            write_image(reg / "vi" / f"{stem}.png", vis)
        else:
            write_image(reg / "vi" / f"{stem}.png", vi)
        wi, wd = float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7))
        images.append({"pair_id": stem, "split": split, "w_int_ir": wi, "w_int_vi": 1 - wi,
                       "w_det_ir": wd, "w_det_vi": 1 - wd})
        for y in range(0, h - patch + 1, patch // 2):
            for x in range(0, w - patch + 1, patch // 2):
                a, b = float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.2, 0.8))
                rows.append({
                    "pair_id": stem, "split": split, "y": y, "x": x, "size": patch,
                    "ir": ir[y:y + patch, x:x + patch].tobytes(), "vi": vi[y:y + patch, x:x + patch].tobytes(),
                    "w_int_ir": a, "w_int_vi": 1 - a, "w_det_ir": b, "w_det_vi": 1 - b,
                    "img_w_int_ir": wi, "img_w_int_vi": 1 - wi, "img_w_det_ir": wd, "img_w_det_vi": 1 - wd,
                })
    table = pa.Table.from_pandas(pd.DataFrame(rows).astype({"y": "int32", "x": "int32", "size": "int32"}),
                                 preserve_index=False)
    (root / "stats" / "patches").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / "stats" / "patches" / "part-0000.parquet")
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(images), preserve_index=False), root / "stats" / "images.parquet")
    (root / "patches").mkdir(parents=True, exist_ok=True)
    (root / "patches" / "split.json").write_text(json.dumps({"seed": seed, "fractions": {}, "train": train_ids,
                                                             "val": val_ids, "test": []}))
    return {"registered": reg, "split": root / "patches" / "split.json", "patches": root / "stats" / "patches",
            "images": root / "stats" / "images.parquet", "n_train_patches": sum(r["split"] == "train" for r in rows)}


def tiny_params(tmp: Path, **train: Any) -> dict[str, Any]:
    """``params.yaml`` of the repository with a tiny model, quick loss and a tiny ``train`` section."""
    from pipeline.common.config import load_params

    params = load_params(REPO / "params.yaml")
    params["model"] = dict(TINY_MODEL)
    if params["loss"].get("vgg_weights"):  # the repository's file, wherever the test runs
        params["loss"]["vgg_weights"] = str(REPO / params["loss"]["vgg_weights"])
    params["ray"] = {"address": None, "num_cpus": None}
    cfg = dict(params.get("train") or {})
    cfg.update(epochs=2, batch_size=4, num_workers=1, max_train_patches=None, warmup_steps=2,
               storage_path=str(tmp / "ray_results"), log_every_steps=1, val_max_pairs=2, val_samples=1,
               keep_checkpoints=2, max_failures=0, init_weights=None)
    cfg.update(train)
    params["train"] = cfg
    return params


def train_paths(inputs: dict[str, Path], out: Path):
    """``TrainPaths`` for generated inputs, outputs under ``out`` (created: it is also the root of
    the default sqlite MLflow store, whose folder must exist, as the repository root does)."""
    from pipeline.train.runs import TrainPaths

    Path(out).mkdir(parents=True, exist_ok=True)
    return TrainPaths(
        patches_dir=inputs["patches"], registered_dir=inputs["registered"], split_json=inputs["split"],
        images_parquet=inputs["images"], best_checkpoint=out / "models" / "best.pt",
        summary_json=out / "models" / "train.json", metrics_json=out / "metrics" / "train.json",
        loss_csv=out / "plots" / "train_loss.csv", val_csv=out / "plots" / "train_val.csv", root=out,
    )


def tiny_model():
    """``TINY_MODEL`` with seeded weights (the same on every call)."""
    import torch

    from pipeline.model.network import build_model

    torch.manual_seed(0)
    return build_model(TINY_MODEL["name"], **TINY_MODEL["args"])


def tiny_loss(params: dict[str, Any]):
    """``FusionLoss`` of the ``loss:`` section of ``params``."""
    from pipeline.train.losses import FusionLoss

    return FusionLoss.from_params(params["loss"])


def patch_batch(n: int = 4, s: int = 16, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """A raw patch-table batch (as Ray Data hands it to ``decode_patches``) and its (n, s, s) IR/visible."""
    rng = np.random.default_rng(seed)
    ir = rng.integers(0, 256, (n, s, s), dtype=np.uint8)
    vi = rng.integers(0, 256, (n, s, s), dtype=np.uint8)
    a, b = rng.uniform(0.2, 0.8, n), rng.uniform(0.2, 0.8, n)
    c, d = rng.uniform(0.2, 0.8, n), rng.uniform(0.2, 0.8, n)
    raw = {"size": np.full(n, s, np.int32), "ir": np.array([x.tobytes() for x in ir], dtype=object),
           "vi": np.array([x.tobytes() for x in vi], dtype=object),
           "w_int_ir": a, "w_int_vi": 1 - a, "w_det_ir": b, "w_det_vi": 1 - b,
           "img_w_int_ir": c, "img_w_int_vi": 1 - c, "img_w_det_ir": d, "img_w_det_vi": 1 - d}
    return raw, ir, vi


def fake_ray_run(run_dir: Path, epochs: int) -> None:
    """A Ray Train V2 run folder whose checkpoint manager registered checkpoints up to ``epochs``."""
    run_dir.mkdir(parents=True)
    results = [{"checkpoint_dir_name": f"checkpoint_{e}", "metrics": {"epoch": e, "val_qabf": 0.1}}
               for e in range(1, epochs + 1)]
    (run_dir / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"checkpoint_results": results, "latest_checkpoint_result": results[-1]}))
