"""pipeline.train.data: the collate function the training workers run on Ray Data's batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_fixtures import patch_batch

from pipeline.train.data import WEIGHT_KEYS, PatchCollate, decode_patches


def test_patch_collate_gives_the_decoded_batch_as_float_tensors():
    raw, ir, vi = patch_batch(n=3, s=16)
    out = PatchCollate("cpu")(raw)
    assert not PatchCollate("cpu").pin_memory  # pinned host memory only for a CUDA device
    expected = decode_patches(raw)
    assert set(out) == {"ir", "vi", *WEIGHT_KEYS}
    for k, t in out.items():
        assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu"
        np.testing.assert_array_equal(t.numpy(), expected[k])
    np.testing.assert_allclose(out["ir"][:, 0].numpy() * 255, ir, atol=1e-4)


def test_patch_collate_rejects_an_unknown_weight_choice_at_once():
    with pytest.raises(ValueError, match="sample_weights"):
        PatchCollate("cpu", "pixel")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pinned memory, async copy)")
def test_patch_collate_pins_and_copies_to_the_gpu():
    raw, _, _ = patch_batch(n=2, s=16)
    collate = PatchCollate("cuda")
    assert collate.pin_memory
    out = collate(raw)
    assert all(t.device.type == "cuda" for t in out.values())
    np.testing.assert_array_equal(out["vi"].cpu().numpy(), decode_patches(raw)["vi"])
