"""The ``params`` stage's check of a whole parameter file: every section with the reader its stage
uses, then what can be checked without doing the work. Each error is one line naming the key and
the value (``ParamsError``).

Beyond types and ranges:

- unknown top-level sections (a misspelt ``trian:`` must not be silently ignored);
- input folders: ``register.raw_dir`` (``ir/`` and ``vi/`` with at least one image; a pipeline
  with a ``gather`` section checks the gathered datasets instead), and ``crop.patch_size``
  against the largest image there;
- every file a parameter names: ``train.init_weights`` (loaded, finite, and fitting ``model:``),
  ``loss.vgg_weights``, ``crop.test_list``;
- metric names in ``promote``; ``model.args.width`` divisible by ``reduction``; training workers
  no more than the CPUs (or GPUs) of a local Ray.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

from pipeline.common.config import ParamsError, section
from pipeline.common.ray_runtime import ray_options, resolve_address
from pipeline.data.crop import CropConfig, read_test_list
from pipeline.data.demo_options import DemoOptions
from pipeline.data.gather import GatherConfig
from pipeline.data.images import find_pairs
from pipeline.data.register_options import AlignOptions
from pipeline.data.stats_stage import StatsConfig
from pipeline.evaluate.metrics import METRICS
from pipeline.evaluate.promote import PromoteConfig
from pipeline.evaluate.ship import ShipConfig
from pipeline.evaluate.stage import EvalConfig
from pipeline.model.network import model_config
from pipeline.train.losses import FusionLoss
from pipeline.train.settings import TrainSettings

#: Every section a stage reads, with the reader that stage uses.
SECTIONS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "demo": lambda p: DemoOptions.from_params(section(p, "demo")),
    "gather": lambda p: GatherConfig.from_params(section(p, "gather")),
    "register": lambda p: AlignOptions.from_params(section(p, "register")),
    "crop": lambda p: CropConfig.from_params(section(p, "crop")),
    "stats": lambda p: StatsConfig.from_params(section(p, "stats")),
    "model": lambda p: model_config(section(p, "model")),
    "loss": lambda p: FusionLoss.from_params(section(p, "loss")),
    "train": TrainSettings.from_params,
    "evaluate": lambda p: EvalConfig.from_params(section(p, "evaluate")),
    "promote": lambda p: PromoteConfig.from_params(section(p, "promote")),
    "ship": lambda p: ShipConfig.from_params(section(p, "ship")),
    "ray": ray_options,
}
#: Sections of one pipeline only (the demo's, the recipe's); checked when present.
OPTIONAL = ("demo", "gather", "ship")


def check_params(params: Mapping[str, Any]) -> list[str]:
    """Check every section and the inputs they name; returns the checked section names.

    Raises:
        ParamsError: the first problem, naming its key and value.
    """
    unknown = [k for k in params if k not in SECTIONS]
    if unknown:
        raise ParamsError(f"params: unknown section(s) {unknown} (known: {sorted(SECTIONS)}); a misspelt "
                          "section would be ignored")
    checked = [name for name in SECTIONS if name in params or name not in OPTIONAL]
    for name in checked:
        SECTIONS[name](params)
    check_inputs(params)
    return checked


def check_inputs(params: Mapping[str, Any]) -> None:
    """The checks of the module docstring beyond each section's own reader."""
    model_name, model_args = model_config(section(params, "model"))
    width, reduction = model_args.get("width", 32), model_args.get("reduction", 8)
    if width % reduction:
        raise ParamsError(f"params: 'model.args.width' {width} must be a multiple of model.args.reduction ({reduction})")
    _check_raw(params)
    crop = CropConfig.from_params(section(params, "crop"))
    if crop.test_list is not None:
        _file("crop.test_list", crop.test_list)
        read_test_list(crop.test_list)
    vgg = section(params, "loss").get("vgg_weights")
    if vgg is not None:
        _file("loss.vgg_weights", vgg)
    promote = PromoteConfig.from_params(section(params, "promote"))
    for key, name in [("promote.primary", promote.primary), *((f"promote.gates.{m}", m) for m in promote.gates)]:
        if name not in METRICS:
            raise ParamsError(f"params: '{key}' names metric {name!r}, which the evaluation does not compute "
                              f"(metrics: {list(METRICS)})")
    settings = TrainSettings.from_params(params)
    _check_workers(params, settings)
    if settings.init_weights is not None:
        from pipeline.train.driver import check_init_weights  # torch, Ray Train: only when needed

        check_init_weights(settings.init_weights, model_name, model_args)


def _file(key: str, path: Any) -> None:
    if not isinstance(path, str) or not Path(path).is_file():
        raise ParamsError(f"params: '{key}': {path!r} is not a file")


def _check_raw(params: Mapping[str, Any]) -> None:
    """``register.raw_dir`` (or the gathered datasets) holds pairs; a patch fits in the largest."""
    if "gather" in params:
        GatherConfig.from_params(section(params, "gather")).check_inputs()
        return
    raw = section(params, "register").get("raw_dir", "data/demo")
    if not isinstance(raw, str):
        raise ParamsError(f"params: 'register.raw_dir' must be a folder path, got {raw!r}")
    demo_out = (params.get("demo") or {}).get("out_dir", "data/demo")
    if not Path(raw).exists() and raw == demo_out:
        return  # written by the demo stage, which runs before register
    for sub in ("ir", "vi"):
        if not (Path(raw) / sub).is_dir():
            raise ParamsError(f"params: 'register.raw_dir': {raw!r} has no {sub}/ folder")
    try:
        pairs = find_pairs(Path(raw) / "ir", Path(raw) / "vi")[0]
    except ValueError:  # no images at all
        pairs = []
    if not pairs:
        raise ParamsError(f"params: 'register.raw_dir': {raw!r} holds no IR/visible pair with the same stem")
    import cv2

    sides = [min(img.shape[:2]) for img in (cv2.imread(str(p.ir), cv2.IMREAD_UNCHANGED) for p in pairs) if img is not None]
    size = CropConfig.from_params(section(params, "crop")).patch_size
    if sides and size > max(sides):
        raise ParamsError(f"params: 'crop.patch_size' {size} is larger than every image in {raw} "
                          f"(the largest has a shorter side of {max(sides)} px)")


def _check_workers(params: Mapping[str, Any], settings: TrainSettings) -> None:
    """On a local Ray, ``train.num_workers`` fits its CPUs (each takes at least 0.25) or GPUs."""
    opts = ray_options(params)
    if resolve_address(opts["address"]) is not None:
        return  # a cluster: its resources are known only once joined
    cpus = opts.get("num_cpus") or os.cpu_count() or 1
    if settings.use_gpu:
        import torch

        gpus = torch.cuda.device_count()
        if settings.num_workers > gpus:
            raise ParamsError(f"params: 'train.num_workers' {settings.num_workers} with train.use_gpu: this machine "
                              f"has {gpus} CUDA GPU(s) (set train.use_gpu: false, or run on a GPU machine)")
        return
    if settings.num_workers > cpus:
        raise ParamsError(f"params: 'train.num_workers' {settings.num_workers} is more than the {cpus} CPU(s) of "
                          "the local Ray (ray.num_cpus)")
