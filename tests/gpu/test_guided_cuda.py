"""Grammar masks on a CUDA device give the CPU's result (skipped without a CUDA device)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mygpt.engine.guided import mask_logits

pytestmark = pytest.mark.gpu


def test_masks_on_cuda_equal_the_cpus():
    rng = np.random.default_rng(0)
    logits = torch.randn(4, 49152)
    for size in (6148, 100):  # longer than the vocabulary's bits, and shorter (the rest: not allowed)
        masks = {i: rng.integers(0, 256, size=size, dtype=np.uint8).tobytes() for i in (0, 3)}
        on_gpu = mask_logits(logits.cuda(), masks)
        assert on_gpu.device.type == "cuda"
        assert torch.equal(on_gpu.cpu(), mask_logits(logits, masks))
