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


def test_crop_sampler_draws_seeded_flipped_crops_per_pair(tmp_path):
    """train.sampler: crops: random crops of whole training images, every pair equally likely (or by
    area), the pair's image weights, seeded (issue 19)."""
    import numpy as np

    from pipeline.train.data import CropSampler, ValPair

    rng = np.random.default_rng(0)
    big = ValPair("big", rng.integers(0, 255, (64, 96), dtype=np.uint8), rng.integers(0, 255, (64, 96), dtype=np.uint8),
                  None, {"int_ir": 0.7, "int_vi": 0.3, "det_ir": 0.6, "det_vi": 0.4})
    small = ValPair("small", np.full((20, 24), 200, np.uint8), np.full((20, 24), 10, np.uint8), None,
                    {"int_ir": 0.5, "int_vi": 0.5, "det_ir": 0.5, "det_vi": 0.5})
    tiny = ValPair("tiny", np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), None, small.weights)
    a = next(CropSampler([big, small, tiny], 16, 64, "pairs", seed=3))
    b = next(CropSampler([big, small, tiny], 16, 64, "pairs", seed=3))
    assert a["ir"].shape == (64, 1, 16, 16) and all(torch.equal(a[k], b[k]) for k in a)
    from_small = (a["ir"].flatten(1) == 200 / 255).all(1)
    assert 16 < int(from_small.sum()) < 48  # about half the crops from each of the 2 usable pairs
    assert torch.allclose(a["int_ir"][~from_small], torch.tensor(0.7))
    by_area = next(CropSampler([big, small], 16, 400, "area", seed=3))
    assert float((by_area["ir"].flatten(1) == 200 / 255).all(1).float().mean()) < 0.2  # 480 of 6624 pixels
    with pytest.raises(ValueError, match="train.crop_size=16"):
        CropSampler([tiny], 16, 4)
