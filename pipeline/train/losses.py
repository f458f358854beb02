"""The adaptive fusion loss of MDA: image-level, patch-level, style and feature-level terms.

Plain functions do the maths on ``(B, C, H, W)`` tensors in [0, 1]; :class:`FusionLoss` composes
them, sharing the SSIM, Sobel and local-statistics computations between the terms.

Notation: ``f`` fused, ``a`` IR, ``b`` visible (Y), all (B, 1, H, W) in [0, 1]; ``w_int_*``,
``w_det_*`` the per-sample image weights from the stats stage (each pair sums to 1);
``D(x, y)`` the pixel error, ``|x - y|`` (L1) or ``(x - y)^2`` (MSE) (``loss.intensity.kind``);
``G(x) = |Sobel_x * x| + |Sobel_y * x|`` the L1 Sobel gradient magnitude (replicate borders);
``S(x, y)`` the SSIM map (Gaussian 11x11, sigma 1.5, valid region), ``mean`` the spatial mean.

Terms (each returned separately, before its global weight)::

    intensity      = mean_B[ w_int_a * mean D(f, a) + w_int_b * mean D(f, b) ]
    ssim           = mean_B[ w_det_a * (1 - mean S(f, a)) + w_det_b * (1 - mean S(f, b)) ]
                     (``loss.ssim.luminance: false``: S without its luminance factor, so the term
                     asks for the inputs' local contrast and structure, not their local means)
    gradient       = mean_B mean | G(f) - (w_det_a G(a) + w_det_b G(b)) |
    patch_intensity= mean_B mean[ m_int_a D(f, a) + m_int_b D(f, b) ]
    patch_ssim     = mean_B mean[ m_det_a (1 - S(f, a)) + m_det_b (1 - S(f, b)) ]
    patch_gradient = mean_B mean | G(f) - (m_det_a G(a) + m_det_b G(b)) |
    style          = sum_{l in relu1_2, relu2_2} mean_B ||Gram_l(f) - Gram_l(a)||_F^2
                                           / (||Gram_l(f)||_F^2 + ||Gram_l(a)||_F^2 + eps)
    feature        = mean_k mean (F_k - [w_a up(e_a,k) + w_b up(e_b,k)])^2 ,  w = (w_int + w_det) / 2

    total = w_I intensity + w_S ssim + w_G gradient
            + w_P (w_I patch_intensity + w_S patch_ssim + w_G patch_gradient)
            + w_style style + w_feat feature

Targets of the intensity and gradient terms (``loss.intensity.target``, ``loss.gradient.target``;
our extension of the paper, issue 10). ``blend`` is the paper: the target is the adaptive weighted
combination above, so the best the loss can ask for is a locally weighted average, and an edge
present in one input only is asked for at that input's weight. ``max`` asks for the elementwise
maximum of the inputs' intensities / gradient magnitudes (as SeAFusion and CDDFuse train), and the
adaptive weights still shape the loss as the per-pixel weight of the error (:func:`max_target`)::

    intensity (max) = mean_B mean[ r_int * D(f, max(a, b)) ],  r_int = 2 w_int_a where a >= b, else 2 w_int_b
                      (r_int = 1 with ``loss.intensity.adaptive: false``: the plain max loss)
    gradient  (max) = mean_B mean[ r_det * |G(f) - max(G(a), G(b))| ],  r_det likewise from G and w_det

(patch level: the same with the per-pixel maps ``m`` in place of ``w``). With weights 0.5/0.5 this
is the plain max loss; a source the complementary-information statistics favour counts more where
it supplies the target. ``loss.profile: paper`` selects the paper-faithful loss in one parameter
(:data:`PAPER_PROFILE`: blend targets, MSE intensity, every term at the paper's weights);
``loss.profile: ours`` (default) uses the section as written.

Per-pixel weight maps (patch level), from local statistics of each input in a ``k x k`` window
(``loss.patch.window``; reflect borders) computed in torch: local mean ``mu``, local standard
deviation ``sigma`` and local RMS Sobel gradient ``g = sqrt(avg(Sx^2 + Sy^2))``::

    score_int(x) = mean_weight * log(mu_x + eps) + log(sigma_x + eps)
    score_det(x) = log(g_x + eps)
    (m_a, m_b)   = softmax over {a, b} of score / T           (T = loss.patch.temperature)

Normalisation: taking the log makes the softmax scale-free, so no data-dependent constant is
needed (the authors divide raw statistics by 3000, which leaves every weight near 0.5): with
``T = 1`` and ``mean_weight = 0`` the weight is the share of the statistic,
``m_a = sigma_a / (sigma_a + sigma_b)``; ``T < 1`` sharpens it (``T = 0.5`` -> squared shares).
``eps`` (``loss.patch.eps``, in [0, 1] intensity units) sets where a flat region counts as
"no information": two flat inputs give 0.5/0.5, a flat input beside a textured one gives the
textured one almost all the weight. The maps carry no gradient.

Feature term: the fusion-point features ``F = [F11, F12, F22, F24, F44]`` of the network are kept
close to the weighted combination of the encoder features they fuse (``e_a``: IR ``[1x, 2x, 4x]``,
``e_b``: visible) - pairs (IR, VIS) = (1x,1x), (2x,1x), (2x,2x), (4x,2x), (4x,4x); the coarser
source is bilinearly resized to ``F``'s size. The target is detached, so the term only shapes the
fusion blocks (it cannot shrink the encoder features to cheat). Default weight small (authors:
1e-6 on their perceptual term).

SSIM constants are for the data range actually used, [0, 1]: ``C1 = (0.01 * 1)^2``,
``C2 = (0.03 * 1)^2``. The loss always runs in float32 (autocast is switched off inside).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# keys of the per-sample weights dict (the stats stage's output contract)
from pipeline.data.contracts import WEIGHT_NAMES as WEIGHT_KEYS
from pipeline.data.contracts import WEIGHTINGS
from pipeline.common.config import param, section

#: fusion point k of the model -> (index into features["ir"], index into features["vi"])
FUSION_PAIRS: tuple[tuple[int, int], ...] = ((0, 0), (1, 0), (1, 1), (2, 1), (2, 2))
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
_GRAM_EPS = 1e-8


# --------------------------------------------------------------------------------------------
# plain functions
# --------------------------------------------------------------------------------------------
def gaussian_kernel1d(size: int, sigma: float, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``size`` taps (centre at ``size // 2``), shape (size,)."""
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _blur_valid(x: torch.Tensor, kernel1d: torch.Tensor) -> torch.Tensor:
    """Depthwise 'valid' convolution with the outer product of ``kernel1d``: (B, C, H, W) ->
    (B, C, H-k+1, W-k+1). One 2-D depthwise conv: on CPU (oneDNN) it measured faster than two
    1-D passes, forward and backward."""
    c = x.shape[1]
    k2 = (kernel1d[:, None] * kernel1d[None, :]).expand(c, 1, -1, -1).contiguous()
    return F.conv2d(x, k2, groups=c)


def ssim_map(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    window_size: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
    data_range: float = 1.0,
    luminance: bool = True,
) -> torch.Tensor:
    """Per-pixel SSIM (Wang et al. 2004) with a Gaussian window, 'valid' region.

    Constants for the data range: ``C1 = (0.01 * data_range)^2``, ``C2 = (0.03 * data_range)^2``;
    with the default ``data_range=1`` (images in [0, 1]) ``C1 = 1e-4``, ``C2 = 9e-4``. Population
    (biased) local variances, as in the reference implementation. Finite for constant images
    (a constant pair gives 1; a constant vs textured image gives a value near 0).

    Args:
        x, y: (B, C, H, W) float in [0, data_range], H and W >= ``window_size``; channels are
            independent (x may be broadcast along C).

    Returns:
        (B, C, H - window_size + 1, W - window_size + 1) SSIM values in [-1, 1]; with
        ``luminance=False`` the contrast-structure factor alone (local means ignored).
    """
    if x.dim() != 4 or y.dim() != 4:
        raise ValueError(f"ssim_map expects (B, C, H, W) tensors, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = torch.broadcast_tensors(x, y)
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"ssim_map: image {tuple(x.shape[-2:])} is smaller than the {window_size}x{window_size} window")
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    kernel = gaussian_kernel1d(window_size, sigma, device=x.device, dtype=x.dtype)
    stats = _blur_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1), kernel)
    mu_x, mu_y, xx, yy, xy = stats.chunk(5, dim=1)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x, var_y, cov = xx - mu_xx, yy - mu_yy, xy - mu_xy
    if not luminance:  # contrast-structure only (the SSIM of MS-SSIM's finer scales)
        return (2 * cov + c2) / (var_x + var_y + c2)
    num = (2 * mu_xy + c1) * (2 * cov + c2)
    den = (mu_xx + mu_yy + c1) * (var_x + var_y + c2)
    return num / den


def mean_ssim(x: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Mean SSIM per sample, (B,) — see :func:`ssim_map` for arguments and constants."""
    return ssim_map(x, y, **kwargs).mean(dim=(1, 2, 3))


def sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel derivatives (unnormalised 3x3 kernels, replicate borders) of (B, C, H, W) -> (gx, gy)."""
    b, c, h, w = x.shape
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device, dtype=x.dtype)
    weight = torch.stack([kx, kx.t()]).unsqueeze(1)  # (2, 1, 3, 3)
    g = F.conv2d(F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate"), weight)
    return g[:, 0].view(b, c, h, w), g[:, 1].view(b, c, h, w)


def sobel_l1(x: torch.Tensor) -> torch.Tensor:
    """L1 Sobel gradient magnitude ``|gx| + |gy|`` (finite gradients everywhere), same shape as x."""
    gx, gy = sobel(x)
    return gx.abs() + gy.abs()


def pixel_error(x: torch.Tensor, y: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Elementwise ``|x - y|`` (``"l1"``) or ``(x - y)^2`` (``"mse"``)."""
    if kind == "l1":
        return (x - y).abs()
    if kind == "mse":
        return (x - y) ** 2
    raise ValueError(f"pixel_error: kind must be 'l1' or 'mse', got {kind!r}")


TARGETS: tuple[str, ...] = ("blend", "max")
PROFILES: tuple[str, ...] = ("ours", "paper")
#: ``loss.profile: paper``: the paper-faithful loss (blend targets, MSE intensity, every term at the
#: paper's relative weights); these keys override the ``loss:`` section, everything else is kept.
PAPER_PROFILE: dict[str, Any] = {
    "intensity": {"weight": 1.0, "kind": "mse", "target": "blend"},
    "ssim": {"enabled": True, "weight": 1.0},
    "gradient": {"enabled": True, "weight": 1.0, "target": "blend"},
    "patch": {"enabled": True, "weight": 2.0},
    "style": {"enabled": True, "weight": 0.1},
    "feature": {"enabled": True, "weight": 0.1},
}


def apply_profile(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``loss:`` section with its ``profile`` applied: ``ours`` (default) returns it as written,
    ``paper`` overrides it with :data:`PAPER_PROFILE`.

    Raises:
        pipeline.common.config.ParamsError: an unknown profile.
    """
    profile = param(cfg, "profile", str, where="loss", default="ours", choices=PROFILES)
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in cfg.items()}
    if profile == "paper":
        for key, values in PAPER_PROFILE.items():
            out[key] = {**dict(out.get(key) or {}), **values}
    return out


def loss_section(params: Mapping[str, Any]) -> dict[str, Any]:
    """The ``loss:`` section of a whole ``params.yaml`` for training: as written, with
    ``patch.weighting`` set from ``stats.weighting`` (one switch: ``fixed`` makes the stats stage's
    image/patch weights and the loss's per-pixel patch maps all 0.5)."""
    cfg = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in section(params, "loss").items()}
    weighting = (params.get("stats") or {}).get("weighting", "adaptive")
    cfg["patch"] = {**dict(cfg.get("patch") or {}), "weighting": weighting}
    return cfg


def max_target(
    x_a: torch.Tensor, x_b: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target and per-pixel loss weight of a ``max`` term (our extension of the paper).

    The target is the elementwise maximum ``max(x_a, x_b)`` (intensities or gradient magnitudes,
    as SeAFusion/CDDFuse use); the adaptive weights keep shaping the loss through the weight of
    each pixel: ``r = 2 w_a`` where ``x_a >= x_b`` (the target comes from source a) and ``2 w_b``
    elsewhere. With ``w_a = w_b = 0.5`` this is the plain max loss; a source the statistics favour
    counts more where it supplies the target.

    Args:
        x_a, x_b: (B, 1, H, W) (or broadcastable) source values.
        w_a, w_b: weights broadcastable to them (per-sample (B, 1, 1, 1) or per-pixel maps);
            ``w_a + w_b == 1``.

    Returns:
        ``(target, r)``, both detached.
    """
    with torch.no_grad():
        from_a = x_a >= x_b
        return torch.where(from_a, x_a, x_b), 2.0 * torch.where(from_a, w_a, w_b)


def _box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a ``window x window`` neighbourhood (reflect borders), same size as x."""
    p = window // 2
    x = F.pad(x, (p, window - 1 - p, p, window - 1 - p), mode="reflect")
    return F.avg_pool2d(F.avg_pool2d(x, (window, 1), stride=1), (1, window), stride=1)  # separable


def local_statistics(x: torch.Tensor, window: int) -> dict[str, torch.Tensor]:
    """Local mean, standard deviation and RMS Sobel gradient in a ``window x window`` box.

    Args:
        x: (B, C, H, W) in [0, 1], H and W > ``window // 2``.
        window: box size in pixels.

    Returns:
        ``{"mean", "std", "grad"}``, each (B, C, H, W); std and grad are >= 0 (intensity units;
        grad in unnormalised-Sobel units, up to 4x intensity).
    """
    gx, gy = sobel(x)
    c = x.shape[1]
    pooled = _box_mean(torch.cat([x, x * x, gx * gx + gy * gy], dim=1), window)
    mean, sq, energy = pooled[:, :c], pooled[:, c : 2 * c], pooled[:, 2 * c :]
    std = (sq - mean * mean).clamp_min(0).sqrt()
    return {"mean": mean, "std": std, "grad": energy.clamp_min(0).sqrt()}


def patch_weight_maps(
    ir: torch.Tensor,
    vi: torch.Tensor,
    *,
    window: int = 11,
    temperature: float = 0.5,
    mean_weight: float = 1.0,
    eps: float = 1e-3,
    weighting: str = "adaptive",
) -> dict[str, torch.Tensor]:
    """Per-pixel intensity and detail weight maps (softmax over {IR, VIS}; module docstring).

    Args:
        ir, vi: (B, 1, H, W) in [0, 1].
        window: local-statistics box size (pixels).
        temperature: softmax temperature on the log-statistics (> 0; smaller = sharper).
        mean_weight: exponent of the local mean in the intensity score (0: contrast only).
        eps: floor added to each statistic (intensity units) before the log.
        weighting: ``adaptive`` (the softmax above) or ``fixed`` (the ablation ``stats.weighting:
            fixed``: every map is 0.5).

    Returns:
        ``{"int": (B, 2, H, W), "det": (B, 2, H, W)}``, channel 0 = IR, channel 1 = VIS; each
        pixel's pair sums to 1. No gradient.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")
    if weighting == "fixed":
        half = torch.full_like(torch.cat([ir, vi], dim=1), 0.5)
        return {"int": half, "det": half.clone()}
    with torch.no_grad():
        st = local_statistics(torch.cat([ir, vi], dim=1), window)  # channels: IR, VIS
        score_int = mean_weight * torch.log(st["mean"] + eps) + torch.log(st["std"] + eps)
        score_det = torch.log(st["grad"] + eps)
        return {
            "int": torch.softmax(score_int / temperature, dim=1),
            "det": torch.softmax(score_det / temperature, dim=1),
        }


def gram_matrix(feat: torch.Tensor) -> torch.Tensor:
    """Gram matrix normalised by the number of positions: (B, C, H, W) -> (B, C, C), F F^T / (H W)."""
    b, c, h, w = feat.shape
    flat = feat.reshape(b, c, h * w)
    return torch.bmm(flat, flat.transpose(1, 2)) / (h * w)


def gram_distance(feat_x: torch.Tensor, feat_y: torch.Tensor, eps: float = _GRAM_EPS) -> torch.Tensor:
    """Scale-free Gram distance per sample, (B,) in [0, 2].

    ``||Gx - Gy||_F^2 / (||Gx||_F^2 + ||Gy||_F^2 + eps)``: 0 iff the Gram matrices are equal,
    independent of the feature scale (so one default weight suits ImageNet and random VGG weights).
    """
    gx, gy = gram_matrix(feat_x), gram_matrix(feat_y)
    num = (gx - gy).pow(2).sum(dim=(1, 2))
    den = gx.pow(2).sum(dim=(1, 2)) + gy.pow(2).sum(dim=(1, 2)) + eps
    return num / den


def feature_loss(features: Mapping[str, Sequence[torch.Tensor]], w_ir: torch.Tensor, w_vi: torch.Tensor) -> torch.Tensor:
    """MSE of the fusion-point features to the weighted (detached) encoder features they fuse.

    Args:
        features: the model's ``{"ir": [ir1, ir2, ir4], "vi": [vi1, vi2, vi4],
            "fusion": [F11, F12, F22, F24, F44]}`` (each (B, C, h, w)).
        w_ir, w_vi: (B,) per-sample weights.

    Returns:
        Scalar: mean over the five fusion points of the mean squared difference.
    """
    for key in ("ir", "vi", "fusion"):
        if key not in features:
            raise ValueError(f"feature_loss: features dict lacks '{key}' (keys: {sorted(features)})")
    fir, fvi, fus = features["ir"], features["vi"], features["fusion"]
    if len(fus) != len(FUSION_PAIRS) or len(fir) != 3 or len(fvi) != 3:
        raise ValueError(
            f"feature_loss: expected 3 IR, 3 VIS and {len(FUSION_PAIRS)} fusion features, "
            f"got {len(fir)}, {len(fvi)}, {len(fus)}"
        )
    wa, wb = w_ir.view(-1, 1, 1, 1), w_vi.view(-1, 1, 1, 1)
    total = 0.0
    for fused, (i, j) in zip(fus, FUSION_PAIRS):
        size = fused.shape[-2:]
        a, b = fir[i].detach().float(), fvi[j].detach().float()
        if a.shape[-2:] != size:
            a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
        if b.shape[-2:] != size:
            b = F.interpolate(b, size=size, mode="bilinear", align_corners=False)
        if a.shape[1] != fused.shape[1] or b.shape[1] != fused.shape[1]:
            raise ValueError(
                f"feature_loss: channel mismatch at a fusion point: fusion {fused.shape[1]}, "
                f"IR {a.shape[1]}, VIS {b.shape[1]}"
            )
        total = total + F.mse_loss(fused.float(), wa * a + wb * b)
    return total / len(fus)


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------
class FusionLoss(nn.Module):
    """The full adaptive loss (formulas in the module docstring).

    Args:
        intensity_weight, intensity_kind: weight and pixel error (``"mse"``/``"l1"``) of the
            intensity terms.
        ssim_enabled, ssim_weight: the SSIM structure terms (image and patch level).
        gradient_enabled, gradient_weight: the Sobel-gradient L1 terms (image and patch level).
        patch_enabled, patch_weight, patch_window, patch_temperature, patch_mean_weight, patch_eps:
            the patch-level terms and their per-pixel weight maps.
        patch_weighting: ``adaptive`` maps, or ``fixed`` (0.5 everywhere; the training stage sets
            it from ``stats.weighting``).
        style_enabled, style_weight, style_max_size: the Gram-matrix term vs IR; images larger than
            ``style_max_size`` are centre-cropped to it before VGG (null: no crop).
        feature_enabled, feature_weight: the fusion-point feature term (only when ``features`` are
            passed to ``forward``).
        vgg_weights, vgg_seed: VGG-16 weights file (torchvision layout) or ``None`` for a
            fixed-seed random init (warned; see :mod:`pipeline.model.vgg`).

    Attributes:
        vgg_source: where the VGG weights came from (``"none (style disabled)"`` if unused).
        term_weights: term name -> global weight, so that ``total == sum(w * terms[name])``.
    """

    def __init__(
        self,
        *,
        intensity_weight: float = 1.0,
        intensity_kind: str = "mse",
        intensity_target: str = "blend",
        intensity_adaptive: bool = True,
        ssim_enabled: bool = True,
        ssim_luminance: bool = True,
        ssim_weight: float = 1.0,
        gradient_enabled: bool = True,
        gradient_weight: float = 1.0,
        gradient_target: str = "blend",
        patch_enabled: bool = True,
        patch_weight: float = 2.0,
        patch_window: int = 11,
        patch_temperature: float = 0.5,
        patch_mean_weight: float = 1.0,
        patch_eps: float = 1e-3,
        patch_weighting: str = "adaptive",
        style_enabled: bool = True,
        style_weight: float = 0.1,
        style_max_size: int | None = 64,
        feature_enabled: bool = True,
        feature_weight: float = 0.1,
        vgg_weights: str | None = None,
        vgg_seed: int = 0,
    ) -> None:
        super().__init__()
        if intensity_kind not in ("mse", "l1"):
            raise ValueError(f"intensity_kind must be 'mse' or 'l1', got {intensity_kind!r}")
        if patch_temperature <= 0:
            raise ValueError(f"patch_temperature must be > 0, got {patch_temperature}")
        for name, value in (("intensity_target", intensity_target), ("gradient_target", gradient_target)):
            if value not in TARGETS:
                raise ValueError(f"{name} must be one of {TARGETS}, got {value!r}")
        self.intensity_kind = intensity_kind
        self.intensity_target, self.gradient_target = intensity_target, gradient_target
        self.intensity_adaptive = intensity_adaptive
        self.ssim_luminance = ssim_luminance
        self.ssim_enabled, self.gradient_enabled = ssim_enabled, gradient_enabled
        self.patch_enabled, self.style_enabled, self.feature_enabled = patch_enabled, style_enabled, feature_enabled
        self.patch_window, self.patch_temperature = patch_window, patch_temperature
        self.patch_mean_weight, self.patch_eps = patch_mean_weight, patch_eps
        if patch_weighting not in WEIGHTINGS:
            raise ValueError(f"patch_weighting must be one of {list(WEIGHTINGS)}, got {patch_weighting!r}")
        self.patch_weighting = patch_weighting
        self.style_max_size = style_max_size
        self.term_weights: dict[str, float] = {"intensity": intensity_weight}
        if ssim_enabled:
            self.term_weights["ssim"] = ssim_weight
        if gradient_enabled:
            self.term_weights["gradient"] = gradient_weight
        if patch_enabled:
            for name in list(self.term_weights):
                self.term_weights[f"patch_{name}"] = patch_weight * self.term_weights[name]
        if style_enabled:
            self.term_weights["style"] = style_weight
        if feature_enabled:
            self.term_weights["feature"] = feature_weight
        if style_enabled:
            from pipeline.model.vgg import VGG16Shallow

            self.vgg: VGG16Shallow | None = VGG16Shallow(vgg_weights, seed=vgg_seed)
            self.vgg_source = self.vgg.source
        else:
            self.vgg = None
            self.vgg_source = "none (style disabled)"

    @property
    def min_size(self) -> int:
        """Smallest height/width accepted (the SSIM window and the patch window)."""
        return max(SSIM_WINDOW, self.patch_window if self.patch_enabled else 1)

    @classmethod
    def from_params(cls, cfg: Mapping[str, Any]) -> "FusionLoss":
        """Build from the ``loss:`` section of ``params.yaml``; ``ParamsError`` names ``loss.<key>``."""
        w = "loss"
        cfg = apply_profile(cfg)
        kw = dict(
            intensity_weight=param(cfg, "intensity.weight", float, where=w, minimum=0.0),
            intensity_kind=param(cfg, "intensity.kind", str, where=w, choices=("mse", "l1")),
            intensity_target=param(cfg, "intensity.target", str, where=w, default="blend", choices=TARGETS),
            intensity_adaptive=param(cfg, "intensity.adaptive", bool, where=w, default=True),
            gradient_target=param(cfg, "gradient.target", str, where=w, default="blend", choices=TARGETS),
            ssim_enabled=param(cfg, "ssim.enabled", bool, where=w),
            ssim_luminance=param(cfg, "ssim.luminance", bool, where=w, default=True),
            ssim_weight=param(cfg, "ssim.weight", float, where=w, minimum=0.0),
            gradient_enabled=param(cfg, "gradient.enabled", bool, where=w),
            gradient_weight=param(cfg, "gradient.weight", float, where=w, minimum=0.0),
            patch_enabled=param(cfg, "patch.enabled", bool, where=w),
            patch_weight=param(cfg, "patch.weight", float, where=w, minimum=0.0),
            patch_window=param(cfg, "patch.window", int, where=w, minimum=3, maximum=63),
            patch_temperature=param(cfg, "patch.temperature", float, where=w, minimum=1e-3),
            patch_mean_weight=param(cfg, "patch.mean_weight", float, where=w, minimum=0.0),
            patch_eps=param(cfg, "patch.eps", float, where=w, minimum=1e-8, maximum=1.0),
            patch_weighting=param(cfg, "patch.weighting", str, where=w, default="adaptive", choices=WEIGHTINGS),
            style_enabled=param(cfg, "style.enabled", bool, where=w),
            style_weight=param(cfg, "style.weight", float, where=w, minimum=0.0),
            style_max_size=param(cfg, "style.max_size", int, where=w, minimum=16, allow_none=True),
            feature_enabled=param(cfg, "feature.enabled", bool, where=w),
            feature_weight=param(cfg, "feature.weight", float, where=w, minimum=0.0),
            vgg_weights=param(cfg, "vgg_weights", str, where=w, allow_none=True),
            vgg_seed=param(cfg, "vgg_seed", int, where=w, minimum=0),
        )
        return cls(**kw)

    def forward(
        self,
        fused: torch.Tensor,
        ir: torch.Tensor,
        vi: torch.Tensor,
        weights: Mapping[str, Any] | None = None,
        features: Mapping[str, Sequence[torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its terms.

        Args:
            fused, ir, vi: (B, 1, H, W) in [0, 1], H and W >= :attr:`min_size`.
            weights: per-sample weights ``int_ir, int_vi, det_ir, det_vi`` ((B,) tensors or
                scalars); ``None`` -> 0.5 each.
            features: the model's ``return_features=True`` dict, or ``None`` (feature term skipped).

        Returns:
            ``(total, terms)``: scalar with gradient; ``terms`` maps each computed term name to its
            detached scalar value before the global weight (``total = sum(term_weights[k] * terms[k])``).
        """
        self._check_inputs(fused, ir, vi)
        w = self._weights(weights, fused.shape[0], fused.device)
        with torch.autocast(fused.device.type, enabled=False):
            parts = self._terms(fused.float(), ir.float(), vi.float(), w, features)
        total = sum(self.term_weights[k] * v for k, v in parts.items())
        return total, {k: v.detach() for k, v in parts.items()}

    # ------------------------------------------------------------------
    def _terms(self, f, a, b, w, features) -> dict[str, torch.Tensor]:
        col = lambda t: t.view(-1, 1, 1, 1)  # noqa: E731 - (B,) -> broadcastable
        out: dict[str, torch.Tensor] = {}
        maps = None
        if self.patch_enabled:
            maps = patch_weight_maps(
                a, b, window=self.patch_window, temperature=self.patch_temperature,
                mean_weight=self.patch_mean_weight, eps=self.patch_eps, weighting=self.patch_weighting,
            )
        # intensity (image and patch level share the error maps)
        if self.intensity_target == "max":
            target, r = max_target(a, b, col(w["int_ir"]), col(w["int_vi"]))
            err = pixel_error(f, target, self.intensity_kind)
            out["intensity"] = (r * err).mean() if self.intensity_adaptive else err.mean()
            if maps is not None:
                m = maps["int"]
                out["patch_intensity"] = (max_target(a, b, m[:, :1], m[:, 1:])[1] * err).mean()
        else:
            err_a, err_b = pixel_error(f, a, self.intensity_kind), pixel_error(f, b, self.intensity_kind)
            out["intensity"] = (w["int_ir"] * err_a.mean((1, 2, 3)) + w["int_vi"] * err_b.mean((1, 2, 3))).mean()
            if maps is not None:
                m = maps["int"]
                out["patch_intensity"] = (m[:, :1] * err_a + m[:, 1:] * err_b).mean()
        # SSIM structure (one SSIM call for both sources)
        if self.ssim_enabled:
            s = ssim_map(f, torch.cat([a, b], dim=1), luminance=self.ssim_luminance)  # (B, 2, h, w), valid region
            dis = 1.0 - s
            out["ssim"] = (w["det_ir"] * dis[:, 0].mean((1, 2)) + w["det_vi"] * dis[:, 1].mean((1, 2))).mean()
            if maps is not None:
                r = SSIM_WINDOW // 2
                m = maps["det"][:, :, r : r + s.shape[-2], r : r + s.shape[-1]]
                out["patch_ssim"] = (m * dis).sum(1).mean()
        # Sobel gradient (one Sobel call for the three images)
        if self.gradient_enabled:
            g = sobel_l1(torch.cat([f, a, b], dim=1))
            gf, ga, gb = g[:, :1], g[:, 1:2], g[:, 2:]
            if self.gradient_target == "max":
                target, r = max_target(ga, gb, col(w["det_ir"]), col(w["det_vi"]))
                err = (gf - target).abs()
                out["gradient"] = (r * err).mean()
                if maps is not None:
                    m = maps["det"]
                    out["patch_gradient"] = (max_target(ga, gb, m[:, :1], m[:, 1:])[1] * err).mean()
            else:
                target = col(w["det_ir"]) * ga + col(w["det_vi"]) * gb
                out["gradient"] = (gf - target).abs().mean()
                if maps is not None:
                    m = maps["det"]
                    out["patch_gradient"] = (gf - (m[:, :1] * ga + m[:, 1:] * gb)).abs().mean()
        if self.style_enabled:
            out["style"] = self._style(f, a)
        if self.feature_enabled and features is not None:
            out["feature"] = feature_loss(
                features, (w["int_ir"] + w["det_ir"]) / 2, (w["int_vi"] + w["det_vi"]) / 2
            )
        return out

    def _style(self, f: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        size = self.style_max_size
        if size is not None:
            f, a = _center_crop(f, size), _center_crop(a, size)
        with torch.no_grad():
            feats_a = self.vgg(a)
        feats_f = self.vgg(f)
        return sum(gram_distance(x, y).mean() for x, y in zip(feats_f, feats_a))

    def _check_inputs(self, fused: torch.Tensor, ir: torch.Tensor, vi: torch.Tensor) -> None:
        for name, t in (("fused", fused), ("ir", ir), ("vi", vi)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != 1:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"FusionLoss: '{name}' must be a (B, 1, H, W) tensor, got {shape}")
        if not (fused.shape == ir.shape == vi.shape):
            raise ValueError(
                f"FusionLoss: shapes differ: fused {tuple(fused.shape)}, ir {tuple(ir.shape)}, vi {tuple(vi.shape)}"
            )
        if min(fused.shape[-2:]) < self.min_size:
            raise ValueError(f"FusionLoss: images {tuple(fused.shape[-2:])} are smaller than {self.min_size} px")

    @staticmethod
    def _weights(weights: Mapping[str, Any] | None, batch: int, device) -> dict[str, torch.Tensor]:
        out = {}
        for key in WEIGHT_KEYS:
            if weights is None:
                value = 0.5
            elif key not in weights:
                raise ValueError(f"FusionLoss: weights dict lacks '{key}' (expected {list(WEIGHT_KEYS)})")
            else:
                value = weights[key]
            t = torch.as_tensor(value, dtype=torch.float32, device=device).detach().reshape(-1)
            if t.numel() == 1:
                t = t.expand(batch)
            if t.numel() != batch:
                raise ValueError(f"FusionLoss: weight '{key}' must hold {batch} values, got shape {tuple(t.shape)}")
            out[key] = t
        return out


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return x[..., top : top + min(size, h), left : left + min(size, w)]


__all__ = [
    "PAPER_PROFILE",
    "TARGETS",
    "FusionLoss",
    "loss_section",
    "apply_profile",
    "max_target",
    "feature_loss",
    "gaussian_kernel1d",
    "sobel_l1",
    "gram_distance",
    "gram_matrix",
    "local_statistics",
    "patch_weight_maps",
    "pixel_error",
    "sobel",
    "mean_ssim",
    "ssim_map",
]
