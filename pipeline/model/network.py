"""Fusion network architectures, built by name.

The MDA network (Yang et al., "A Multi-scale Information Integration Framework for Infrared and
Visible Image Fusion", arXiv 2312.04328) as released by its authors, re-written in our own code
and naming (the layer-by-layer description is in ``../shared/models/mda_official/ARCHITECTURE.md``):

- a shared (siamese) 3x3 stem and residual down-sampling blocks at 1x, 2x and 4x, all three
  computed in parallel from the stem output; IR and visible go through the same weights (we run
  them as one batch of 2B, which is the same computation);
- dual-attention fusion blocks (channel attention x spatial attention, one weight per modality):
  one shared same-scale block used at 1x/1x, 2x/2x and 4x/4x, one shared cross-scale block used at
  (IR 2x, VIS 1x) and (IR 4x, VIS 2x) which first up-samples the coarser IR feature;
- residual up-sampling blocks back to full resolution, a 104-channel concatenation
  ``[F11, F12, up2(F22), up2(F24), up4(F44)]``, two 3x3 convs and ``tanh(.)/2 + 0.5``.

Unlike the authors' module tree, layers that their forward pass never runs (the up-samplers of the
same-scale block and the two unused 1x1 ``one`` convs) are not created, so every parameter receives
a gradient (DDP needs no ``find_unused_parameters``). ``pipeline.model.weights`` maps the authors' state
dict onto these modules and accounts for the unused tensors explicitly.

Each attention map is computed once per fusion point (the authors' code evaluates them twice).

Inference on the CPU (``fused_inference()``, used by ``pipeline.model.inference.Fuser``): the
convolution chains (``ConvChain``, an ``nn.Sequential`` with the same children and state-dict keys)
run each convolution fused with the activation after it, each residual block adds its body's last
convolution into the skip branch inside that convolution (oneDNN post-ops), convolutions of
concatenations (spatial-attention mix, head) sum per-part convolutions instead of building the
concatenation, the encoder runs one modality at a time and full-resolution features are released
once fused (less memory). Only without autograd, on float32 CPU tensors; training and every other
caller run module by module, batched as above.

Ablation switches (``model.args``; the defaults are the full model above, whose state dict and
forward pass they leave unchanged):

- ``fusion``: ``attention`` (default) | ``add`` | ``concat``, the block used at every same-scale and
  cross-scale fusion point. ``add``: ``ir' + vi``; ``concat``: ``conv1x1_{2C->C}([ir', vi])``. In
  both, ``ir'`` is the IR feature, up-sampled in a cross-scale block by the same ``ReLU(tconv)``
  as in the attention block; the channel and spatial attention modules are removed.
- ``scales``: 3 (default: 1x + 2x + 4x) | 2 (1x + 2x) | 1 (1x only). With 2, the 4x encoder
  (``enc4``), the fusion points F24 and F44 and the 4x up path (``dec4``) are removed; the head sees
  ``[F11, F12, up2(F22)]`` (``2C + up2_channels`` channels). With 1, the 2x encoder, the
  cross-scale block (``fuse_cross``, no coarser scale left to bring in) and ``dec2`` go too; the head
  sees ``F11`` (``C`` channels). ``forward(..., return_features=True)`` then returns only the
  features that exist (``ir``/``vi``: one per scale; ``fusion``: F11, F12, F22 / F11).
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.common.config import ParamsError, param

#: Name -> constructor of the architectures ``build_model`` knows.
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

#: Input heights and widths must be multiples of this (see ``MDANet``); ``Fuser`` pads to it.
SIZE_MULTIPLE = 8


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class decorator adding an architecture to the registry under ``name``."""

    def wrap(cls: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model name '{name}' registered twice")
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_models() -> list[str]:
    """Names accepted by ``build_model``."""
    return sorted(_REGISTRY)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build an architecture by name.

    Args:
        name: registry name, e.g. ``"mda"``.
        **kwargs: constructor arguments (hyper-parameters); omitted ones take the paper's values.

    Raises:
        ValueError: unknown name, unknown argument or invalid value (the message names it).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model '{name}' (available: {', '.join(available_models())})")
    cls = _REGISTRY[name]
    allowed = getattr(cls, "ARG_NAMES", None)
    if allowed is not None:
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ValueError(f"model '{name}': unknown argument(s) {unknown} (allowed: {list(allowed)})")
    return cls(**kwargs)


def model_config(cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Read the ``model:`` section of ``params.yaml``.

    Args:
        cfg: the section (``pipeline.common.config.section(params, "model")``): ``name`` and ``args``.

    Returns:
        ``(name, args)`` for ``build_model``.

    Raises:
        pipeline.common.config.ParamsError: naming ``model.<key>``.
    """

    name = param(cfg, "name", str, where="model", default="mda", choices=available_models())
    args = param(cfg, "args", dict, where="model", default={}) or {}
    allowed = getattr(_REGISTRY[name], "ARG_NAMES", ())
    specs = getattr(_REGISTRY[name], "ARG_SPECS", {})
    out: dict[str, Any] = {}
    for key in args:
        if key not in allowed:

            raise ParamsError(f"params: unknown key 'model.args.{key}' for model '{name}' (allowed: {list(allowed)})")
        out[key] = param(args, key, where="model.args", **specs.get(key, {"kind": int, "minimum": 1}))
    return name, out


def _conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


def _conv1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1)


def _up3(cin: int, cout: int) -> nn.ConvTranspose2d:
    """3x3 transposed conv, stride 2: exactly doubles H and W."""
    return nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)


# --- Fused CPU inference (oneDNN) -------------------------------------------------------------
# Inside ``fused_inference()`` and without autograd, on float32 CPU tensors, a convolution and the
# activation after it run as one oneDNN primitive (``torch.ops.mkldnn._convolution_pointwise``,
# the kernels inductor uses), and the last convolution of a residual block adds its result into
# the skip branch in place (oneDNN "sum" post-op). The activation and the sum are applied to the
# convolution's output while it is still in cache, instead of in separate passes over memory, and
# fewer feature maps are allocated (each new one costs page faults). A convolution of a
# concatenation sums per-part convolutions instead (``_concat_conv``). PReLU with one weight is
# leaky ReLU with that slope, so only the re-ordered channel sums differ from the module-by-module
# path, within float rounding. Training (autograd on) never takes this path.

_FUSED_INFERENCE: contextvars.ContextVar[bool] = contextvars.ContextVar("mda_fused_inference", default=False)


@contextlib.contextmanager
def fused_inference(enabled: bool = True) -> Iterator[None]:
    """Let the network's blocks run fused oneDNN kernels where they can (no-grad CPU float32 only)."""
    token = _FUSED_INFERENCE.set(enabled)
    try:
        yield
    finally:
        _FUSED_INFERENCE.reset(token)


def _fusable(x: Tensor) -> bool:
    """Whether the fused path applies to ``x`` now (context on, no autograd, CPU float32, oneDNN)."""
    return (_FUSED_INFERENCE.get() and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and bool(torch.backends.mkldnn.enabled))


def _post_op(act: nn.Module | None) -> tuple[str, list[float]] | None:
    """oneDNN post-op (name, scalars) equal to ``act``; ``None`` if it has no exact equivalent."""
    if act is None:
        return "none", []
    if isinstance(act, nn.PReLU) and act.weight.numel() == 1:
        return "leaky_relu", [float(act.weight.detach())]
    if isinstance(act, nn.ReLU):
        return "relu", []
    if isinstance(act, nn.Sigmoid):
        return "sigmoid", []
    if isinstance(act, nn.Tanh):
        return "tanh", []
    return None


def _plain_conv(conv: nn.Module) -> bool:
    """A 2-D (transposed) convolution with zero padding given as numbers: oneDNN runs it as is."""
    return (isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def _conv_fused(conv: nn.Conv2d | nn.ConvTranspose2d, x: Tensor, attr: str, scalars: list[float]) -> Tensor:
    """``act(conv(x))`` as one oneDNN primitive (``attr``/``scalars`` from ``_post_op``)."""
    pad, stride, dil = list(conv.padding), list(conv.stride), list(conv.dilation)
    if isinstance(conv, nn.ConvTranspose2d):
        return torch.ops.mkldnn._convolution_transpose_pointwise(
            x, conv.weight, conv.bias, pad, list(conv.output_padding), stride, dil, conv.groups, attr, scalars, "")
    return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, pad, stride, dil, conv.groups,
                                                   attr, scalars, "")


def _run_fused(layers: Sequence[nn.Module], x: Tensor) -> Tensor:
    """Run ``layers`` in order, each convolution fused with the activation that follows it."""
    i = 0
    while i < len(layers):
        layer = layers[i]
        if _plain_conv(layer):
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            post = _post_op(nxt) if nxt is not None else None
            if post is not None and nxt is not None:
                x, i = _conv_fused(layer, x, *post), i + 2
                continue
            x, i = _conv_fused(layer, x, "none", []), i + 1
            continue
        x, i = layer(x), i + 1
    return x


def _add_conv_into(acc: Tensor, conv: nn.Module, x: Tensor) -> Tensor:
    """``acc += conv(x)`` (fused when possible); ``acc`` must not be needed elsewhere."""
    if isinstance(conv, nn.Conv2d) and _plain_conv(conv) and acc.shape[1] == conv.out_channels:
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        if acc.is_contiguous(memory_format=layout) and x.is_contiguous(memory_format=layout):
            return torch.ops.mkldnn._convolution_pointwise_.binary(
                acc, x, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation),
                conv.groups, "add", 1.0, None, [], None)
    return acc.add_(conv(x))


def _concat_conv(mix: nn.Module, parts: Sequence[Tensor]) -> Tensor:
    """``mix(torch.cat(parts, dim=1))``, ``mix`` a convolution or a ``ConvChain`` that starts with one.

    On the fused path the concatenation is never built: the convolution's weight is split by
    input channels and each part's convolution is added in place into the first one's (oneDNN
    sum post-op); the layers after it then run fused (a lone scalar PReLU / ReLU in place). That
    saves allocating and copying the concatenation (equal within float rounding: the sum over
    input channels is accumulated in another order). Anywhere else, exactly
    ``mix(torch.cat(parts, dim=1))``.
    """
    if not _fusable(parts[0]):
        return mix(torch.cat(list(parts), dim=1))
    layers = list(mix) if isinstance(mix, nn.Sequential) else [mix]
    conv, rest = layers[0], layers[1:]
    layout = (torch.channels_last if parts[0].is_contiguous(memory_format=torch.channels_last)
              else torch.contiguous_format)
    if (not isinstance(conv, nn.Conv2d) or not _plain_conv(conv) or conv.groups != 1
            or not all(p.is_contiguous(memory_format=layout) for p in parts)):
        return mix(torch.cat(list(parts), dim=1))
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), 1)
    bounds = [0]
    for part in parts:
        bounds.append(bounds[-1] + part.shape[1])
    weights = [conv.weight[:, a:b].contiguous(memory_format=layout) for a, b in itertools.pairwise(bounds)]
    ops = torch.ops.mkldnn
    out = ops._convolution_pointwise(parts[0], weights[0], conv.bias, *args, "none", [], "")
    for part, weight in zip(parts[1:], weights[1:]):
        ops._convolution_pointwise_.binary(out, part, weight, None, *args, "add", 1.0, None, [], None)
    post = _post_op(rest[0]) if len(rest) == 1 else None
    if post is not None and post[0] == "leaky_relu":
        return torch.nn.functional.leaky_relu_(out, post[1][0])
    if post is not None and post[0] == "relu":
        return out.relu_()
    return _run_fused(rest, out)


class ConvChain(nn.Sequential):
    """``nn.Sequential`` of convolutions and activations (same children, same state-dict keys).

    Inside ``fused_inference()`` (no autograd, CPU float32) each convolution runs fused with the
    activation that follows it; anywhere else it is exactly ``nn.Sequential``.
    """

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Apply the layers in order."""
        if _fusable(x):
            return _run_fused(list(self), x)
        return super().forward(x)


def _residual(body: nn.Sequential, skip: nn.Sequential, x: Tensor) -> Tensor:
    """``body(x) + skip(x)``; on the fused path the last body convolution adds into ``skip(x)``."""
    if _fusable(x):
        layers = list(body)
        return _add_conv_into(_run_fused(list(skip), x), layers[-1], _run_fused(layers[:-1], x))
    return body(x).add_(skip(x))  # in place on a conv output: autograd-safe


class ResidualDown(nn.Module):
    """Residual block, ``width -> width`` channels, spatial stride ``stride`` (1 or 2).

    ``body``: conv3-PReLU-conv3-PReLU-conv3(stride)-conv3; ``skip``: conv3-conv3(stride)-PReLU;
    output ``body(x) + skip(x)`` with no activation after the sum.
    """

    def __init__(self, width: int, stride: int) -> None:
        super().__init__()
        self.body = ConvChain(
            _conv3(width, width), nn.PReLU(), _conv3(width, width), nn.PReLU(),
            _conv3(width, width, stride), _conv3(width, width),
        )
        self.skip = ConvChain(_conv3(width, width), _conv3(width, width, stride), nn.PReLU())

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, C, H/stride, W/stride)."""
        return _residual(self.body, self.skip, x)


class ResidualUp(nn.Module):
    """Residual x2 up-sampling block, ``width -> out_channels``.

    ``body``: conv3-PReLU-conv3-PReLU-tconv3(x2)-conv3(-> out); ``skip``: conv3-tconv3(x2, -> out)-PReLU;
    output ``body(x) + skip(x)``.
    """

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.body = ConvChain(
            _conv3(width, width), nn.PReLU(), _conv3(width, width), nn.PReLU(),
            _up3(width, width), _conv3(width, out_channels),
        )
        self.skip = ConvChain(_conv3(width, width), _up3(width, out_channels), nn.PReLU())

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, out_channels, 2H, 2W)."""
        return _residual(self.body, self.skip, x)


class ChannelAttention(nn.Module):
    """Per-channel weights of the two modalities from the pooled sum of their features.

    ``z = PReLU(conv1x1_{C->C/r}(GAP(ir + vi)))``, ``w_ir = sigmoid(conv1x1(z))``,
    ``w_vi = sigmoid(conv1x1'(z))`` (two independent heads, no softmax coupling).
    In a cross-scale block the (coarser) IR feature is first up-sampled by its own tconv + PReLU.
    """

    def __init__(self, width: int, reduction: int, cross_scale: bool) -> None:
        super().__init__()
        self.upsample = ConvChain(_up3(width, width), nn.PReLU()) if cross_scale else None
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.squeeze = ConvChain(_conv1(width, width // reduction), nn.PReLU())
        self.excite_ir = ConvChain(_conv1(width // reduction, width), nn.Sigmoid())
        self.excite_vi = ConvChain(_conv1(width // reduction, width), nn.Sigmoid())

    def forward(self, ir: Tensor, vi: Tensor) -> tuple[Tensor, Tensor]:
        """ir (N, C, h, w) (h = H/2 if cross-scale), vi (N, C, H, W) -> two (N, C, 1, 1) in (0, 1)."""
        if self.upsample is not None:
            ir = self.upsample(ir)
        z = self.squeeze(self.pool(ir) + self.pool(vi))  # = GAP(ir + vi), without the full-size sum
        return self.excite_ir(z), self.excite_vi(z)


class SpatialAttention(nn.Module):
    """Per-pixel, per-channel weight maps of the two modalities.

    ``f = PReLU(conv3_s2(PReLU(conv1x1_{2C->C}([ir, vi]))))`` at half resolution, then
    ``m_ir = sigmoid(tconv(f))``, ``m_vi = sigmoid(tconv'(f))`` back at the visible resolution.
    In a cross-scale block the IR feature is first up-sampled by its own tconv + PReLU.
    """

    def __init__(self, width: int, cross_scale: bool) -> None:
        super().__init__()
        self.upsample = ConvChain(_up3(width, width), nn.PReLU()) if cross_scale else None
        self.mix = ConvChain(_conv1(2 * width, width), nn.PReLU())
        self.down = ConvChain(_conv3(width, width, stride=2), nn.PReLU())
        self.map_ir = ConvChain(_up3(width, width), nn.Sigmoid())
        self.map_vi = ConvChain(_up3(width, width), nn.Sigmoid())

    def forward(self, ir: Tensor, vi: Tensor) -> tuple[Tensor, Tensor]:
        """ir (N, C, h, w), vi (N, C, H, W) (H, W even) -> two (N, C, H, W) in (0, 1)."""
        if self.upsample is not None:
            ir = self.upsample(ir)
        f = self.down(_concat_conv(self.mix, [ir, vi]))  # = mix(cat([ir, vi]))
        return self.map_ir(f), self.map_vi(f)


class DualAttentionFusion(nn.Module):
    """Fuse an IR feature with a visible feature: ``ir' * w_ir * m_ir + vi * w_vi * m_vi``.

    ``cross_scale=False``: both inputs at the same resolution. ``cross_scale=True``: IR is at half
    the visible resolution and ``ir' = ReLU(tconv(ir))``; the two attention modules receive the
    original IR feature and up-sample it with their own layers (as in the authors' network).
    """

    def __init__(self, width: int, reduction: int, cross_scale: bool) -> None:
        super().__init__()
        self.cross_scale = cross_scale
        self.upsample = ConvChain(_up3(width, width), nn.ReLU()) if cross_scale else None
        self.channel = ChannelAttention(width, reduction, cross_scale)
        self.spatial = SpatialAttention(width, cross_scale)

    def attention(self, ir: Tensor, vi: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The four attention maps, each computed once.

        Returns:
            ``(w_ir, w_vi, m_ir, m_vi)``: channel weights (N, C, 1, 1) and spatial maps
            (N, C, H, W), all in (0, 1).
        """
        w_ir, w_vi = self.channel(ir, vi)
        m_ir, m_vi = self.spatial(ir, vi)
        return w_ir, w_vi, m_ir, m_vi

    def forward(self, ir: Tensor, vi: Tensor) -> Tensor:
        """ir (N, C, h, w), vi (N, C, H, W) -> fused (N, C, H, W)."""
        w_ir, w_vi, m_ir, m_vi = self.attention(ir, vi)
        ir_up = self.upsample(ir) if self.upsample is not None else ir
        if torch.is_grad_enabled():
            return ir_up * w_ir * m_ir + vi * w_vi * m_vi
        # no autograd: reuse the attention maps' memory (saves four full-size allocations)
        return m_ir.mul_(w_ir).mul_(ir_up).add_(m_vi.mul_(w_vi).mul_(vi))


class AddFusion(nn.Module):
    """Ablation ``fusion: add``: ``ir' + vi`` (``ir' = ReLU(tconv(ir))`` in a cross-scale block)."""

    def __init__(self, width: int, cross_scale: bool) -> None:
        super().__init__()
        self.cross_scale = cross_scale
        self.upsample = ConvChain(_up3(width, width), nn.ReLU()) if cross_scale else None

    def forward(self, ir: Tensor, vi: Tensor) -> Tensor:
        """ir (N, C, h, w), vi (N, C, H, W) -> fused (N, C, H, W)."""
        ir_up = self.upsample(ir) if self.upsample is not None else ir
        return ir_up + vi


class ConcatFusion(nn.Module):
    """Ablation ``fusion: concat``: ``conv1x1_{2C->C}([ir', vi])`` (``ir'`` as in ``AddFusion``)."""

    def __init__(self, width: int, cross_scale: bool) -> None:
        super().__init__()
        self.cross_scale = cross_scale
        self.upsample = ConvChain(_up3(width, width), nn.ReLU()) if cross_scale else None
        self.mix = _conv1(2 * width, width)

    def forward(self, ir: Tensor, vi: Tensor) -> Tensor:
        """ir (N, C, h, w), vi (N, C, H, W) -> fused (N, C, H, W)."""
        ir_up = self.upsample(ir) if self.upsample is not None else ir
        return _concat_conv(self.mix, [ir_up, vi])  # = mix(cat([ir_up, vi]))


#: ``model.args.fusion`` -> the fusion-block kind (``attention`` is the paper's).
FUSION_KINDS: tuple[str, ...] = ("attention", "add", "concat")
#: ``model.args.scales`` -> number of fusion points (F11 | F11 F12 F22 | F11 F12 F22 F24 F44).
FUSION_POINTS: dict[int, int] = {1: 1, 2: 3, 3: 5}
#: ``model.args.base``: what the head's output is added to. ``none`` (paper): 0.5, the output
#: ``tanh(head) / 2 + 0.5`` spans (0, 1); ``max`` / ``mean``: the pixel maximum / average of the
#: inputs, so the network learns a residual ``tanh(head) / 2`` on a pixel-wise fusion (our extension).
BASES: tuple[str, ...] = ("none", "max", "mean")


def pixel_base(kind: str, ir: Tensor, vi: Tensor) -> Tensor:
    """The pixel-wise fusion ``model.args.base`` adds the learned residual to (``BASES``)."""
    if kind == "max":
        return torch.maximum(ir, vi)
    if kind == "mean":
        return (ir + vi) / 2
    raise ValueError(f"model 'mda': 'base' must be one of {list(BASES)}, got {kind!r}")


def fusion_block(kind: str, width: int, reduction: int, cross_scale: bool) -> nn.Module:
    """The fusion block of ``model.args.fusion`` (one of ``FUSION_KINDS``)."""
    if kind == "attention":
        return DualAttentionFusion(width, reduction, cross_scale)
    if kind == "add":
        return AddFusion(width, cross_scale)
    if kind == "concat":
        return ConcatFusion(width, cross_scale)
    raise ValueError(f"model 'mda': 'fusion' must be one of {list(FUSION_KINDS)}, got {kind!r}")


@register_model("mda")
class MDANet(nn.Module):
    """The MDA fusion network.

    Args:
        width: channel width C of every internal feature (paper: 32).
        reduction: channel-attention squeeze ratio, C -> C / reduction (paper: 8).
        up2_channels: output channels of the 2x residual up block (paper: 16).
        up4_channels: output channels of the 4x residual up path (paper: 8).
        fusion: fusion block at every fusion point, ``attention`` (paper) | ``add`` | ``concat``
            (ablations; module docstring).
        scales: encoder scales, 3 = 1x + 2x + 4x (paper) | 2 = 1x + 2x | 1 = 1x only (ablations;
            module docstring lists what each removes).
        base: ``none`` (paper) | ``max`` | ``mean``: the output is a residual on that pixel-wise
            fusion of the inputs (``BASES``; our extension). Adds no parameter.

    The concatenation before the head has ``2 * width + 2 * up2_channels + up4_channels``
    channels with 3 scales (104 with the paper's values), ``2 * width + up2_channels`` with 2 and
    ``width`` with 1.
    """

    ARG_NAMES: tuple[str, ...] = ("width", "reduction", "up2_channels", "up4_channels", "fusion", "scales", "base")
    #: ``pipeline.common.config.param`` checks of each ``model.args`` key (default: positive int).
    ARG_SPECS: dict[str, dict[str, Any]] = {
        "fusion": {"kind": str, "choices": FUSION_KINDS},
        "scales": {"kind": int, "choices": tuple(FUSION_POINTS)},
        "base": {"kind": str, "choices": BASES},
    }

    def __init__(self, width: int = 32, reduction: int = 8, up2_channels: int = 16, up4_channels: int = 8,
                 fusion: str = "attention", scales: int = 3, base: str = "none") -> None:
        super().__init__()
        for key, value in (("width", width), ("reduction", reduction),
                           ("up2_channels", up2_channels), ("up4_channels", up4_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model 'mda': '{key}' must be a positive integer, got {value!r}")
        if width % reduction:
            raise ValueError(f"model 'mda': width ({width}) must be divisible by reduction ({reduction})")
        if fusion not in FUSION_KINDS:
            raise ValueError(f"model 'mda': 'fusion' must be one of {list(FUSION_KINDS)}, got {fusion!r}")
        if isinstance(scales, bool) or scales not in FUSION_POINTS:
            raise ValueError(f"model 'mda': 'scales' must be one of {list(FUSION_POINTS)}, got {scales!r}")
        if base not in BASES:
            raise ValueError(f"model 'mda': 'base' must be one of {list(BASES)}, got {base!r}")
        self.width, self.fusion, self.scales, self.base = width, fusion, scales, base
        # modules a reduced configuration does not run are not created (attribute None): the
        # default configuration keeps exactly the paper's modules and state-dict keys
        self.stem = _conv3(1, width)
        self.enc1 = ResidualDown(width, stride=1)
        self.enc2 = ResidualDown(width, stride=2) if scales >= 2 else None
        self.enc4 = nn.Sequential(ResidualDown(width, stride=2), ResidualDown(width, stride=2)) if scales >= 3 else None
        self.fuse_same = fusion_block(fusion, width, reduction, cross_scale=False)
        self.fuse_cross = fusion_block(fusion, width, reduction, cross_scale=True) if scales >= 2 else None
        self.dec2 = ResidualUp(width, up2_channels) if scales >= 2 else None
        self.dec4 = nn.Sequential(ResidualUp(width, width), ResidualUp(width, up4_channels)) if scales >= 3 else None
        concat = {1: width, 2: 2 * width + up2_channels, 3: 2 * width + 2 * up2_channels + up4_channels}[scales]
        self.head = ConvChain(_conv3(concat, width), _conv3(width, 1), nn.Tanh())

    def encode(self, x: Tensor) -> tuple[Tensor, ...]:
        """Siamese encoder: (N, 1, H, W) -> features at 1x, 1/2 and 1/4 resolution (the first
        ``scales`` of them), (N, C, ., .)."""
        x0 = self.stem(x)
        if self.enc2 is None:
            return (self.enc1(x0),)
        if self.enc4 is None:
            return self.enc1(x0), self.enc2(x0)
        return self.enc1(x0), self.enc2(x0), self.enc4(x0)

    def encode_pair(self, ir: Tensor, vi: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Encoder features of both modalities: ``([ir1, ir2, ir4], [vi1, vi2, vi4])`` (``encode``).

        One batch of 2B (the shared weights run once); on the fused inference path one modality
        after the other instead, which halves the encoder's working memory at the same cost.
        """
        if _fusable(ir):
            return list(self.encode(ir)), list(self.encode(vi))
        b = ir.shape[0]
        enc = self.encode(torch.cat([ir, vi], dim=0))
        return [e[:b] for e in enc], [e[b:] for e in enc]

    def decode2_pair(self, f22: Tensor, f24: Tensor) -> tuple[Tensor, Tensor]:
        """``dec2`` of F22 and F24 (shared weights): one batched call, one call each on the fused path."""
        if _fusable(f22):
            return self.dec2(f22), self.dec2(f24)
        u2 = self.dec2(torch.cat([f22, f24], dim=0))
        return u2[: f22.shape[0]], u2[f22.shape[0]:]

    def forward(
        self, ir: Tensor, vi: Tensor, return_features: bool = False
    ) -> Tensor | tuple[Tensor, dict[str, list[Tensor]]]:
        """Fuse an IR image with the visible luma.

        Args:
            ir: (B, 1, H, W) float in [0, 1]; H and W multiples of 8 (``pipeline.model.inference.Fuser``
                pads any size).
            vi: (B, 1, H, W) float in [0, 1], the visible Y channel.
            return_features: also return the intermediate features.

        Returns:
            fused (B, 1, H, W) in (0, 1); with ``return_features`` also
            ``{"ir": [ir1, ir2, ir4], "vi": [vi1, vi2, vi4], "fusion": [F11, F12, F22, F24, F44]}``
            (encoder features at 1x, 1/2, 1/4 and the fusion-point features before up-sampling;
            with fewer ``scales`` only the ones that exist: ``[ir1, ir2]`` and ``[F11, F12, F22]``,
            or ``[ir1]`` and ``[F11]``).

        Raises:
            ValueError: shapes differ, are not (B, 1, H, W), or H/W are not multiples of 8.
        """
        if ir.shape != vi.shape or ir.ndim != 4 or ir.shape[1] != 1:
            raise ValueError(
                f"MDA expects ir and vi of equal shape (B, 1, H, W); got {tuple(ir.shape)} and {tuple(vi.shape)}"
            )
        h, w = ir.shape[-2:]
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise ValueError(
                f"MDA needs H and W multiples of {SIZE_MULTIPLE}, got {h}x{w} "
                "(pipeline.model.inference.Fuser pads any size)"
            )
        irs, vis = self.encode_pair(ir, vi)
        features = {"ir": list(irs), "vi": list(vis)} if return_features else {}
        # the full-resolution features go as soon as they are used (inference memory)
        ir1, vi1 = irs.pop(0), vis.pop(0)
        f11 = self.fuse_same(ir1, vi1)
        del ir1
        if self.scales == 1:
            fusion = cat = [f11]
        else:
            f12 = self.fuse_cross(irs[0], vi1)
            del vi1
            f22 = self.fuse_same(irs[0], vis[0])
            if self.scales == 2:
                fusion, cat = [f11, f12, f22], [f11, f12, self.dec2(f22)]
            else:
                f24 = self.fuse_cross(irs[1], vis[0])
                f44 = self.fuse_same(irs[1], vis[1])
                fusion = [f11, f12, f22, f24, f44]
                cat = [f11, f12, *self.decode2_pair(f22, f24), self.dec4(f44)]
        fused = (_concat_conv(self.head, cat) if len(cat) > 1 else self.head(cat[0])) / 2
        fused = fused + (0.5 if self.base == "none" else pixel_base(self.base, ir, vi))
        if not return_features:
            return fused
        return fused, {**features, "fusion": fusion}
