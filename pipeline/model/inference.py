"""Fusing image pairs of any size with a trained network, fast on CPU.

- Any size: the MDA network needs heights and widths that are multiples of 8; ``Fuser`` pads the
  inputs at the bottom/right by reflection (edge replication for images smaller than the pad) and
  crops the output back.
- Colour: the visible image's luma ``Y`` is fused with the IR image and recombined with the
  visible chroma (``pipeline.data.images.split_luma`` / ``merge_luma``); gray in, gray out.
- Output post-processing (``POSTPROCESS_MODES``):

  * ``"minmax"``: the authors' test procedure: each fused image is stretched min-max to 0-255.
    The released weights need it (their raw output spans only about 0.30-0.60 on TNO). The
    authors truncate to integers; we round (at most one grey level brighter, no bias).
    A constant output (max == min) cannot be stretched and falls back to ``"clip"``.
  * ``"clip"``: the raw output in [0, 1] times 255, rounded and clipped: what a model trained to
    produce the final intensities (our checkpoints) should use.

- Speed: ``torch.inference_mode``, eval mode, channels-last memory layout (oneDNN's native layout
  for these 32-channel convolutions), fused oneDNN kernels on the CPU
  (``pipeline.model.network.fused_inference``: each convolution with the activation after it, and
  the residual sums inside the last convolution of each block; equal to the module-by-module path
  within float rounding), thread count set by the caller (``set_threads``; the ``mda fuse`` default
  is one thread per available core). Large tensors should sit on transparent huge pages
  (``THP_MEM_ALLOC_ENABLE=1`` in the environment before PyTorch's first allocation, as ``mda fuse``
  sets it): every feature map is fresh memory, and with 4 KiB pages the page faults cost about a
  third of the time. Measured in ``bench/bench_inference.py`` (2 cores, 2048x2048 fp32 matmul
  ceiling about 220 GFLOP/s): 1.4-1.7x the ceiling with huge pages, about 1.0x without.
- Memory: on the fused path the encoder runs one modality at a time, no concatenation is built
  and full-resolution features are released once fused: peak about 680 B per padded pixel +
  150 MiB above the loaded model (``bench/bench_inference.py``; module by module, batched: about
  1280 B per pixel + 150 MiB).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.common.machine import available_cores
from pipeline.data.images import merge_luma, split_luma
from pipeline.model.network import SIZE_MULTIPLE, fused_inference
from pipeline.model.weights import load_model

log = logging.getLogger(__name__)

#: Accepted values of ``postprocess``.
POSTPROCESS_MODES: tuple[str, ...] = ("minmax", "clip")


def set_threads(threads: int | None = None) -> int:
    """Set PyTorch's intra-op thread count (``None``: one per available core); returns it."""
    n = available_cores() if threads is None else int(threads)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(n)
    return n


def pad_to_multiple(x: Tensor, multiple: int = SIZE_MULTIPLE) -> Tensor:
    """Pad (N, C, H, W) at the bottom/right to multiples of ``multiple``.

    Reflection padding, or edge replication where the image is too small to reflect.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not ph and not pw:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def fuse_padded(model: nn.Module, ir: Tensor, vi: Tensor,
                memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """Run ``model`` on inputs of any size: pad with ``pad_to_multiple``, fuse, crop back.

    Args:
        model: a network following the model contract (``model(ir, vi) -> fused``), in the mode
            and under the grad/inference mode the caller chose.
        ir, vi: (B, 1, H, W) float in [0, 1] on the model's device (vi = visible luma).
        memory_format: layout of the padded inputs (``torch.channels_last`` is faster on CPU).

    Returns:
        (B, 1, H, W), the model's output as it gives it (dtype and device unchanged).
    """
    h, w = ir.shape[-2:]
    x = pad_to_multiple(ir).contiguous(memory_format=memory_format)
    y = pad_to_multiple(vi).contiguous(memory_format=memory_format)
    return model(x, y)[..., :h, :w]


def postprocess(raw: np.ndarray, mode: str) -> np.ndarray:
    """Turn the raw network output into an 8-bit image.

    Args:
        raw: (H, W) float, the network output in (0, 1).
        mode: ``"minmax"`` (per-image stretch to 0-255, rounded) or ``"clip"`` (x255, rounded,
            clipped to 0-255).

    Returns:
        ``uint8`` (H, W).

    Raises:
        ValueError: a NaN or infinite value in ``raw`` (weights that cannot fuse: nothing is written).
    """
    if mode not in POSTPROCESS_MODES:
        raise ValueError(f"postprocess must be one of {POSTPROCESS_MODES}, got {mode!r}")
    raw = np.asarray(raw, dtype=np.float64)
    bad = int(raw.size - np.isfinite(raw).sum())
    if bad:
        raise ValueError(f"the network output has {bad} NaN or infinite value(s) of {raw.size}: not a fused image")
    if mode == "minmax":
        lo, hi = float(raw.min()), float(raw.max())
        if hi - lo > 1e-12:
            return np.round((raw - lo) / (hi - lo) * 255.0).astype(np.uint8)
    return np.clip(np.round(raw * 255.0), 0, 255).astype(np.uint8)


class Fuser:
    """Fuse IR/visible pairs of any size with a model, returning 8-bit images.

    Args:
        model: a network following the model contract (``model(ir, vi) -> fused``).
        postprocess: ``"minmax"`` or ``"clip"`` (see the module docstring).
        channels_last: run the convolutions in channels-last layout (faster on CPU; same result
            within float rounding).
        fused: run the network's fused oneDNN kernels on the CPU (``fused_inference``; same result
            within float rounding); ``False``: module by module.

    The model is put in eval mode (and converted to channels-last) in place. ``info`` holds the
    description returned by ``load_model`` when built with ``from_file`` (else ``{}``).

    Example:
        >>> model, info = load_model("fusion_model.pth")
        >>> fuser = Fuser(model, postprocess=info["postprocess"])
        >>> fused = fuser(ir_u8, vis_bgr_u8)       # (H, W, 3) uint8
    """

    def __init__(self, model: nn.Module, postprocess: str = "minmax", channels_last: bool = True,
                 fused: bool = True) -> None:
        if postprocess not in POSTPROCESS_MODES:
            raise ValueError(f"postprocess must be one of {POSTPROCESS_MODES}, got {postprocess!r}")
        self.postprocess = postprocess
        self.channels_last = channels_last
        self.fused = fused
        self.info: dict[str, Any] = {}
        self.model = model.eval()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @classmethod
    def from_file(cls, path: str | Path, postprocess: str | None = None, device: str | None = None,
                  **kwargs: Any) -> Fuser:
        """The one way from a weights file to a fuser (CLI, evaluation, MLflow pyfunc).

        Loads with ``pipeline.model.weights.load_model``; ``postprocess`` defaults to the weights'
        own default (``"minmax"`` for the authors' file, ``"clip"`` for ours). ``device``
        (``"cuda"``, ...) moves the network there when available; inputs follow it and results
        come back on the CPU.
        """

        model, info = load_model(path)
        if device is not None and device != "cpu":
            if device.startswith("cuda") and not torch.cuda.is_available():
                log.warning("CUDA requested but not available: fusing on the CPU")
            else:
                model = model.to(device)
        fuser = cls(model, postprocess=postprocess or info["postprocess"], **kwargs)
        fuser.info = info
        return fuser

    def fuse_tensor(self, ir: Tensor, vi: Tensor) -> Tensor:
        """Raw fusion of float tensors of any size.

        Args:
            ir, vi: (B, 1, H, W) float in [0, 1] (vi = visible luma).

        Returns:
            (B, 1, H, W) float in (0, 1) on the CPU, before post-processing (the inputs are moved
            to the model's device).
        """
        if ir.shape != vi.shape:
            raise ValueError(f"IR {tuple(ir.shape)} and visible {tuple(vi.shape)} sizes differ")
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.inference_mode(), fused_inference(self.fused):
            out = fuse_padded(self.model, ir.to(device), vi.to(device), fmt)
        return out.float().cpu().contiguous()

    def fuse_luma(self, ir: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Raw fusion of two ``uint8`` (H, W) images -> float32 (H, W) in (0, 1)."""
        for name, img in (("IR", ir), ("visible luma", y)):
            if img.dtype != np.uint8 or img.ndim != 2:
                raise ValueError(f"{name} must be uint8 (H, W), got {img.dtype} {img.shape}")
        if ir.shape != y.shape:
            raise ValueError(f"IR {ir.shape} and visible {y.shape} sizes differ")
        t_ir = torch.from_numpy(ir).float().div_(255.0)[None, None]
        t_vi = torch.from_numpy(y).float().div_(255.0)[None, None]
        return self.fuse_tensor(t_ir, t_vi)[0, 0].numpy()

    def __call__(self, ir: np.ndarray, visible: np.ndarray) -> np.ndarray:
        """Fuse one pair.

        Args:
            ir: ``uint8`` (H, W).
            visible: ``uint8`` BGR (H, W, 3) or gray (H, W), same H and W.

        Returns:
            ``uint8`` BGR (H, W, 3) for a colour visible image, else (H, W).
        """
        if visible.shape[:2] != ir.shape[:2]:
            raise ValueError(f"IR {ir.shape[:2]} and visible {visible.shape[:2]} sizes differ")
        y, crcb = split_luma(visible)
        fused_y = postprocess(self.fuse_luma(ir, y), self.postprocess)
        return merge_luma(fused_y, crcb)
