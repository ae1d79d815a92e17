"""CIFAR ResNets (He et al. 2016): ResNet-20/32/44/56/110, option A (``resnetN``) and option B (``resnetNb``).

Option A is the parameter-free zero-padding shortcut used by akamaster/pytorch_resnet_cifar10, HRank and CHIP.
The state_dict keys are exactly akamaster's (``conv1, bn1, layer{1,2,3}.{i}.conv1/bn1/conv2/bn2, linear``), so
its pretrained checkpoints load directly (see :func:`pare.io.load_checkpoint`).

Widths. A network of depth ``6n + 2`` has ``B = 3n`` BasicBlocks. Its widths are the flat list ``[stem, mid_1,
out_1, mid_2, out_2, ..., mid_B, out_B]`` (1 + 2B ints): the output channels of every conv in module order
(``conv1`` of the stem, then ``conv1`` and ``conv2`` of each block). Unpruned: 16 / 32 / 64 per stage. Pass
``widths=`` to rebuild a pruned model, or ``sparsity=`` for the CHIP/HRank semantics (methods.md §1.4):

* ``sparsity[0]``: the stem conv;
* ``sparsity[1]``, ``sparsity[2]``: the block output widths of stages 1 and 2 (stage-3 outputs are never
  pruned);
* ``sparsity[3:]`` (``B`` entries): the mid width (conv1 output) of each block, in block order.

Widths are ``int(C * (1 - p))``. A block whose stride is not 1 or whose input and output widths differ gets a
shortcut; for option A that is ``ZeroPadShortcut(pad_front, pad_back, stride)`` with ``pad_front = (out - in)
// 2`` and ``pad_back = (out - in) - pad_front`` (negative pads crop, as in CHIP), unless explicit
``shortcut_pads`` are given (the pruning engine may leave asymmetric pads).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pare.errors import ConfigError
from pare.layers import ZeroPadShortcut
from pare.models.registry import Preprocessing, SparsitySemantics, register_model
from pare.models.sparsity import kept_width, resolve_sparsity

DEPTHS: tuple[int, ...] = (20, 32, 44, 56, 110)
STAGE_WIDTHS: tuple[int, int, int] = (16, 32, 64)
STEM_WIDTH = 16


class BasicBlock(nn.Module):
    """``relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))``.

    Shapes: ``x`` (N, in_channels, H, W) -> (N, out_channels, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        stride: int,
        option: str,
        shortcut_pads: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(mid_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=False)
        self.shortcut: nn.Module
        needs_shortcut = stride != 1 or in_channels != out_channels
        if option == "A":
            if shortcut_pads is not None:
                pad_front, pad_back = shortcut_pads
            else:
                pad_front = (out_channels - in_channels) // 2
                pad_back = (out_channels - in_channels) - pad_front
            if needs_shortcut or (pad_front, pad_back) != (0, 0):
                self.shortcut = ZeroPadShortcut(pad_front, pad_back, stride)
            else:
                self.shortcut = nn.Identity()
        elif needs_shortcut:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Add before relu2 so that hooks on relu2 see the block output (CHIP scores conv2 there).
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6n + 2``. Input (N, 3, 32, 32) -> logits (N, num_classes).

    ``widths`` is the flat list described in the module docstring; ``shortcut_pads`` (option A only) gives,
    per block, ``None`` (use the default pads) or ``(pad_front, pad_back)``.
    """

    def __init__(
        self,
        depth: int,
        widths: Sequence[int],
        num_classes: int = 10,
        option: str = "A",
        shortcut_pads: Sequence[Sequence[int] | None] | None = None,
    ) -> None:
        super().__init__()
        blocks_per_stage = _blocks_per_stage(depth)
        num_blocks = 3 * blocks_per_stage
        widths = _check_widths(widths, 1 + 2 * num_blocks, f"resnet{depth}")
        pads = _check_pads(shortcut_pads, num_blocks, option, widths, blocks_per_stage, depth)
        self.depth = depth
        self.option = option
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=False)
        in_channels = widths[0]
        block_index = 0
        for stage in range(3):
            blocks: list[nn.Module] = []
            for position in range(blocks_per_stage):
                stride = 2 if stage > 0 and position == 0 else 1
                mid, out = widths[1 + 2 * block_index], widths[2 + 2 * block_index]
                blocks.append(BasicBlock(in_channels, mid, out, stride, option, pads[block_index]))
                in_channels = out
                block_index += 1
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            # akamaster's _weights_init: Kaiming-normal (fan_in) for conv and linear weights.
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (N, 3, H, W) -> logits (N, num_classes)."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


def _blocks_per_stage(depth: int) -> int:
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ConfigError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
    return (depth - 2) // 6


def default_widths(depth: int) -> list[int]:
    """Unpruned flat width list ``[16, 16, 16, ..., 64, 64]`` (1 + 2B ints)."""
    n = _blocks_per_stage(depth)
    widths = [STEM_WIDTH]
    for stage_width in STAGE_WIDTHS:
        widths.extend([stage_width, stage_width] * n)
    return widths


def widths_from_sparsity(depth: int, sparsity: str | Sequence[float]) -> list[int]:
    """Flat width list from a CHIP/HRank sparsity (3 + B entries; semantics in the module docstring)."""
    n = _blocks_per_stage(depth)
    name = f"resnet{depth}"
    ratios = resolve_sparsity(sparsity, 3 + 3 * n, name)
    widths = [kept_width(STEM_WIDTH, ratios[0], f"{name} stem")]
    # Stage-3 output ratio is fixed at 0: the official adapt_channel never prunes it.
    stage_output_ratios = (ratios[1], ratios[2], 0.0)
    block_index = 0
    for stage, stage_width in enumerate(STAGE_WIDTHS):
        out = kept_width(stage_width, stage_output_ratios[stage], f"{name} stage {stage + 1} output")
        for _ in range(n):
            mid = kept_width(stage_width, ratios[3 + block_index], f"{name} block {block_index} mid")
            widths.extend([mid, out])
            block_index += 1
    return widths


def _check_widths(widths: Sequence[int], expected_len: int, name: str) -> list[int]:
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
        raise ConfigError(f"{name}: widths must be a list of ints, got {type(widths).__name__}")
    if len(widths) != expected_len:
        raise ConfigError(f"{name}: widths has {len(widths)} entries, expected {expected_len}")
    checked: list[int] = []
    for index, width in enumerate(widths):
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ConfigError(f"{name}: widths[{index}] = {width!r} is not a positive int")
        checked.append(int(width))
    return checked


def _check_pads(
    shortcut_pads: Sequence[Sequence[int] | None] | None,
    num_blocks: int,
    option: str,
    widths: list[int],
    blocks_per_stage: int,
    depth: int,
) -> list[tuple[int, int] | None]:
    if shortcut_pads is None:
        return [None] * num_blocks
    name = f"resnet{depth}{'b' if option == 'B' else ''}"
    if option != "A":
        raise ConfigError(f"{name}: shortcut_pads applies only to option-A (zero-pad) shortcuts")
    if len(shortcut_pads) != num_blocks:
        raise ConfigError(f"{name}: shortcut_pads has {len(shortcut_pads)} entries, expected {num_blocks}")
    pads: list[tuple[int, int] | None] = []
    in_channels = widths[0]
    for index, pad in enumerate(shortcut_pads):
        out_channels = widths[2 + 2 * index]
        if pad is None:
            pads.append(None)
        else:
            if len(pad) != 2 or any(isinstance(p, bool) or not isinstance(p, int) for p in pad):
                raise ConfigError(f"{name}: shortcut_pads[{index}] = {pad!r} is not [pad_front, pad_back]")
            if in_channels + pad[0] + pad[1] != out_channels:
                raise ConfigError(
                    f"{name}: shortcut_pads[{index}] = {list(pad)} maps {in_channels} channels to "
                    f"{in_channels + pad[0] + pad[1]}, but the block outputs {out_channels}"
                )
            pads.append((int(pad[0]), int(pad[1])))
        in_channels = out_channels
    return pads


def _build(
    depth: int,
    option: str,
    num_classes: int,
    sparsity: str | Sequence[float] | None,
    widths: Sequence[int] | None,
    shortcut_pads: Sequence[Sequence[int] | None] | None,
) -> CifarResNet:
    if sparsity is not None and widths is not None:
        raise ConfigError(f"resnet{depth}: give either sparsity= or widths=, not both")
    if sparsity is not None:
        widths = widths_from_sparsity(depth, sparsity)
    elif widths is None:
        widths = default_widths(depth)
    return CifarResNet(depth, widths, num_classes=num_classes, option=option, shortcut_pads=shortcut_pads)


def _register(depth: int, option: str) -> None:
    suffix = "" if option == "A" else "b"
    kind = (
        "option A (zero-pad shortcut, akamaster keys)"
        if option == "A"
        else "option B (1x1 conv + BN shortcut)"
    )

    def factory(
        *,
        num_classes: int = 10,
        sparsity: str | Sequence[float] | None = None,
        widths: Sequence[int] | None = None,
        shortcut_pads: Sequence[Sequence[int] | None] | None = None,
    ) -> nn.Module:
        return _build(depth, option, num_classes, sparsity, widths, shortcut_pads)

    factory.__name__ = f"resnet{depth}{suffix}"
    factory.__doc__ = (
        f"CIFAR ResNet-{depth}, {kind}. Options: sparsity= (CHIP/HRank string), widths= (flat list "
        f"[stem, mid_1, out_1, ...]), shortcut_pads= (option A)."
    )
    # The CHIP/HRank configurations are published for the option-A models only.
    register_model(factory.__name__, num_classes=10, preprocessing=PREPROCESSING,
                   sparsity=SPARSITY if option == "A" else None)(factory)


def sparsity_length(name: str) -> int:
    """Entries of a sparsity string for ``resnet<depth>``: stem, stage-1/2 outputs, one per block (§1.4)."""
    depth = int(name[len("resnet"):])
    return 3 + 3 * ((depth - 2) // 6)


def sparsity_producers(model: nn.Module, ratios: Sequence[float]) -> dict[str, float]:
    """Producer module -> ratio (methods.md §1.4): the stem takes ``ratios[0]``, every block's output conv (and
    option-B shortcut conv) its stage's ``ratios[1]``/``ratios[2]`` (stage 3: 0), each block's first conv
    ``ratios[3 + block index]``."""
    out = {"conv1": float(ratios[0])}
    stage_out = (ratios[1], ratios[2], 0.0)
    index = 0
    for stage, layer in enumerate((model.layer1, model.layer2, model.layer3)):
        for block_number, block in enumerate(layer):
            prefix = f"layer{stage + 1}.{block_number}"
            out[f"{prefix}.conv1"] = float(ratios[3 + index])
            out[f"{prefix}.conv2"] = float(stage_out[stage])
            if isinstance(block.shortcut, nn.Sequential):
                out[f"{prefix}.shortcut.0"] = float(stage_out[stage])
            index += 1
    return out


# akamaster's pretrained CIFAR ResNets were trained on torchvision's ImageNet statistics.
PREPROCESSING = Preprocessing(normalization="imagenet", input_size=(3, 32, 32))
SPARSITY = SparsitySemantics(sparsity_length, sparsity_producers)


for _depth in DEPTHS:
    _register(_depth, "A")
for _depth in DEPTHS:
    _register(_depth, "B")
