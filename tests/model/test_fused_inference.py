"""Fused CPU inference (``pipeline.model.network.fused_inference``): same results, fused kernels, eval only."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest
import torch
from conftest import shared_dataset, shared_file
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.data.images import read_ir, read_visible, split_luma
from pipeline.model.inference import Fuser, pad_to_multiple
from pipeline.model.network import ConvChain, build_model, fused_inference
from pipeline.model.weights import load_model


class OpCounter(TorchDispatchMode):
    """Counts the operators that reach the dispatcher (by overload packet name)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every PReLU its own slope (the default 0.25 everywhere would hide a mix-up)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 0.5 - 0.1)
    return model.eval()


def _pair(h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(1, 1, h, w, generator=gen), torch.rand(1, 1, h, w, generator=gen)


@pytest.mark.parametrize("fusion,scales", list(itertools.product(["attention", "add", "concat"], [1, 2, 3])))
def test_fused_equals_module_by_module_for_every_configuration(fusion, scales):
    torch.manual_seed(scales)
    model = _randomised(build_model("mda", fusion=fusion, scales=scales), seed=scales)
    ir, vi = _pair(37, 53)
    with torch.no_grad():
        plain = model(pad_to_multiple(ir), pad_to_multiple(vi))[..., :37, :53]
    fast = Fuser(model, postprocess="clip")  # channels-last, fused (the defaults)
    assert fast.fused and fast.channels_last
    torch.testing.assert_close(fast.fuse_tensor(ir, vi), plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_path_runs_fused_kernels_and_no_separate_activations(channels_last):
    torch.manual_seed(0)
    model = _randomised(build_model("mda"), seed=0)
    ir, vi = _pair(48, 64)
    with torch.no_grad():
        plain = model(ir, vi)
    fuser = Fuser(model, postprocess="clip", channels_last=channels_last)
    with OpCounter() as ops:
        out = fuser.fuse_tensor(ir, vi)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=0)
    counts = ops.counts
    # every PReLU / ReLU / Sigmoid / Tanh runs inside a convolution; residual sums too
    assert not {"prelu", "_prelu_kernel", "relu", "sigmoid", "tanh"} & set(counts), counts
    assert counts["_convolution_pointwise"] > 0 and counts["_convolution_transpose_pointwise"] > 0
    # in-place "conv + skip" in each residual block (4 encoder blocks per modality, dec2 on F22
    # and on F24, 2 in dec4), "conv_ir + conv_vi" in each of the 5 spatial attentions and 4 adds
    # over the head's 5 inputs: no concatenation is ever built
    assert counts["_convolution_pointwise_"] == 2 * 4 + 2 + 2 + 5 + 4
    assert counts["cat"] == 0


def test_unfused_fuser_and_plain_eager_never_take_the_fused_path():
    torch.manual_seed(0)
    model = _randomised(build_model("mda"), seed=1)
    ir, vi = _pair(32, 40)
    with OpCounter() as ops, torch.no_grad():
        model(ir, vi)
    with OpCounter() as ops_unfused:
        Fuser(model, postprocess="clip", fused=False).fuse_tensor(ir, vi)
    for counts in (ops.counts, ops_unfused.counts):
        assert "_convolution_pointwise" not in counts and counts["prelu"] + counts["_prelu_kernel"] > 0


def test_training_is_untouched_inside_the_context():
    """With autograd on, the context changes nothing: same output, same gradients."""
    torch.manual_seed(0)
    model = _randomised(build_model("mda"), seed=2).train()
    ir, vi = _pair(32, 32)
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        with fused_inference(enabled):
            out = model(ir, vi)
        out.square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads):
        assert torch.equal(g0, g1)


def test_conv_chain_is_a_sequential_with_the_same_keys():
    chain = ConvChain(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.PReLU(), torch.nn.Conv2d(4, 2, 1))
    plain = torch.nn.Sequential(*chain)
    assert list(chain.state_dict()) == list(plain.state_dict()) == ["0.weight", "0.bias", "1.weight", "2.weight", "2.bias"]
    x = torch.rand(2, 1, 9, 11)
    with torch.no_grad():
        expected = plain(x)
        with fused_inference():
            fused = chain(x)
            # a per-channel PReLU has no exact oneDNN post-op: it runs as a module
            chain[1] = torch.nn.PReLU(4)
            per_channel = chain(x)
    torch.testing.assert_close(fused, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(per_channel, torch.nn.Sequential(*chain)(x), atol=1e-6, rtol=0)


def test_loaded_weights_fuse_after_load_state_dict():
    """The fused path reads the live parameters: weights loaded after building the Fuser are used."""
    torch.manual_seed(0)
    source = _randomised(build_model("mda"), seed=3)
    fuser = Fuser(build_model("mda"), postprocess="clip")
    ir, vi = _pair(40, 48)
    fuser.fuse_tensor(ir, vi)  # run once with the old weights
    fuser.model.load_state_dict(source.state_dict())
    with torch.no_grad():
        expected = source(ir, vi)
    torch.testing.assert_close(fuser.fuse_tensor(ir, vi), expected, atol=1e-5, rtol=0)


def test_authors_weights_fused_equal_eager_fp32_on_a_real_pair():
    """The authors' weights on a real TNO pair (cropped for speed): fused within 1e-4 of eager fp32."""
    model, _ = load_model(shared_file("models", "mda_official", "fusion_model.pth"))
    root = shared_dataset("TNO")
    ir_u8 = read_ir(root / "ir" / "31.png")[:203, :301]
    y_u8, _ = split_luma(read_visible(root / "vi" / "31.png"))
    y_u8 = np.ascontiguousarray(y_u8[:203, :301])
    ir = torch.from_numpy(np.ascontiguousarray(ir_u8)).float()[None, None] / 255
    vi = torch.from_numpy(y_u8).float()[None, None] / 255
    with torch.no_grad():
        eager = model(pad_to_multiple(ir), pad_to_multiple(vi))[..., :203, :301]
    fused = Fuser(model, postprocess="minmax").fuse_tensor(ir, vi)
    assert float((fused - eager).abs().max()) <= 1e-4
