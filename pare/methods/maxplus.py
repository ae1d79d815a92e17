"""Max-plus operators for filter selection (Zhang, Blusseau, Velasco-Forero, Bloch, Angulo; ISMM 2019,
arXiv:1903.08072); methods.md §3.

A max-plus (dilation) layer ``yⱼ = maxᵢ(xᵢ + wᵢⱼ)`` (:class:`MaxPlus`) after a linear layer lets each class
output use only its argmax filter. After training, the filters that are (almost) never the argmax are removed:

* rule A, activation counting (:func:`active_filters_counting`, official ``findActiveFilters``; default);
* rule B, weight threshold (:func:`active_filters_threshold`, official ``eval.py``), with a guarded variant.

:func:`prune_maxplus_inputs` removes the unselected filters through the engine (the producer's output channels,
its BatchNorm, everything coupled) and the matching rows of the max-plus weights; :func:`export_maxout` turns a
Linear → MaxPlus head into a Maxout head (per class, a max over its kept filters).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pare.errors import ConfigError, PruneError
from pare.graph import ChannelGraph, trace
from pare.methods.fold import channel_slice

__all__ = [
    "CountingResult",
    "MaxPlus",
    "MaxoutHead",
    "ThresholdResult",
    "active_filters_counting",
    "active_filters_threshold",
    "export_maxout",
    "mask_maxplus",
    "prune_maxplus_inputs",
    "replace_head_with_maxplus",
]


class MaxPlus(nn.Module):
    """Max-plus layer: input (N, in_features) -> (N, out_features), ``y[n, j] = max_i(x[n, i] + weight[i, j])``.

    ``weight`` has shape (in_features, out_features) (the official layout); there is no bias. The gradient
    reaches only the argmax entry of each output (a subgradient; ``max`` picks one index on ties).
    ``init``: "zeros" (Keras ``MaxPlusDense``) or "trunc_normal" (TF1 model, std 0.05).
    """

    def __init__(self, in_features: int, out_features: int, init: str = "zeros") -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ConfigError("MaxPlus needs in_features >= 1 and out_features >= 1")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.weight = nn.Parameter(torch.zeros(in_features, out_features))
        if init == "trunc_normal":
            nn.init.trunc_normal_(self.weight, std=0.05, a=-0.1, b=0.1)
        elif init != "zeros":
            raise ConfigError(f"unknown MaxPlus init '{init}'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, I) -> (N, J); materialises (N, I, J)."""
        return (x.unsqueeze(2) + self.weight.unsqueeze(0)).max(dim=1).values

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """(N, I) -> (N, J) int64: the filter index i achieving each output's max."""
        return (x.unsqueeze(2) + self.weight.unsqueeze(0)).argmax(dim=1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def replace_head_with_maxplus(model: nn.Module, head_name: str, init: str = "zeros") -> MaxPlus:
    """Replace the ``nn.Linear(C, K)`` at ``head_name`` by ``MaxPlus(C, K)``, in place; return the new layer.
    (The CNN generalisation of methods.md §3.5: ``GAP → MaxPlus(C, K)``; train or fine-tune afterwards.)"""
    old = model.get_submodule(head_name)
    if not isinstance(old, nn.Linear):
        raise ConfigError(f"'{head_name}' is a {type(old).__name__}, not nn.Linear")
    new = MaxPlus(old.in_features, old.out_features, init=init).to(old.weight.device, old.weight.dtype)
    _set_submodule(model, head_name, new)
    return new


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


@dataclass
class CountingResult:
    """Rule A output. ``kept``: sorted filter indices (union over classes). ``counts``: (J, I) int64, argmax
    counts aᵢ per class j. ``n_per_class``: (J,) counted samples per class. ``per_class``: the active filters
    of each class."""

    kept: np.ndarray
    counts: np.ndarray
    n_per_class: np.ndarray
    per_class: list[np.ndarray]


@torch.no_grad()
def active_filters_counting(
    model_features_fn: Callable[[torch.Tensor], torch.Tensor],
    maxplus_layer: MaxPlus,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    ths_rate: float = 0.0,
    only_correct: bool = True,
) -> CountingResult:
    """Rule A (official ``findActiveFilters``): for each class j, over its ``n_j`` counted samples, ``aᵢ`` =
    how often filter i is the argmax of output j; filter i is active for j iff ``aᵢ > int(ths_rate·n_j)``.

    ``model_features_fn(images)`` returns the max-plus input (N, I). Only output j is examined for samples of
    class j; with ``only_correct`` (default, as the official ``keepOnlyWellClassified``) only correctly
    classified samples are counted. With ``ths_rate = 0`` "used at least once" is active, and pruning to the
    union preserves every prediction on the counting set (ties aside; methods.md §3.5).
    """
    if ths_rate < 0:
        raise ConfigError(f"ths_rate must be >= 0, got {ths_rate}")
    n_in, n_out = maxplus_layer.in_features, maxplus_layer.out_features
    counts = np.zeros((n_out, n_in), dtype=np.int64)
    n_per_class = np.zeros(n_out, dtype=np.int64)
    for images, labels in loader:
        x = model_features_fn(images)
        y = maxplus_layer(x)
        arg = maxplus_layer.argmax(x)  # (N, J)
        labels = labels.to(arg.device)
        use = (y.argmax(dim=1) == labels) if only_correct else torch.ones_like(labels, dtype=torch.bool)
        lab = labels[use]
        winners = arg[use].gather(1, lab.view(-1, 1)).view(-1)  # argmax filter of each sample's own class
        np.add.at(counts, (lab.cpu().numpy(), winners.cpu().numpy()), 1)
        np.add.at(n_per_class, lab.cpu().numpy(), 1)
    per_class = [np.flatnonzero(counts[j] > int(ths_rate * n_per_class[j])) for j in range(n_out)]
    kept = np.unique(np.concatenate(per_class)) if per_class else np.zeros(0, dtype=np.int64)
    return CountingResult(kept.astype(np.int64), counts, n_per_class, per_class)


@dataclass
class ThresholdResult:
    """Rule B output: ``per_class`` kept filter indices per class and their union ``kept`` (sorted)."""

    kept: np.ndarray
    per_class: list[np.ndarray]


def active_filters_threshold(weights: torch.Tensor, tau: float = 0.6, guarded: bool = True) -> ThresholdResult:
    """Rule B: for class j keep ``{i : wᵢⱼ ≥ τ·maxᵢ wᵢⱼ}``; ``weights`` is the max-plus weight (I, J).

    The plain rule keeps nothing for a class whose largest weight is negative (τ·max > max). The guarded
    variant ([design], default) then uses the range-relative threshold ``{i : wᵢⱼ ≥ min + τ·(max − min)}``,
    which always contains the argmax, so every class keeps ≥ 1 filter; other classes are unchanged.
    """
    w = weights.detach().double().cpu().numpy()
    per_class = []
    for j in range(w.shape[1]):
        col = w[:, j]
        keep = np.flatnonzero(col >= tau * col.max())
        if guarded and keep.size == 0:
            keep = np.flatnonzero(col >= col.min() + tau * (col.max() - col.min()))
        per_class.append(keep.astype(np.int64))
    kept = np.unique(np.concatenate(per_class)).astype(np.int64)
    return ThresholdResult(kept, per_class)


def mask_maxplus(layer: MaxPlus, per_class: Sequence[Sequence[int]]) -> None:
    """In place: set ``wᵢⱼ = −inf`` for filters not kept for class j, so that class j takes the max over its
    own kept filters only (rule B's evaluation model). Inference only."""
    with torch.no_grad():
        mask = torch.ones_like(layer.weight, dtype=torch.bool)
        for j, idx in enumerate(per_class):
            mask[list(idx), j] = False
        layer.weight.masked_fill_(mask, float("-inf"))


def prune_maxplus_inputs(model: nn.Module, head_name: str, keep: Sequence[int],
                         example_inputs: torch.Tensor | tuple[torch.Tensor, ...], verify: bool = True) -> nn.Module:
    """A new model keeping only max-plus inputs ``keep`` of the :class:`MaxPlus` at ``head_name``.

    The engine treats a max-plus consumer as unknown, and its masked-zero check does not hold through a max
    (a zeroed input still competes in the max). So the head is swapped for a same-shaped ``nn.Linear`` proxy,
    the producer channels feeding it are removed through the engine (verified on the body), and the head is put
    back with the rows of the kept filters. ``model`` is not modified.
    """
    head = model.get_submodule(head_name)
    if not isinstance(head, MaxPlus):
        raise ConfigError(f"'{head_name}' is not a MaxPlus layer")
    keep_set = {int(i) for i in keep}
    if not keep_set or min(keep_set) < 0 or max(keep_set) >= head.in_features:
        raise ConfigError("keep must be a non-empty set of valid max-plus input indices")
    work = copy.deepcopy(model)
    proxy = nn.Linear(head.in_features, head.out_features, bias=False).to(head.weight.device, head.weight.dtype)
    _set_submodule(work, head_name, proxy)
    graph = trace(work, example_inputs)
    removals: dict[str, list[int]] = {}
    covered: set[int] = set()
    for g in graph.groups:
        for m in g.members:
            if m.module != head_name or m.role != "in":
                continue
            drop = []
            for i in range(g.size):
                cols = range(channel_slice(m, i).start, channel_slice(m, i).stop)
                covered.update(cols)
                if not any(c in keep_set for c in cols):
                    drop.append(i)
            if drop and not g.prunable:
                raise PruneError(f"group '{g.id}' feeding '{head_name}' is frozen ({g.reason})")
            if drop:
                removals[g.id] = drop
    if len(covered) != head.in_features:
        raise PruneError(f"the engine does not map every input of '{head_name}' to a channel group")
    pruned = graph.prune(removals, verify=verify) if removals else work
    kept_cols = sorted(c for c in range(head.in_features) if _col_kept(graph, head_name, c, removals))
    new_head = MaxPlus(len(kept_cols), head.out_features).to(head.weight.device, head.weight.dtype)
    with torch.no_grad():
        new_head.weight.copy_(head.weight[kept_cols])
    _set_submodule(pruned, head_name, new_head)
    return pruned


def _col_kept(graph: ChannelGraph, head_name: str, col: int, removals: dict[str, list[int]]) -> bool:
    for gid, idx in removals.items():
        for m in graph.group(gid).members:
            if m.module == head_name and m.role == "in":
                for i in idx:
                    s = channel_slice(m, i)
                    if s.start <= col < s.stop:
                        return False
    return True


class MaxoutHead(nn.Module):
    """Maxout head: input (N, D) -> logits (N, J), ``logit_j = max_{u ∈ U_j}(w_u·z + b_u)``.

    ``weight`` (U, D) and ``bias`` (U,) hold one row per (class, kept filter) pair (a filter kept for several
    classes is duplicated with that class's offset); ``index`` (J, S) and ``valid`` (J, S) list each class's
    units, padded to the longest class.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, index: torch.Tensor, valid: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        self.register_buffer("index", index)
        self.register_buffer("valid", valid)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z @ self.weight.t() + self.bias  # (N, U)
        units = h[:, self.index]  # (N, J, S)
        return units.masked_fill(~self.valid, float("-inf")).amax(dim=2)


def export_maxout(linear: nn.Linear, maxplus: MaxPlus, per_class: Sequence[Sequence[int]] | None = None
                  ) -> MaxoutHead:
    """Merge ``linear`` (D -> I) followed directly by ``maxplus`` (I -> J) into a :class:`MaxoutHead`.

    ``per_class``: the filters each class takes its max over (rule B); None: all I filters for every class
    (a rule-A pruned head). ``wᵢⱼ = −inf`` entries are skipped. Equal logits to ``maxplus(linear(z))``.
    """
    if linear.out_features != maxplus.in_features:
        raise ConfigError("linear.out_features must equal maxplus.in_features")
    w1 = linear.weight.detach()
    b1 = linear.bias.detach() if linear.bias is not None else torch.zeros(w1.shape[0], dtype=w1.dtype)
    wmp = maxplus.weight.detach()
    rows, biases, lists = [], [], []
    for j in range(maxplus.out_features):
        idx = range(maxplus.in_features) if per_class is None else per_class[j]
        units = []
        for i in idx:
            if torch.isinf(wmp[i, j]):
                continue
            units.append(len(rows))
            rows.append(w1[i])
            biases.append(b1[i] + wmp[i, j])
        if not units:
            raise ConfigError(f"class {j} has no kept filter")
        lists.append(units)
    width = max(len(u) for u in lists)
    index = torch.zeros(len(lists), width, dtype=torch.int64)
    valid = torch.zeros(len(lists), width, dtype=torch.bool)
    for j, units in enumerate(lists):
        index[j, : len(units)] = torch.tensor(units)
        valid[j, : len(units)] = True
    return MaxoutHead(torch.stack(rows).clone(), torch.stack(biases).clone(), index, valid)
