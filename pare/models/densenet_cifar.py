"""A small DenseNet for CIFAR (Huang et al. 2017, the basic non-bottleneck variant) that runs fast on a CPU.

``conv1`` (3x3, 3 -> 2 * growth) then three dense blocks ``block1..3`` separated by transitions ``trans1``,
``trans2``, then ``norm`` - ``relu`` - ``avgpool`` - ``linear``. A dense layer is BN-ReLU-conv3x3 producing
``growth_rate`` channels that are concatenated (``torch.cat``) to its input; a transition is BN-ReLU-conv1x1
(``int(C * compression)`` channels) followed by 2x2 average pooling. The concatenations make every dense
layer's input a union of earlier outputs: a useful test case for channel-dependency tracing.
"""

from __future__ import annotations

import torch
from torch import nn

from pare.errors import ConfigError
from pare.models.registry import Preprocessing, register_model


class DenseLayer(nn.Module):
    """(N, C, H, W) -> (N, C + growth_rate, H, W): ``cat([x, conv(relu(norm(x)))], dim=1)``."""

    def __init__(self, in_channels: int, growth_rate: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=False)
        self.conv = nn.Conv2d(in_channels, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(self.relu(self.norm(x)))], dim=1)


class Transition(nn.Sequential):
    """(N, C, H, W) -> (N, C_out, H/2, W/2): BN - ReLU - conv1x1 - AvgPool2d(2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=False)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2)


class DenseNetCifar(nn.Module):
    """Input (N, 3, 32, 32) -> logits (N, num_classes)."""

    def __init__(
        self,
        num_classes: int = 10,
        growth_rate: int = 12,
        layers_per_block: int = 4,
        compression: float = 0.5,
    ) -> None:
        super().__init__()
        for key, value in (("growth_rate", growth_rate), ("layers_per_block", layers_per_block)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"densenet_cifar: {key} must be a positive int, got {value!r}")
        if not 0.0 < compression <= 1.0:
            raise ConfigError(f"densenet_cifar: compression must be in (0, 1], got {compression!r}")
        channels = 2 * growth_rate
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        for block_index in range(3):
            layers = []
            for _ in range(layers_per_block):
                layers.append(DenseLayer(channels, growth_rate))
                channels += growth_rate
            self.add_module(f"block{block_index + 1}", nn.Sequential(*layers))
            if block_index < 2:
                out_channels = max(1, int(channels * compression))
                self.add_module(f"trans{block_index + 1}", Transition(channels, out_channels))
                channels = out_channels
        self.norm = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (N, 3, H, W) -> logits (N, num_classes)."""
        x = self.conv1(x)
        x = self.trans1(self.block1(x))
        x = self.trans2(self.block2(x))
        x = self.relu(self.norm(self.block3(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


@register_model("densenet_cifar", num_classes=10, preprocessing=Preprocessing("cifar", (3, 32, 32)))
def densenet_cifar(
    *, num_classes: int = 10, growth_rate: int = 12, layers_per_block: int = 4, compression: float = 0.5
) -> nn.Module:
    """Small CIFAR DenseNet (concatenating BN-ReLU-conv layers).

    Options: growth_rate=, layers_per_block= (per dense block), compression= (transition width ratio).
    """
    return DenseNetCifar(num_classes, growth_rate, layers_per_block, compression)
