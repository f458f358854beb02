"""Every variant of the ablation grid (pipeline.evaluate.ablations.VARIANTS) trains: two optimiser
steps of pipeline.train.step.train_step on a tiny network with the variant's model, weights and
loss settings, without Ray."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from train_fixtures import TINY_MODEL, patch_batch

from conftest import REPO
from pipeline.common.config import load_params
from pipeline.evaluate.ablations import GRID_BUDGET, VARIANTS, Variant
from pipeline.model.network import build_model, model_config
from pipeline.train.data import WEIGHT_KEYS, decode_patches
from pipeline.train.losses import FusionLoss, loss_section, patch_weight_maps
from pipeline.train.settings import train_settings
from pipeline.train.step import build_optimizer, train_step


def _set(tree: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def variant_params(variant: Variant) -> dict:
    """params.yaml + the grid's common settings + the variant's, with the tiny network's sizes."""
    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    for key, value in {**GRID_BUDGET, **variant.overrides}.items():
        if key.split(".")[0] in ("model", "loss", "stats"):
            _set(params, key, value)
    params["model"]["args"].update(TINY_MODEL["args"])
    return params


#: the grid's variants, plus the switch value the grid does not use (1x + 2x)
CASES = (*VARIANTS, Variant("two_scales", {"model.args.scales": 2}))


@pytest.mark.parametrize("variant", CASES, ids=[v.name for v in CASES])
def test_two_training_steps_per_variant(variant, tmp_path):
    params = variant_params(variant)
    name, args = model_config(params["model"])
    torch.manual_seed(0)
    model = build_model(name, **args).train()
    loss_fn = FusionLoss.from_params(loss_section(params))  # what the training stage builds
    raw, _, _ = patch_batch(n=4, s=16)
    batch = {k: torch.from_numpy(v) for k, v in decode_patches(raw).items()}
    if params["stats"].get("weighting") == "fixed":  # what the stats stage writes for every row
        batch.update({k: torch.full_like(batch[k], 0.5) for k in WEIGHT_KEYS})
    settings = train_settings({**params, "train": {**params["train"], "lr": 1e-3}})
    opt = build_optimizer(model, settings)
    before = [p.detach().clone() for p in model.parameters()]
    logs = [train_step(model, batch, loss_fn, opt, grad_clip=1.0) for _ in range(2)]
    assert all(np.isfinite(log["loss"]) and log["loss"] > 0 for log in logs)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # every parameter moved
    terms = set(logs[0])
    assert ("patch_intensity" in terms) == params["loss"]["patch"]["enabled"]
    assert ("style" in terms) == params["loss"]["style"]["enabled"]
    # the switch reached the network / the loss
    if "model.args.fusion" in variant.overrides:
        assert model.fusion == variant.overrides["model.args.fusion"]
    if "model.args.scales" in variant.overrides:
        assert model.scales == variant.overrides["model.args.scales"] and model.enc4 is None
    if "loss.intensity.target" in variant.overrides:
        assert loss_fn.intensity_target == variant.overrides["loss.intensity.target"]
    fixed = params["stats"].get("weighting") == "fixed"
    assert loss_fn.patch_weighting == ("fixed" if fixed else "adaptive")
    maps = patch_weight_maps(batch["ir"], batch["vi"], window=loss_fn.patch_window,
                             temperature=loss_fn.patch_temperature, mean_weight=loss_fn.patch_mean_weight,
                             eps=loss_fn.patch_eps, weighting=loss_fn.patch_weighting)
    for m in maps.values():  # fixed: the loss's own per-pixel maps are exactly 0.5; adaptive: they vary
        assert torch.equal(m, torch.full_like(m, 0.5)) == fixed
