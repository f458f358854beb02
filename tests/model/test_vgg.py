"""The shallow VGG-16 feature extractor: weight loading, random-init fallback, frozen behaviour."""

from __future__ import annotations

import hashlib
import logging

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.vgg import IMAGENET_MEAN, IMAGENET_STD, VGG16Shallow

# torchvision vgg16().features conv indices and shapes, plus some keys of the rest of the network
_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128)}
_EXTRA = {
    "features.10.weight": (256, 128, 3, 3),
    "features.10.bias": (256,),
    "classifier.6.weight": (10, 32),
    "classifier.6.bias": (10,),
}


def _full_layout_state(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for idx, (cout, cin) in _CONVS.items():
        state[f"features.{idx}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) * 0.1
        state[f"features.{idx}.bias"] = torch.randn(cout, generator=gen) * 0.1
    for key, shape in _EXTRA.items():
        state[key] = torch.randn(shape, generator=gen)
    return state


def _manual_features(state: dict[str, torch.Tensor], gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (gray.repeat(1, 3, 1, 1) - mean) / std

    def conv(t, i):
        return F.relu(F.conv2d(t, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1))

    f1 = conv(conv(x, 0), 2)
    f2 = conv(conv(F.max_pool2d(f1, 2), 5), 7)
    return f1, f2


def test_loads_torchvision_layout_and_matches_manual_convs(tmp_path):
    state = _full_layout_state()
    path = tmp_path / "vgg16_full.pth"
    torch.save(state, path)
    vgg = VGG16Shallow(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert vgg.source == f"file:{path} sha256:{digest}"
    gray = torch.rand(2, 1, 24, 30, generator=torch.Generator().manual_seed(0))
    f1, f2 = vgg(gray)
    e1, e2 = _manual_features(state, gray)
    assert f1.shape == (2, 64, 24, 30) and f2.shape == (2, 128, 12, 15)
    torch.testing.assert_close(f1, e1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f2, e2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("drop", ["features.5.bias", "features.0.weight"])
def test_missing_key_is_a_clear_error(tmp_path, drop):
    state = _full_layout_state()
    del state[drop]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=rf"partial\.pth: missing key '{drop}'"):
        VGG16Shallow(path)


def test_wrong_shape_and_missing_file(tmp_path):
    state = _full_layout_state()
    state["features.2.weight"] = torch.zeros(64, 32, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"'features.2.weight' has shape \(64, 32, 3, 3\)"):
        VGG16Shallow(path)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        VGG16Shallow(tmp_path / "nowhere.pth")
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(ValueError, match="list.pth: expected a state dict"):
        VGG16Shallow(not_a_dict)


def test_random_init_warns_and_is_deterministic(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.model.vgg"):
        a = VGG16Shallow(None, seed=0)
    assert any("random initialisation" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert a.source == "random-init(seed=0)"
    b = VGG16Shallow(None, seed=0)
    c = VGG16Shallow(None, seed=1)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
        if name.endswith("weight"):
            assert not torch.equal(pa, pc), name
    # the global RNG is untouched by the seeded init
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    VGG16Shallow(None, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_frozen_eval_and_gradient_reaches_input():
    vgg = VGG16Shallow(None)
    vgg.train()
    assert not vgg.training
    assert all(not p.requires_grad for p in vgg.parameters())
    x = torch.rand(1, 1, 16, 16, requires_grad=True)
    f1, f2 = vgg(x)
    (f1.mean() + f2.mean()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(B, 1\|3, H, W\)"):
        vgg(torch.rand(1, 2, 16, 16))
