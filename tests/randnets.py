"""Random CNN architectures for property-based tests of the engine.

A net is a list of block specs; :class:`RandomNet` interprets it. Every block keeps the batch dimension and ends
with a known channel count, so any sequence of blocks is a valid model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from pare.layers import ZeroPadShortcut

BLOCKS = ("conv", "residual", "concat", "concat_self", "split", "depthwise", "grouped", "groupnorm", "se",
          "narrow", "pad_shortcut_fn", "pool")


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias), nn.BatchNorm2d(cout), nn.ReLU()
    )


class _Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if shortcut == "pad" or (shortcut == "identity" and (stride != 1 or cin != cout) and cout >= cin):
            front = (cout - cin) // 2
            self.shortcut: nn.Module = ZeroPadShortcut(front, cout - cin - front, stride)
        elif shortcut == "identity" and stride == 1 and cin == cout:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(self.conv1(x))) + self.shortcut(x))


class _PadShortcutFn(nn.Module):
    """Option-A shortcut written with F.pad inside the forward (the akamaster LambdaLayer style)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = _conv_bn(cin, cout, 3, 2)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.pad = (cout - cin) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)
        return torch.relu(self.conv2(self.conv(x)) + short)


class _Concat(nn.Module):
    def __init__(self, cin: int, widths: list[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(_conv_bn(cin, w, 1 + 2 * (i % 2)) for i, w in enumerate(widths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x] + [b(x) for b in self.branches], dim=1)


class _ConcatSelf(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = _conv_bn(cin, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.cat([y, y], 1)


class _Split(nn.Module):
    def __init__(self, cin: int, parts: int, use_chunk: bool) -> None:
        super().__init__()
        self.parts, self.use_chunk = parts, use_chunk
        self.convs = nn.ModuleList(_conv_bn(cin // parts, 4 + i, 3) for i in range(parts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = x.chunk(self.parts, 1) if self.use_chunk else torch.split(x, x.shape[1] // self.parts, dim=1)
        return torch.cat([c(pieces[i]) for i, c in enumerate(self.convs)], 1)


class _SE(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, max(2, c // 4), 1)
        self.fc2 = nn.Conv2d(max(2, c // 4), c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * s


class _Narrow(nn.Module):
    def __init__(self, cin: int, start: int, length: int) -> None:
        super().__init__()
        self.start, self.length = start, length
        self.conv = _conv_bn(length, 6, 1)
        self.other = _conv_bn(cin, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x[:, self.start : self.start + self.length]), self.other(x)], 1)


class RandomNet(nn.Module):
    """Stem conv, then the blocks of ``spec``, then a head (``gap``, ``flatten`` or ``view``)."""

    def __init__(self, spec: list[tuple[str, int]], head: str, in_ch: int = 3, size: int = 8) -> None:
        super().__init__()
        self.stem = _conv_bn(in_ch, 8, 3)
        c, s = 8, size
        blocks: list[nn.Module] = []
        for kind, param in spec:
            if kind == "conv":
                blocks.append(_conv_bn(c, 4 + param, 3, bias=bool(param % 2)))
                c = 4 + param
            elif kind == "residual":
                shortcut = ("identity", "pad", "conv")[param % 3]
                stride = 2 if (param % 2 and s >= 4) else 1
                cout = c + 4 * (param % 3) if shortcut != "conv" else 4 + param
                if shortcut == "identity" and stride == 1:
                    cout = c
                blocks.append(_Residual(c, cout, stride, shortcut))
                c, s = cout, (s + 1) // 2 if stride == 2 else s
            elif kind == "concat":
                widths = [3 + param % 4, 2 + param % 3][: 1 + param % 2]
                blocks.append(_Concat(c, widths))
                c += sum(widths)
            elif kind == "concat_self":
                blocks.append(_ConcatSelf(c, 3 + param % 5))
                c = 2 * (3 + param % 5)
            elif kind == "split":
                parts = 2 + param % 2
                if c % parts:
                    blocks.append(_conv_bn(c, parts * 4, 1))
                    c = parts * 4
                blocks.append(_Split(c, parts, bool(param % 2)))
                c = sum(4 + i for i in range(parts))
            elif kind == "depthwise":
                blocks.append(_conv_bn(c, c, 3, groups=c))
            elif kind == "grouped":
                if c % 2:
                    blocks.append(_conv_bn(c, c + 1, 1))
                    c += 1
                blocks.append(_conv_bn(c, c, 3, groups=2))
            elif kind == "groupnorm":
                g = 2 + param % 2
                blocks.append(nn.Sequential(nn.Conv2d(c, 4 * g, 3, 1, 1), nn.GroupNorm(g, 4 * g), nn.SiLU()))
                c = 4 * g
            elif kind == "se":
                blocks.append(_SE(c))
            elif kind == "narrow":
                start = param % max(1, c - 2)
                blocks.append(_Narrow(c, start, min(c - start, 2 + param % 3)))
                c = 11
            elif kind == "pad_shortcut_fn" and s >= 4:
                cout = c + 2 * (1 + param % 3)
                blocks.append(_PadShortcutFn(c, cout))
                c, s = cout, (s + 1) // 2
            elif kind == "pool" and s >= 4:
                blocks.append(nn.MaxPool2d(2))
                s //= 2
        self.blocks = nn.Sequential(*blocks)
        self.head_kind = head
        self.spatial = s
        features = c if head == "gap" else c * s * s
        self.fc = nn.Linear(features, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        if self.head_kind == "gap":
            x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        elif self.head_kind == "flatten":
            x = torch.flatten(x, 1)
        else:
            x = x.view(x.size(0), -1)
        return self.fc(x)


def randomize_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Give every norm layer non-trivial statistics and affine parameters, so masking errors would show."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen, dtype=m.weight.dtype) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen, dtype=m.bias.dtype) - 0.5)
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen, dtype=m.weight.dtype) - 0.5)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=m.weight.dtype) + 0.5)


block_specs = st.lists(st.tuples(st.sampled_from(BLOCKS), st.integers(0, 11)), min_size=1, max_size=6)
heads = st.sampled_from(["gap", "flatten", "view"])


def random_removals(graph: Any, rng: Any, max_fraction: float) -> dict[str, list[int]]:
    """A random removal for each prunable group: up to ``max_fraction`` of it, in whole blocks, never all."""
    removals: dict[str, list[int]] = {}
    for g in graph.prunable_groups:
        units = g.size // g.block
        if units < 2:
            continue
        n = int(rng.integers(0, max(1, int(units * max_fraction)) + 1))
        n = min(n, units - 1)
        chosen = rng.choice(units, size=n, replace=False)
        removals[g.id] = sorted(int(u) * g.block + k for u in chosen for k in range(g.block))
    return removals
