"""The one place that loads and saves model weights.

Two kinds of files are understood, told apart by their content (not their name):

- ``"official"``: the authors' released ``fusion_model.pth`` (a training checkpoint dict whose
  ``model`` entry is the FusionNet state dict, or that state dict itself). Its keys are mapped
  explicitly onto our module names (``OFFICIAL_PREFIX_MAP``); the 12 tensors of layers that their
  forward pass never runs are listed in ``OFFICIAL_UNUSED_KEYS``, must all be present, and are
  dropped. Anything else (a missing, extra or mis-shaped tensor) is an error naming the key.
- ``"checkpoint"``: our own self-describing format written by ``save_checkpoint``: a dict with
  ``format``, ``format_version``, ``name`` and ``args`` (for ``pipeline.model.network.build_model``),
  ``state_dict`` (never with a DDP ``module.`` prefix) and ``meta`` (JSON-like metadata, including
  the default output post-processing ``postprocess``).

Every file is read with ``torch.load(..., weights_only=True)``; the only non-tensor globals allowed
are the numpy scalar types the authors' file contains (its ``train_loss`` list holds numpy float64
scalars pickled under the numpy 1.x name ``numpy.core.multiarray.scalar``).
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from pipeline.common.atomic_io import atomic_writer
from pipeline.model.network import build_model

#: ``format`` value of our checkpoints.
CHECKPOINT_FORMAT = "mda-fusion-checkpoint"
CHECKPOINT_VERSION = 1

#: Default output post-processing by kind of weights (see ``pipeline.model.inference``).
DEFAULT_POSTPROCESS = {"official": "minmax", "checkpoint": "clip"}

#: Authors' key prefix -> our key prefix (longest match wins). Sequential indices inside the
#: residual blocks keep their positions (body = authors' ``res``, skip = authors' ``down_conv`` /
#: ``up_conv``).
OFFICIAL_PREFIX_MAP: tuple[tuple[str, str], ...] = (
    ("input.", "stem."),
    ("downsample_1x.res.", "enc1.body."),
    ("downsample_1x.down_conv.", "enc1.skip."),
    ("downsample_2x.res.", "enc2.body."),
    ("downsample_2x.down_conv.", "enc2.skip."),
    ("downsample_4x.0.res.", "enc4.0.body."),
    ("downsample_4x.0.down_conv.", "enc4.0.skip."),
    ("downsample_4x.1.res.", "enc4.1.body."),
    ("downsample_4x.1.down_conv.", "enc4.1.skip."),
    ("upsample_2x.res.", "dec2.body."),
    ("upsample_2x.up_conv.", "dec2.skip."),
    ("upsample_4x.0.res.", "dec4.0.body."),
    ("upsample_4x.0.up_conv.", "dec4.0.skip."),
    ("upsample_4x.1.res.", "dec4.1.body."),
    ("upsample_4x.1.up_conv.", "dec4.1.skip."),
    ("fusion_1x.channel_map.channel_down.0.", "fuse_same.channel.squeeze.0."),
    ("fusion_1x.channel_map.channel_down.1.", "fuse_same.channel.squeeze.1."),
    ("fusion_1x.channel_map.channel_up1.0.", "fuse_same.channel.excite_ir.0."),
    ("fusion_1x.channel_map.channel_up2.0.", "fuse_same.channel.excite_vi.0."),
    ("fusion_1x.spatial_map.conv_fusion.", "fuse_same.spatial.mix."),
    ("fusion_1x.spatial_map.down.", "fuse_same.spatial.down."),
    ("fusion_1x.spatial_map.up1.0.", "fuse_same.spatial.map_ir.0."),
    ("fusion_1x.spatial_map.up2.0.", "fuse_same.spatial.map_vi.0."),
    ("fusion_2x.up.", "fuse_cross.upsample."),
    ("fusion_2x.channel_map.up.", "fuse_cross.channel.upsample."),
    ("fusion_2x.channel_map.channel_down.0.", "fuse_cross.channel.squeeze.0."),
    ("fusion_2x.channel_map.channel_down.1.", "fuse_cross.channel.squeeze.1."),
    ("fusion_2x.channel_map.channel_up1.0.", "fuse_cross.channel.excite_ir.0."),
    ("fusion_2x.channel_map.channel_up2.0.", "fuse_cross.channel.excite_vi.0."),
    ("fusion_2x.spatial_map.trans_conv.", "fuse_cross.spatial.upsample."),
    ("fusion_2x.spatial_map.conv_fusion.", "fuse_cross.spatial.mix."),
    ("fusion_2x.spatial_map.down.", "fuse_cross.spatial.down."),
    ("fusion_2x.spatial_map.up1.0.", "fuse_cross.spatial.map_ir.0."),
    ("fusion_2x.spatial_map.up2.0.", "fuse_cross.spatial.map_vi.0."),
    ("output.", "head."),
)

#: Tensors of the authors' file that their forward pass never uses (the same-scale block's three
#: up-samplers, which only run for cross-scale inputs, and the two leftover 1x1 ``one`` convs).
OFFICIAL_UNUSED_KEYS: tuple[str, ...] = (
    "fusion_1x.channel_map.up.0.weight",
    "fusion_1x.channel_map.up.0.bias",
    "fusion_1x.channel_map.up.1.weight",
    "fusion_1x.spatial_map.trans_conv.0.weight",
    "fusion_1x.spatial_map.trans_conv.0.bias",
    "fusion_1x.spatial_map.trans_conv.1.weight",
    "fusion_1x.up.0.weight",
    "fusion_1x.up.0.bias",
    "fusion_1x.one.weight",
    "fusion_1x.one.bias",
    "fusion_2x.one.weight",
    "fusion_2x.one.bias",
)


def _numpy_safe_globals() -> list[Any]:
    """Exactly the numpy globals the authors' checkpoint pickles (scalar reconstructor, dtypes)."""
    import numpy as np

    try:  # numpy >= 2 moved the module; the file names the numpy 1.x location
        from numpy._core.multiarray import scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    return [(scalar, "numpy.core.multiarray.scalar"), np.dtype, np.dtypes.Float64DType]


def _read(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` and the numpy allow-list; clear errors."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, truncated file, foreign pickle, disallowed global
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: not a readable PyTorch weights file ({first})") from exc


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _reject_ddp_prefix(keys: Any, path: Path | str) -> None:
    prefixed = [k for k in keys if k.startswith("module.")]
    if prefixed:
        raise ValueError(
            f"{path}: state dict keys carry the DDP 'module.' prefix (e.g. '{prefixed[0]}'); "
            "save the unwrapped model (model.module) with pipeline.model.weights.save_checkpoint"
        )


def official_args(state: Mapping[str, torch.Tensor], path: Path | str = "<state dict>") -> dict[str, int]:
    """Read the hyper-parameters of ``build_model("mda", ...)`` off the authors' tensors."""
    needed = ("input.weight", "fusion_1x.channel_map.channel_down.0.weight",
              "upsample_2x.res.5.weight", "upsample_4x.1.res.5.weight")
    for key in needed:
        if key not in state:
            raise ValueError(f"{path}: authors' weights lack the tensor '{key}'")
    width = int(state["input.weight"].shape[0])
    squeezed = int(state["fusion_1x.channel_map.channel_down.0.weight"].shape[0])
    if squeezed < 1 or width % squeezed:
        raise ValueError(f"{path}: channel attention squeezes {width} to {squeezed} channels (not a divisor)")
    return {
        "width": width,
        "reduction": width // squeezed,
        "up2_channels": int(state["upsample_2x.res.5.weight"].shape[0]),
        "up4_channels": int(state["upsample_4x.1.res.5.weight"].shape[0]),
    }


def map_official_state_dict(
    state: Mapping[str, torch.Tensor], model: nn.Module, path: Path | str = "<state dict>"
) -> dict[str, torch.Tensor]:
    """Rename the authors' state dict to ``model``'s keys, strictly.

    Every tensor must map to a key of ``model`` with the same shape or be one of
    ``OFFICIAL_UNUSED_KEYS`` (all of which must be present); every key of ``model`` must be covered.

    Raises:
        ValueError: naming the first offending keys (unmapped, missing, unused-but-absent,
            shape mismatch).
    """
    _reject_ddp_prefix(state.keys(), path)
    prefixes = sorted(OFFICIAL_PREFIX_MAP, key=lambda p: len(p[0]), reverse=True)
    unused = set(OFFICIAL_UNUSED_KEYS)
    absent_unused = sorted(unused - set(state))
    if absent_unused:
        raise ValueError(f"{path}: authors' weights lack the known-unused tensor(s) {absent_unused[:5]}")
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in state.items():
        if key in unused:
            continue
        ours = next((o + key[len(a):] for a, o in prefixes if key.startswith(a)), None)
        if ours is None or ours not in target:
            unmapped.append(key)
            continue
        if tuple(tensor.shape) != tuple(target[ours].shape):
            raise ValueError(
                f"{path}: tensor '{key}' has shape {tuple(tensor.shape)}, "
                f"our '{ours}' expects {tuple(target[ours].shape)}"
            )
        mapped[ours] = tensor
    if unmapped:
        raise ValueError(f"{path}: unexpected tensor(s) in the authors' weights: {unmapped[:5]}")
    missing = [k for k in target if k not in mapped]
    if missing:
        inverse = {o: a for a, o in OFFICIAL_PREFIX_MAP}
        named = [next((inverse[o] + k[len(o):] for o in inverse if k.startswith(o)), k) for k in missing[:5]]
        raise ValueError(f"{path}: authors' weights lack the tensor(s) {named} (ours: {missing[:5]})")
    return mapped


def _load_official(state: Mapping[str, torch.Tensor], path: Path) -> tuple[nn.Module, dict[str, Any]]:
    args = official_args(state, path)
    model = build_model("mda", **args)
    model.load_state_dict(map_official_state_dict(state, model, path), strict=True)
    info = {"name": "mda", "args": args, "source": str(path), "kind": "official",
            "postprocess": DEFAULT_POSTPROCESS["official"], "meta": {}}
    return model, info


def _load_checkpoint(obj: Mapping[str, Any], path: Path) -> tuple[nn.Module, dict[str, Any]]:
    version = obj.get("format_version")
    if version != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format version {version!r} is not supported (expected {CHECKPOINT_VERSION})"
        )
    for key, kind in (("name", str), ("args", Mapping), ("state_dict", Mapping), ("meta", Mapping)):
        if not isinstance(obj.get(key), kind):
            raise ValueError(f"{path}: checkpoint entry '{key}' is missing or not a {kind.__name__}")
    state = obj["state_dict"]
    _reject_ddp_prefix(state.keys(), path)
    try:
        model = build_model(obj["name"], **dict(obj["args"]))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: cannot build model '{obj['name']}' from its recorded args: {exc}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
        raise ValueError(f"{path}: state dict does not match model '{obj['name']}' {dict(obj['args'])}: "
                         f"{' '.join(lines)[:600] or exc}") from exc
    meta = dict(obj["meta"])
    post = meta.get("postprocess", DEFAULT_POSTPROCESS["checkpoint"])
    info = {"name": obj["name"], "args": dict(obj["args"]), "source": str(path), "kind": "checkpoint",
            "postprocess": post, "meta": meta}
    return model, info


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load our checkpoint or the authors' ``fusion_model.pth`` (detected from the content).

    Args:
        path: the weights file.

    Returns:
        ``(model, info)``: the model on CPU in eval mode; ``info`` has ``name``, ``args``,
        ``source``, ``kind`` (``"official"`` or ``"checkpoint"``), ``postprocess`` (the default
        output post-processing for these weights) and ``meta``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable/corrupt file, unknown content, or weights that do not fit (the
            message names the file and the key).
    """
    path = Path(path)
    obj = _read(path)
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        model, info = _load_checkpoint(obj, path)
    elif isinstance(obj, Mapping) and _is_state_dict(obj.get("model")):
        model, info = _load_official(obj["model"], path)
    elif _is_state_dict(obj) and "input.weight" in obj:
        model, info = _load_official(obj, path)
    else:
        if _is_state_dict(obj):
            _reject_ddp_prefix(obj.keys(), path)
        raise ValueError(
            f"{path}: unknown weights content (neither a {CHECKPOINT_FORMAT} checkpoint nor the "
            "authors' MDA fusion_model.pth)"
        )
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{path}: {len(bad)} tensor(s) hold NaN or infinite values (e.g. '{bad[0]}'): "
                         "the weights of a diverged run; choose another checkpoint")
    model.eval()
    return model, info


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    model_name: str,
    model_args: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save a self-describing checkpoint atomically (temporary file + rename).

    Args:
        path: destination file (parent folders are created).
        model: the network (DDP / compiled wrappers are unwrapped: keys never carry ``module.``).
        model_name: registry name for ``build_model``.
        model_args: its constructor arguments.
        extra: JSON-serialisable metadata stored under ``meta`` (e.g. ``epoch``, ``run_id``,
            ``postprocess``: the default output post-processing, ``"clip"`` if absent).

    Returns:
        The path written.

    Raises:
        ValueError: ``extra``/``model_args`` not JSON-serialisable or ``postprocess`` invalid.
    """
    path = Path(path)
    meta: dict[str, Any] = {"postprocess": DEFAULT_POSTPROCESS["checkpoint"]}
    meta.update(dict(extra or {}))
    if meta["postprocess"] not in ("minmax", "clip"):
        raise ValueError(
            f"save_checkpoint: extra['postprocess'] must be 'minmax' or 'clip', got {meta['postprocess']!r}"
        )
    meta.setdefault("saved_at", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    meta.setdefault("torch_version", torch.__version__)
    try:  # keeps the file loadable with weights_only=True (plain containers only)
        meta = json.loads(json.dumps(meta))
        args = json.loads(json.dumps(dict(model_args)))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"save_checkpoint: metadata must be JSON-serialisable: {exc}") from exc
    # contiguous: a channels-last training model saves plain NCHW tensors (same values, portable files)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in _unwrap(model).state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "name": model_name,
               "args": args, "state_dict": state, "meta": meta}
    with atomic_writer(path, "wb") as fh:
        torch.save(payload, fh)
    return path


def resolve_model_source(spec: str | Path) -> Path:
    """Turn a ``--weights``/``--model`` argument into a local weights file.

    Args:
        spec: a file path, or a model-registry URI such as ``models:/NAME@ALIAS``.

    Returns:
        The local file to pass to ``load_model``.

    Raises:
        FileNotFoundError: a plain path that does not exist, or no MLflow store for a URI.
        ValueError: a URI (``models:/``, ``runs:/``) that the MLflow store cannot resolve to a
            fusion model (``pipeline.model.model_uri.fetch_checkpoint`` downloads its checkpoint).
    """
    from pipeline.model.model_uri import fetch_checkpoint, is_mlflow_uri

    text = str(spec)
    if is_mlflow_uri(text):
        return fetch_checkpoint(text)
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return path
