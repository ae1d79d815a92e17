"""ImageNet ResNet-18/34/50 with torchvision's state_dict keys and parameter counts.

Keys: ``conv1, bn1, layer1..4.{i}.conv1/bn1/conv2/bn2(/conv3/bn3), layer*.0.downsample.0/.1, fc``. ResNet-50
is v1.5 (stride on the 3x3 ``conv2``), as torchvision. One difference from torchvision that does not touch the
state_dict: each block has one ReLU module per use (``relu1``, ``relu2``, and ``relu3`` for bottlenecks; the
last one after the residual addition) instead of one shared ``relu``, so that a forward hook sees each
activation once.

Widths. ``widths=`` is a flat list: the stem width, then per block the output widths of its convs in order
(BasicBlock: ``conv1, conv2``; Bottleneck: ``conv1, conv2, conv3``); ``downsample.0`` outputs the block width.
``sparsity=`` (ResNet-50 only; CHIP ``models/resnet_imagenet.py::adapt_channel``, methods.md §1.4):

* ``sparsity[0]``: the stem (64);
* ``sparsity[1..3]``: the output widths of stages 1-3 (256/512/1024); stage 4 (2048) is never pruned;
* ``sparsity[4:]`` (16 entries): per bottleneck, the width of conv1 and conv2, applied to ``C // 4``.

Widths are ``int(C * (1 - p))``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pare.errors import ConfigError
from pare.models.registry import Preprocessing, SparsitySemantics, register_model
from pare.models.sparsity import kept_width, resolve_sparsity

STAGE_BLOCKS: dict[int, tuple[int, int, int, int]] = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}
BASE_PLANES: tuple[int, int, int, int] = (64, 128, 256, 512)
STEM_WIDTH = 64


class BasicBlock(nn.Module):
    """``relu2(bn2(conv2(relu1(bn1(conv1(x))))) + downsample(x))``.

    Shapes: x (N, C_in, H, W) -> (N, C_out, H / stride, W / stride).
    """

    def __init__(self, in_channels: int, widths: Sequence[int], stride: int, downsample: bool) -> None:
        super().__init__()
        mid, out = widths
        self.conv1 = nn.Conv2d(in_channels, mid, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(mid, out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.relu2 = nn.ReLU(inplace=False)
        self.downsample = _downsample(in_channels, out, stride) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    """v1.5 bottleneck (stride on conv2); x (N, C_in, H, W) -> (N, C_out, H/s, W/s)."""

    def __init__(self, in_channels: int, widths: Sequence[int], stride: int, downsample: bool) -> None:
        super().__init__()
        mid1, mid2, out = widths
        self.conv1 = nn.Conv2d(in_channels, mid1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid1)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(mid1, mid2, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid2)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv3 = nn.Conv2d(mid2, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu3 = nn.ReLU(inplace=False)
        self.downsample = _downsample(in_channels, out, stride) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
    )


class ImageNetResNet(nn.Module):
    """torchvision-compatible ResNet. Input (N, 3, H, W) (224x224 natively) -> logits (N, num_classes)."""

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 1000) -> None:
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ConfigError(f"ImageNet ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {depth}")
        bottleneck = depth >= 50
        convs_per_block = 3 if bottleneck else 2
        stage_blocks = STAGE_BLOCKS[depth]
        name = f"resnet{depth}"
        widths = _check_widths(widths, 1 + convs_per_block * sum(stage_blocks), name)
        block_class = Bottleneck if bottleneck else BasicBlock
        self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = widths[0]
        cursor = 1
        for stage, num_blocks in enumerate(stage_blocks):
            blocks: list[nn.Module] = []
            for position in range(num_blocks):
                stride = 2 if stage > 0 and position == 0 else 1
                block_widths = widths[cursor : cursor + convs_per_block]
                cursor += convs_per_block
                out_channels = block_widths[-1]
                # torchvision gives the first block of a stage a projection when the stride or width changes
                # (always for bottlenecks); later blocks are identity blocks, so their widths must match.
                has_downsample = position == 0 and (stride != 1 or bottleneck or in_channels != out_channels)
                if not has_downsample and in_channels != out_channels:
                    raise ConfigError(
                        f"{name}: widths give layer{stage + 1}.{position} input {in_channels} and output "
                        f"{out_channels} channels, but that block has an identity shortcut"
                    )
                blocks.append(block_class(in_channels, block_widths, stride, has_downsample))
                in_channels = out_channels
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            # torchvision's initialisation.
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (N, 3, H, W) -> logits (N, num_classes)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def default_widths(depth: int) -> list[int]:
    """Unpruned flat width list of ResNet-``depth``."""
    bottleneck = depth >= 50
    widths = [STEM_WIDTH]
    for planes, num_blocks in zip(BASE_PLANES, STAGE_BLOCKS[depth]):
        block = [planes, planes, 4 * planes] if bottleneck else [planes, planes]
        widths.extend(block * num_blocks)
    return widths


def resnet50_widths_from_sparsity(sparsity: str | Sequence[float]) -> list[int]:
    """ResNet-50 flat widths from a CHIP sparsity (4 + 16 entries; semantics in the module docstring)."""
    stage_blocks = STAGE_BLOCKS[50]
    ratios = resolve_sparsity(sparsity, 4 + sum(stage_blocks), "resnet50")
    widths = [kept_width(STEM_WIDTH, ratios[0], "resnet50 stem")]
    stage_output_ratios = (ratios[1], ratios[2], ratios[3], 0.0)
    block_index = 0
    for stage, (planes, num_blocks) in enumerate(zip(BASE_PLANES, stage_blocks)):
        stage_channels = 4 * planes
        out = kept_width(stage_channels, stage_output_ratios[stage], f"resnet50 stage {stage + 1} output")
        for _ in range(num_blocks):
            mid = kept_width(
                stage_channels // 4, ratios[4 + block_index], f"resnet50 block {block_index} mid"
            )
            widths.extend([mid, mid, out])
            block_index += 1
    return widths


def _check_widths(widths: Sequence[int], expected_len: int, name: str) -> list[int]:
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or len(widths) != expected_len:
        raise ConfigError(f"{name}: widths must be a list of {expected_len} ints, got {widths!r}")
    for index, width in enumerate(widths):
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ConfigError(f"{name}: widths[{index}] = {width!r} is not a positive int")
    return [int(width) for width in widths]


def sparsity_producers(model: nn.Module, ratios: Sequence[float]) -> dict[str, float]:
    """Producer module -> ratio for ResNet-50 (methods.md §1.4): the stem takes ``ratios[0]``, each stage's
    output convs (last conv of every block, downsample conv) ``ratios[1..3]`` (stage 4: 0), the two inner convs
    of the k-th block ``ratios[4 + k]``."""
    out = {"conv1": float(ratios[0])}
    stage_out = (ratios[1], ratios[2], ratios[3], 0.0)
    index = 0
    for stage, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
        for block_number, block in enumerate(layer):
            prefix = f"layer{stage + 1}.{block_number}"
            out[f"{prefix}.conv1"] = out[f"{prefix}.conv2"] = float(ratios[4 + index])
            out[f"{prefix}.conv3"] = float(stage_out[stage])
            if block.downsample is not None:
                out[f"{prefix}.downsample.0"] = float(stage_out[stage])
            index += 1
    return out


PREPROCESSING = Preprocessing(normalization="imagenet", input_size=(3, 224, 224), interpolation="bilinear")
SPARSITY = SparsitySemantics(lambda name: 20, sparsity_producers)


@register_model("resnet18", num_classes=1000, preprocessing=PREPROCESSING)
def resnet18(*, num_classes: int = 1000, widths: Sequence[int] | None = None) -> nn.Module:
    """ImageNet ResNet-18 (torchvision keys, 11,689,512 params). Option: widths= (flat list)."""
    return ImageNetResNet(18, default_widths(18) if widths is None else widths, num_classes)


@register_model("resnet34", num_classes=1000, preprocessing=PREPROCESSING)
def resnet34(*, num_classes: int = 1000, widths: Sequence[int] | None = None) -> nn.Module:
    """ImageNet ResNet-34 (torchvision keys, 21,797,672 params). Option: widths= (flat list)."""
    return ImageNetResNet(34, default_widths(34) if widths is None else widths, num_classes)


@register_model("resnet50", num_classes=1000, preprocessing=PREPROCESSING, sparsity=SPARSITY)
def resnet50(
    *,
    num_classes: int = 1000,
    sparsity: str | Sequence[float] | None = None,
    widths: Sequence[int] | None = None,
) -> nn.Module:
    """ImageNet ResNet-50 v1.5 (torchvision keys, 25,557,032 params). Options: sparsity= (CHIP), widths=."""
    if sparsity is not None and widths is not None:
        raise ConfigError("resnet50: give either sparsity= or widths=, not both")
    if sparsity is not None:
        widths = resnet50_widths_from_sparsity(sparsity)
    elif widths is None:
        widths = default_widths(50)
    return ImageNetResNet(50, widths, num_classes)
