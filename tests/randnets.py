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


# ---------------------------------------------------------------------------------------------------------------
# Random operator graphs for the property suite (issue #12): every supported operator, composed at random.
# ---------------------------------------------------------------------------------------------------------------

OPS = ("conv", "conv_sigmoid", "conv_elu1", "conv_hardsigmoid", "cat_gn", "grouped", "depthwise", "shuffle",
       "scale", "shift", "residual", "se", "split", "slice", "pad", "maxpool", "avgpool", "dropout", "fdropout",
       "spread", "gate", "instnorm", "prelu")


class _Op(nn.Module):
    """One operator of a random graph: ``forward(x)`` maps C_in to ``self.c`` channels at the same spatial size."""

    def __init__(self, kind: str, c: int, p: int) -> None:
        super().__init__()
        self.kind, self.p = kind, p
        self.c = c
        if kind.startswith("conv"):
            self.c = 2 + p % 7
            self.conv = nn.Conv2d(c, self.c, 1 + 2 * (p % 2), padding=p % 2, bias=bool(p % 3))
            self.bn = nn.BatchNorm2d(self.c)
        elif kind == "cat_gn":
            w1, w2 = 1 + p % 5, 2 + p % 3
            total = c + w1 + w2
            groups = [g for g in (2, 3, 4, 5, 6) if total % g == 0] or [1]
            self.a, self.b = nn.Conv2d(c, w1, 1), nn.Conv2d(c, w2, 1)
            self.gn = nn.GroupNorm(groups[p % len(groups)], total)
            self.c = total
        elif kind in ("grouped", "shuffle", "split"):
            self.pre = nn.Conv2d(c, 2 * (1 + c // 2), 1)
            self.c = 2 * (1 + c // 2)
            if kind == "grouped":
                self.conv = nn.Conv2d(self.c, self.c, 3, padding=1, groups=2)
            elif kind == "split":
                self.left, self.right = nn.Conv2d(self.c // 2, 3, 1), nn.Conv2d(self.c // 2, 2 + p % 3, 3, padding=1)
                self.c = 5 + p % 3
        elif kind == "depthwise":
            self.conv = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=bool(p % 2))
        elif kind in ("scale", "shift"):
            self.param = nn.Parameter(torch.rand(c) + 0.5)
        elif kind == "residual":
            self.conv1, self.conv2 = nn.Conv2d(c, 3 + p % 4, 3, padding=1), nn.Conv2d(3 + p % 4, c, 1)
        elif kind in ("se", "gate"):
            self.fc = nn.Conv2d(c, c, 1)
        elif kind == "slice":
            self.start = p % c
            self.conv = nn.Conv2d(c - self.start, 2, 1)
            self.c = c + 2
        elif kind == "pad":
            self.c = c + 3
        elif kind == "dropout":
            self.drop = nn.Dropout(0.3)
        elif kind == "instnorm":
            self.norm = nn.InstanceNorm2d(c, affine=bool(p % 2))
        elif kind == "prelu":
            self.act = nn.PReLU(c if p % 2 else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kind
        if k.startswith("conv"):
            y = self.bn(self.conv(x))
            if k == "conv_sigmoid":
                return torch.sigmoid(y)
            if k == "conv_elu1":
                return F.elu(y) + 1
            return F.hardsigmoid(y) if k == "conv_hardsigmoid" else F.relu(y)
        if k == "cat_gn":
            return self.gn(torch.cat([x, self.a(x), self.b(x)], 1))
        if k == "grouped":
            return self.conv(self.pre(x))
        if k == "shuffle":
            y = self.pre(x)
            n, c, h, w = y.shape
            return y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        if k == "split":
            a, b = self.pre(x).chunk(2, 1)
            return torch.cat([self.left(a), self.right(b)], 1)
        if k == "depthwise":
            return self.conv(x)
        if k == "scale":
            return x * self.param.view(1, -1, 1, 1)
        if k == "shift":
            return x + self.param[None, :, None, None]
        if k == "residual":
            return x + self.conv2(F.relu(self.conv1(x)))
        if k == "se":
            return x * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(x, 1)))
        if k == "gate":
            return x * torch.sigmoid(self.fc(x))
        if k == "slice":
            return torch.cat([x, self.conv(x[:, self.start :])], 1)
        if k == "pad":
            return F.pad(x, (0, 0, 0, 0, 1, 2))
        if k == "maxpool":
            return F.max_pool2d(x, 3, 1, 1)
        if k == "avgpool":
            return F.avg_pool2d(x, 3, 1, 1)
        if k == "dropout":
            return self.drop(x)
        if k == "fdropout":
            return F.dropout(x, 0.3, self.training)
        if k == "spread":
            return x + x.mean(1, keepdim=True)
        if k == "instnorm":
            return self.norm(x)
        return self.act(x)


class OpGraph(nn.Module):
    """A stem conv, random operators in sequence, then a 1x1 conv and a global-average-pool linear head."""

    def __init__(self, spec: list[tuple[str, int]]) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        ops: list[_Op] = []
        c = 4
        for kind, p in spec:
            ops.append(_Op(kind, c, p))
            c = ops[-1].c
        self.ops = nn.Sequential(*ops)
        self.last = nn.Conv2d(c, 3, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.last(self.ops(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def random_spec(rng: torch.Generator) -> list[tuple[str, int]]:
    n = 1 + int(torch.randint(0, 5, (1,), generator=rng))
    return [(OPS[int(torch.randint(0, len(OPS), (1,), generator=rng))], int(torch.randint(0, 12, (1,), generator=rng)))
            for _ in range(n)]


class OpGraphs(nn.Module):
    """Several independent random graphs side by side on the same input, returning one output each: one trace,
    surgery and verification serve them all (the per-call overhead dominates for graphs this small)."""

    def __init__(self, specs: list[list[tuple[str, int]]]) -> None:
        super().__init__()
        self.graphs = nn.ModuleList(OpGraph(spec) for spec in specs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(g(x) for g in self.graphs)


def random_opgraphs(seed: int, count: int) -> tuple[OpGraphs, torch.Tensor]:
    """``count`` float64 random graphs of 1-5 operators each, with non-trivial norm statistics, and an input of
    shape (2, 3, 4, 4). The same seed gives the same graphs."""
    rng = torch.Generator().manual_seed(seed)
    specs = [random_spec(rng) for _ in range(count)]
    torch.manual_seed(seed)
    model = OpGraphs(specs).double()
    randomize_norms(model, rng)
    return model, torch.randn(2, 3, 4, 4, generator=rng, dtype=torch.float64)


def snapshot(model: nn.Module, x: Any) -> tuple[dict[str, torch.Tensor], Any, dict[str, bool]]:
    """State dict, eval-mode output and every module's training flag, to show nothing changed. The output is taken
    in eval mode (flags restored after), since a train-mode forward would itself update BatchNorm statistics."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    model.eval()
    with torch.no_grad():
        out = model(x)
    for n, m in model.named_modules():
        m.training = modes[n]
    return state, out, modes


def assert_untouched(model: nn.Module, x: Any, before: tuple[dict[str, torch.Tensor], Any, dict[str, bool]]) -> None:
    """The model has the state dict, output and modes it had when ``before`` was taken (bit for bit)."""
    state, out, modes = snapshot(model, x)
    assert state.keys() == before[0].keys(), "state_dict keys changed"
    changed = [k for k in state if not torch.equal(state[k], before[0][k])]
    assert not changed, f"state_dict entries changed: {changed[:5]}"
    outs, olds = (out, before[1]) if isinstance(out, tuple) else ((out,), (before[1],))
    assert all(torch.equal(a, b) for a, b in zip(outs, olds, strict=True)), "output changed"
    assert modes == before[2], "train/eval flags changed"
