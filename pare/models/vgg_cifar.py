"""The HRank / CHIP CIFAR VGG-16-BN (``vgg16_bn_cifar``, alias ``vgg16``).

Layout (HRank ``models/vgg_cifar10.py``; same module names, so HRank/CHIP checkpoints map key for key):
``features`` is a Sequential ``conv{i}`` (3x3, bias) / ``norm{i}`` (BN) / ``relu{i}`` per conv entry of the
cfg ``[64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512]`` and ``pool{i}`` (2x2
max-pool) per ``M`` (``i`` is the cfg index). A 32x32 input leaves a 2x2 map after the 13th conv; ``avgpool``
(AvgPool2d(2), as the HRank forward applies) makes it 1x1, so the classifier sees 512 features. ``classifier``
= ``linear1`` (512 -> 512), ``norm1`` (BatchNorm1d), ``relu1``, ``linear2`` (512 -> num_classes).

Counts at 32x32 (methods.md §7.1): conv MACs 313,196,544; + conv-bias adds + FC MACs 313,740,288.

``sparsity=``: 12 ratios for the first 12 convs; the 13th conv is never pruned (the official constructor
appends 0.0). ``widths=``: the 13 conv output widths, to rebuild a pruned model (``classifier_width`` sets
linear1's output).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from pare.errors import ConfigError
from pare.models.registry import Preprocessing, SparsitySemantics, register_model
from pare.models.sparsity import kept_width, resolve_sparsity

VGG16_CFG: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
)
NUM_CONVS = 13


class VGG16BNCifar(nn.Module):
    """CIFAR VGG-16-BN. Input (N, 3, 32, 32) -> logits (N, num_classes)."""

    def __init__(self, widths: Sequence[int], num_classes: int = 10, classifier_width: int = 512) -> None:
        super().__init__()
        widths = _check_widths(widths)
        if (
            isinstance(classifier_width, bool)
            or not isinstance(classifier_width, int)
            or classifier_width < 1
        ):
            raise ConfigError(
                f"vgg16_bn_cifar: classifier_width = {classifier_width!r} is not a positive int"
            )
        self.features = nn.Sequential()
        in_channels = 3
        conv_index = 0
        for cfg_index, entry in enumerate(VGG16_CFG):
            if entry == "M":
                self.features.add_module(f"pool{cfg_index}", nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out_channels = widths[conv_index]
            conv_index += 1
            self.features.add_module(f"conv{cfg_index}", nn.Conv2d(in_channels, out_channels, 3, padding=1))
            self.features.add_module(f"norm{cfg_index}", nn.BatchNorm2d(out_channels))
            self.features.add_module(f"relu{cfg_index}", nn.ReLU(inplace=False))
            in_channels = out_channels
        self.avgpool = nn.AvgPool2d(2)
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("linear1", nn.Linear(in_channels, classifier_width)),
                    ("norm1", nn.BatchNorm1d(classifier_width)),
                    ("relu1", nn.ReLU(inplace=False)),
                    ("linear2", nn.Linear(classifier_width, num_classes)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (N, 3, 32, 32) -> logits (N, num_classes); other sizes must leave 1x1 after ``avgpool``."""
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def widths_from_sparsity(sparsity: str | Sequence[float]) -> list[int]:
    """13 conv widths from 12 ratios; the 13th conv keeps its 512 channels."""
    ratios = resolve_sparsity(sparsity, NUM_CONVS - 1, "vgg16_bn_cifar")
    conv_channels = [entry for entry in VGG16_CFG if entry != "M"]
    widths = [
        kept_width(int(channels), ratio, f"vgg16_bn_cifar conv {index}")
        for index, (channels, ratio) in enumerate(zip(conv_channels, ratios))
    ]
    widths.append(int(conv_channels[-1]))
    return widths


def _check_widths(widths: Sequence[int]) -> list[int]:
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or len(widths) != NUM_CONVS:
        raise ConfigError(f"vgg16_bn_cifar: widths must be a list of {NUM_CONVS} ints, got {widths!r}")
    for index, width in enumerate(widths):
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ConfigError(f"vgg16_bn_cifar: widths[{index}] = {width!r} is not a positive int")
    return [int(width) for width in widths]


def sparsity_producers(model: nn.Module, ratios: Sequence[float]) -> dict[str, float]:
    """Producer module -> ratio (methods.md §1.4): the i-th conv takes ``ratios[i]`` (the last convs, beyond
    the string's 12 entries, take 0)."""
    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    return {name: (float(ratios[i]) if i < len(ratios) else 0.0) for i, name in enumerate(convs)}


# The HRank/CHIP VGG-16 was trained on the CIFAR-10 statistics.
PREPROCESSING = Preprocessing(normalization="cifar", input_size=(3, 32, 32))
SPARSITY = SparsitySemantics(lambda name: 12, sparsity_producers)


@register_model("vgg16_bn_cifar", num_classes=10, aliases=("vgg16",), preprocessing=PREPROCESSING,
                sparsity=SPARSITY)
def vgg16_bn_cifar(
    *,
    num_classes: int = 10,
    sparsity: str | Sequence[float] | None = None,
    widths: Sequence[int] | None = None,
    classifier_width: int = 512,
) -> nn.Module:
    """HRank/CHIP CIFAR VGG-16-BN. Options: sparsity= (12 ratios), widths= (13 convs), classifier_width=."""
    if sparsity is not None and widths is not None:
        raise ConfigError("vgg16_bn_cifar: give either sparsity= or widths=, not both")
    if sparsity is not None:
        widths = widths_from_sparsity(sparsity)
    elif widths is None:
        widths = [int(entry) for entry in VGG16_CFG if entry != "M"]
    return VGG16BNCifar(widths, num_classes=num_classes, classifier_width=classifier_width)
