"""MobileNetV2 (Sandler et al. 2018), torchvision's state_dict keys and parameter count (3,504,872 at 1.0).

``features.0`` = Conv-BN-ReLU6 stem (keys ``features.0.0``, ``features.0.1``); ``features.1..17`` are
:class:`InvertedResidual` blocks whose ``conv`` Sequential holds Conv-BN-ReLU6 blocks (1x1 expansion unless
the expansion ratio is 1, then the 3x3 depthwise) followed by the 1x1 projection conv and its BN;
``features.18`` = 1x1 Conv-BN-ReLU6 to ``last_channel``; ``classifier`` = Dropout(0.2), Linear (key
``classifier.1``). A residual addition is used where the stride is 1 and the block's input and output widths
match.
"""

from __future__ import annotations

import torch
from torch import nn

from pare.errors import ConfigError
from pare.models.registry import Preprocessing, register_model

# (expansion t, output channels c, repeats n, first stride s), from the paper's Table 2.
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to a multiple of ``divisor``, never going below 90% of it (torchvision's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def conv_bn_relu6(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Conv (no bias) - BN - ReLU6 with 'same' padding; (N, C_in, H, W) -> (N, C_out, H/stride, W/stride)."""
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=False),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1) - depthwise (3x3, stride) - project (1x1, linear); + x when stride 1 and widths match.

    Shapes: (N, in_channels, H, W) -> (N, out_channels, H/stride, W/stride).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(in_channels * expand_ratio)
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_relu6(in_channels, hidden, 1))
        layers.extend(
            [
                conv_bn_relu6(hidden, hidden, 3, stride=stride, groups=hidden),
                nn.Conv2d(hidden, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
            ]
        )
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2. Input (N, 3, H, W) (224x224 natively) -> logits (N, num_classes)."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not width_mult > 0:
            raise ConfigError(f"mobilenet_v2: width_mult must be a positive number, got {width_mult!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"mobilenet_v2: dropout must be in [0, 1), got {dropout!r}")
        in_channels = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [conv_bn_relu6(3, in_channels, 3, stride=2)]
        for expand_ratio, channels, repeats, first_stride in INVERTED_RESIDUAL_SETTING:
            out_channels = make_divisible(channels * width_mult)
            for index in range(repeats):
                stride = first_stride if index == 0 else 1
                layers.append(InvertedResidual(in_channels, out_channels, stride, expand_ratio))
                in_channels = out_channels
        layers.append(conv_bn_relu6(in_channels, self.last_channel, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        for module in self.modules():
            # torchvision's initialisation.
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (N, 3, H, W) -> logits (N, num_classes)."""
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@register_model("mobilenet_v2", num_classes=1000,
                preprocessing=Preprocessing("imagenet", (3, 224, 224), "bilinear"))
def mobilenet_v2(*, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> nn.Module:
    """MobileNetV2 (torchvision keys). Options: width_mult= (channel multiplier), dropout=."""
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, dropout=dropout)
