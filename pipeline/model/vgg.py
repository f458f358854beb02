"""The first two blocks of VGG-16 (our own layers, no torchvision), frozen, for the style loss.

Layers (as in VGG-16 "D", Simonyan & Zisserman 2015; torchvision ``vgg16().features`` indices)::

    conv1_1  3 -> 64   (features.0)   ReLU
    conv1_2 64 -> 64   (features.2)   ReLU   -> output 1 (relu1_2, full resolution)
    max-pool 2x2
    conv2_1 64 -> 128  (features.5)   ReLU
    conv2_2 128 -> 128 (features.7)   ReLU   -> output 2 (relu2_2, half resolution)

All convolutions are 3x3, stride 1, zero padding 1.

Weights: from a file in torchvision's key layout (``features.0.weight``, ``features.0.bias``,
``features.2.*``, ``features.5.*``, ``features.7.*``; the keys of the rest of the network are
ignored), e.g. torchvision's ImageNet ``vgg16-397923af.pth`` copied by hand onto the machine (it
cannot be downloaded here). Without a file the same layers get a fixed-seed random initialisation
(Kaiming-normal, fan-out, as torchvision initialises VGG; biases zero), a ``logging`` warning is
emitted, and :attr:`VGG16Shallow.source` says which of the two was used so the training can record
it (MLflow tag/param). Random features still give usable texture statistics for Gram matrices,
but they are not ImageNet features: the choice is never silent.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

#: our layer name -> (torchvision key prefix, in channels, out channels)
LAYERS: dict[str, tuple[str, int, int]] = {
    "conv1_1": ("features.0", 3, 64),
    "conv1_2": ("features.2", 64, 64),
    "conv2_1": ("features.5", 64, 128),
    "conv2_2": ("features.7", 128, 128),
}
#: ImageNet normalisation used by every torchvision-trained VGG (RGB order, inputs in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGG16Shallow(nn.Module):
    """Frozen conv1_1..conv2_2 of VGG-16 returning the ReLU features after conv1_2 and conv2_2.

    Args:
        weights: torchvision-layout state dict file (``.pth``); ``None`` -> fixed-seed random init.
        seed: seed of the random initialisation (ignored when ``weights`` is given).

    Attributes:
        source: ``"file:<path> sha256:<first 12 hex>"`` or ``"random-init(seed=<seed>)"``.

    Raises:
        FileNotFoundError: ``weights`` does not exist.
        ValueError: the file is not a state dict, lacks a key, or a tensor has the wrong shape
            (the message names the file and the key).
    """

    def __init__(self, weights: str | Path | None = None, seed: int = 0) -> None:
        super().__init__()
        for name, (_, cin, cout) in LAYERS.items():
            # skip_init: no default init, so the global RNG is left untouched; filled below
            self.add_module(name, nn.utils.skip_init(nn.Conv2d, cin, cout, kernel_size=3, padding=1))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if weights is None:
            self._random_init(seed)
            self.source = f"random-init(seed={seed})"
            log.warning(
                "VGG-16 weights: no file given (loss.vgg_weights is null); using a fixed-seed random "
                "initialisation (seed=%d) for the style loss. Give torchvision's vgg16 ImageNet "
                "file to use pretrained features.",
                seed,
            )
        else:
            path = Path(weights)
            self._load(path)
            self.source = f"file:{path} sha256:{_sha256(path)[:12]}"
            log.info("VGG-16 weights loaded from %s", self.source)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VGG16Shallow":
        """Stay in eval mode: the extractor is frozen (``model.train()`` on a parent is harmless)."""
        return super().train(False)

    def _random_init(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name in LAYERS:
                conv: nn.Conv2d = getattr(self, name)
                fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
                std = (2.0 / fan_out) ** 0.5
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * std)
                conv.bias.zero_()

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"VGG-16 weights file not found: {path} (loss.vgg_weights)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any unpickling failure: name the file
                raise ValueError(f"{path}: cannot read VGG-16 weights: {exc}") from exc
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{path}: cannot read VGG-16 weights: {exc}") from exc
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a state dict (mapping of tensors), got {type(state).__name__}")
        with torch.no_grad():
            for name, (prefix, _, _) in LAYERS.items():
                conv: nn.Conv2d = getattr(self, name)
                for part, target in (("weight", conv.weight), ("bias", conv.bias)):
                    key = f"{prefix}.{part}"
                    if key not in state:
                        raise ValueError(
                            f"{path}: missing key '{key}' (VGG-16 {name}); expected torchvision's "
                            f"layout: features.0/2/5/7 .weight and .bias"
                        )
                    value = state[key]
                    if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(target.shape):
                        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                        raise ValueError(f"{path}: '{key}' has shape {got}, expected {tuple(target.shape)}")
                    target.copy_(value.to(target.dtype))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of gray images.

        Args:
            x: (B, 1, H, W) gray in [0, 1] (or (B, 3, H, W) RGB in [0, 1]).

        Returns:
            ``(relu1_2, relu2_2)``: (B, 64, H, W) and (B, 128, H//2, W//2).
        """
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"VGG16Shallow expects (B, 1|3, H, W), got {tuple(x.shape)}")
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        x = F.relu(self.conv1_1(x))
        f1 = F.relu(self.conv1_2(x))
        x = F.max_pool2d(f1, kernel_size=2, stride=2)
        x = F.relu(self.conv2_1(x))
        f2 = F.relu(self.conv2_2(x))
        return f1, f2


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
