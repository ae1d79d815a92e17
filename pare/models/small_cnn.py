"""A tiny CNN for 8x8 scikit-learn digits and 28x28 MNIST: the demo model.

``conv1-bn1-relu1`` (stem), one residual pair ``conv2-bn2-relu2``, ``conv3-bn3`` whose output is added to the
stem output before ``relu3``, then ``conv4-bn4-relu4`` (stride 2, ``2 * width`` channels), ``avgpool``,
``linear``.
"""

from __future__ import annotations

import torch
from torch import nn

from pare.errors import ConfigError
from pare.models.registry import Preprocessing, register_model


class SmallCNN(nn.Module):
    """Input (N, in_channels, H, W), e.g. (N, 1, 8, 8) or (N, 1, 28, 28) -> logits (N, num_classes)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        for key, value in (("in_channels", in_channels), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"small_cnn: {key} must be a positive int, got {value!r}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=False)
        self.conv4 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(2 * width)
        self.relu4 = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (N, in_channels, H, W) -> logits (N, num_classes)."""
        stem = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(self.relu2(self.bn2(self.conv2(stem)))))
        # Residual sum: conv1 and conv3 outputs form one channel dependency group.
        out = self.relu3(out + stem)
        out = self.relu4(self.bn4(self.conv4(out)))
        return self.linear(torch.flatten(self.avgpool(out), 1))


# Digits and MNIST: one channel, any size (8x8 digits, 28x28 MNIST).
@register_model("small_cnn", num_classes=10, preprocessing=Preprocessing("mnist"))
def small_cnn(*, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> nn.Module:
    """Tiny residual CNN for digits / MNIST. Options: in_channels=, width= (channels of the first stage)."""
    return SmallCNN(in_channels=in_channels, num_classes=num_classes, width=width)
