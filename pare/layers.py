"""Small layers that pare's model zoo and engine share.

They are plain ``nn.Module`` leaves with explicit, serialisable constructor arguments, so a pruned model that uses
them stays an instance of its own class and can be rebuilt from a JSON spec.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ZeroPadShortcut(nn.Module):
    """Parameter-free "option A" residual shortcut of the CIFAR ResNets (He et al. 2016, akamaster, HRank, CHIP).

    ``y = F.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, pad_front, pad_back))``: subsample spatially, then append
    constant-zero channels before and after the real ones.

    Shapes: ``x`` (N, C, H, W) -> ``y`` (N, pad_front + C + pad_back, ceil(H / stride), ceil(W / stride)).

    The unpruned model has ``pad_front == pad_back == planes // 4``; after pruning the two pads differ, because the
    engine removes zero channels on each side independently. A negative pad crops channels, as ``F.pad`` does (the
    CHIP code builds such shortcuts when a pruned block output is narrower than its input).
    """

    def __init__(self, pad_front: int, pad_back: int, stride: int = 2) -> None:
        super().__init__()
        if stride < 1:
            raise ValueError(f"ZeroPadShortcut stride must be >= 1, got {stride}")
        self.pad_front = int(pad_front)
        self.pad_back = int(pad_back)
        self.stride = int(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back), "constant", 0.0)

    def extra_repr(self) -> str:
        return f"pad_front={self.pad_front}, pad_back={self.pad_back}, stride={self.stride}"
