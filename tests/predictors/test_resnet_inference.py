"""ResNet inference: batched forwards give the per-slice τ to float tolerance, on a set thread count."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qcgate.predictors import resnet
from qcgate.predictors.resnet import (
    CHANNELS,
    ResNetConfig,
    ResNetPredictor,
    build_network,
)


def _predictor() -> ResNetPredictor:
    """A seeded, untrained network with non-trivial batch-norm statistics (known weights)."""
    torch.manual_seed(11)
    config = ResNetConfig()
    network = build_network(len(CHANNELS), config)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
        network.head.weight.mul_(200.0)  # an untrained head answers ~the same for every crop
        network.head.bias.zero_()
    return ResNetPredictor(network, config, CHANNELS)


def _crops(n: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    scale = rng.uniform(0.2, 3.0, (n, 1, 1, 1))  # crops of different intensity: different τ
    return (scale * rng.uniform(0.0, 1.0, (n, len(CHANNELS), size, size))).astype(np.float32)


def test_batched_forward_equals_the_per_slice_path() -> None:
    predictor = _predictor()
    crops = _crops(30, predictor.config.crop_size)
    per_slice = np.concatenate([predictor.predict_crops(crops[i:i + 1]) for i in range(len(crops))])
    batched = predictor.predict_crops(crops)
    in_small_batches = predictor.predict_crops(crops, batch_size=7)
    assert per_slice.shape == batched.shape == (30,)
    assert np.ptp(per_slice) > 1e-4  # the inputs give different τ: the comparison means something
    np.testing.assert_allclose(batched, per_slice, rtol=0, atol=1e-6)
    np.testing.assert_allclose(in_small_batches, per_slice, rtol=0, atol=1e-6)
    # a strided float64 view gives the same τ as its contiguous float32 copy
    strided = np.repeat(crops.astype(np.float64), 2, axis=0)[::2]
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(predictor.predict_crops(strided), batched)


def test_inference_runs_on_the_inference_thread_count_and_restores_it() -> None:
    predictor = _predictor()
    seen: list[int] = []
    handle = predictor.network.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        predictor.predict_crops(_crops(5, predictor.config.crop_size))
    finally:
        handle.remove()
    assert seen == [resnet.inference_thread_count()]
    assert torch.get_num_threads() == before
    assert 1 <= resnet.inference_thread_count() <= len(os.sched_getaffinity(0))
