"""Real-data check: the akamaster checkpoints load strictly into the zoo and score as documented in SOURCES.md.

Accuracies (ImageNet normalisation of x/255, eval mode): on the 932 lossless official test images and on the full
10,000-image JPEG test set. JPEG costs these models about 10 points, which is why both are checked.
"""

from __future__ import annotations

import pytest
import torch

import pare
from pare.data import InMemoryLoader, load_dataset
from pare.models import create
from tests.conftest import shared_path

CHECKPOINTS = {
    "resnet20": ("akamaster_resnet20-12fca82f.th", 91.63, 81.03),
    "resnet32": ("akamaster_resnet32-d509ac18.th", 93.03, 82.56),
    "resnet56": ("akamaster_resnet56-4bfd9763.th", 92.60, 83.20),
}


def _top1(model: torch.nn.Module, dataset) -> float:
    loader = InMemoryLoader(dataset, 500, shuffle=False, augment=None, normalization="imagenet")
    return 100.0 * pare.evaluate(model, loader)["top1"]  # the expected figures below are percent


@pytest.mark.shared
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_pretrained_accuracy_on_lossless_and_jpeg_test_sets(name: str) -> None:
    file, lossless_expected, jpeg_expected = CHECKPOINTS[name]
    weights = shared_path("weights", file)
    lossless = load_dataset(
        shared_path("data", "cifar10_official_truncated", "cifar10_lossless_subset.npz"), "test"
    )
    jpeg = load_dataset(shared_path("data", "cifar10_jpeg"), "test")
    assert len(lossless) == 932 and len(jpeg) == 10_000
    model = create(name)
    pare.load_checkpoint(model, weights, strict=True)
    torch.set_num_threads(2)
    assert abs(_top1(model, lossless) - lossless_expected) <= 0.5
    assert abs(_top1(model, jpeg) - jpeg_expected) <= 0.5
