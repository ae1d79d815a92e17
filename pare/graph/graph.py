"""``pare.trace``: the channel graph of a model, and physical pruning through it."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from pare.errors import PruneError
from pare.graph import rules
from pare.graph.groups import Group, group_name, index_uses, members_of
from pare.graph.layout import AtomClass, layout_size
from pare.graph.reference import fold_constants
from pare.graph.rules import Kept
from pare.graph.trace import TensorMeta, as_input_tuple, propagate, symbolic_trace
from pare.graph.verify import verify_equivalence


class ChannelGraph:
    """The coupled channel groups of a model, traced on example inputs.

    Build it with :func:`pare.trace`. ``groups`` lists every group (prunable or not) in topological order;
    :meth:`prune` removes channels and returns a new, smaller model.
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> None:
        self.model = model
        self.example_inputs = as_input_tuple(example_inputs)
        self.gm, self.opaque_modules = symbolic_trace(model)
        meta = propagate(self.gm, self.example_inputs)
        self.ctx = rules.Context(self.gm, meta)
        self._analyze()
        for use in self.ctx.uses:
            # A consumer that reads part of a space (a split piece, a narrow) must see whole groups, so that
            # every group lists all its members and no removal can empty a consumer's input.
            self.ctx.part.keep_whole(use.layout)
        classes = self.ctx.part.solve()
        self._classes: dict[str, AtomClass] = {}
        self.groups: list[Group] = self._make_groups(classes)
        self._by_id = {g.id: g for g in self.groups}
        for reason in self.ctx.warnings:
            warnings.warn(f"pare: {reason}; those channels are frozen", stacklevel=3)

    # -- analysis ---------------------------------------------------------------------------------------------

    def _analyze(self) -> None:
        ctx = self.ctx
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                m = ctx.meta.get(node)
                if isinstance(m, TensorMeta) and m.ndim >= 2:
                    layout = ctx.part.new_layout(m.shape[1], "input", node.name)
                    ctx.part.freeze(layout, "model input channels")
                    ctx.values[node] = rules.Value(layout)
                else:
                    ctx.values[node] = None
            elif node.op == "get_attr":
                ctx.values[node] = None
            elif node.op == "call_module":
                module = self.gm.get_submodule(str(node.target))
                rule = rules.module_rule(module)
                if rule is None:
                    ctx.opaque(node, f"module '{node.target}' ({type(module).__name__}) is unknown to pare")
                else:
                    rule.analyze(ctx, node, module)
            elif node.op in ("call_function", "call_method"):
                _, fn = rules.function_rule(node)
                if fn is not None:
                    fn(ctx, node)
                elif self._reads_channels(node) or self._outputs_channels(node):
                    scope = node.meta.get("pare_scope") or "<root>"
                    target = getattr(node.target, "__qualname__", None) or str(node.target)
                    ctx.opaque(node, f"operator '{target}' in '{scope}' is unknown to pare")
                else:
                    ctx.values[node] = None
            elif node.op == "output":
                for arg in rules.flat_nodes(node.args):
                    v = ctx.values.get(arg)
                    for item in v if isinstance(v, list) else [v]:
                        if isinstance(item, rules.Value):
                            ctx.part.freeze(item.layout, "model output channels")

    def _reads_channels(self, node: fx.Node) -> bool:
        return any(self.ctx.values.get(a) is not None for a in rules.flat_nodes((node.args, node.kwargs)))

    def _outputs_channels(self, node: fx.Node) -> bool:
        m = self.ctx.meta.get(node)
        return isinstance(m, TensorMeta) and m.batched and m.ndim >= 2

    def _make_groups(self, classes: list[AtomClass]) -> list[Group]:
        spaces = self.ctx.part.spaces
        atoms_per_space: dict[int, int] = {}
        for cls in classes:
            for a in cls.atoms:
                atoms_per_space[a.space] = atoms_per_space.get(a.space, 0) + 1
        index = index_uses(self.ctx.uses)
        ordered = sorted(classes, key=lambda c: min(spaces[a.space].order for a in c.atoms))
        groups: list[Group] = []
        seen: set[str] = set()
        for cls in ordered:
            gid = group_name(cls, spaces, atoms_per_space)
            base, k = gid, 2
            while gid in seen:
                gid, k = f"{base}#{k}", k + 1
            seen.add(gid)
            has_producer = any(spaces[a.space].kind == "producer" for a in cls.atoms)
            if cls.frozen:
                reason = cls.frozen[0]
            elif not has_producer:
                reason = "no producer (input, pad or constant channels only)"
            else:
                reason = ""
            self._classes[gid] = cls
            groups.append(Group(gid, cls.size, not reason, reason, members_of(cls, index), cls.block))
        return groups

    # -- queries ----------------------------------------------------------------------------------------------

    def group(self, gid: str) -> Group:
        if gid not in self._by_id:
            raise PruneError(f"unknown group id '{gid}'")
        return self._by_id[gid]

    @property
    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def __repr__(self) -> str:
        n = len(self.prunable_groups)
        return f"ChannelGraph({type(self.model).__name__}: {len(self.groups)} groups, {n} prunable)"

    def positions(self, gid: str, node: fx.Node | str) -> np.ndarray:
        """Positions along dim 1 of ``node``'s output that hold group ``gid``'s channels, in group order.

        Shape: (group.size,) int64. Raises PruneError when the node's output does not carry the whole group.
        """
        if isinstance(node, str):
            node = next(n for n in self.gm.graph.nodes if n.name == node)
        value = self.ctx.values.get(node)
        cls = self._classes[self.group(gid).id]
        if isinstance(value, rules.Value):
            pos = 0
            starts: dict[tuple[int, int], int] = {}
            for seg in value.layout:
                for atom in cls.atoms:
                    if seg.space == atom.space and seg.start <= atom.start < seg.start + seg.length:
                        starts.setdefault((atom.space, atom.start), pos + atom.start - seg.start)
                pos += seg.length
            if starts:
                first = min(starts.values())
                if value.expand == 1:
                    return np.arange(first, first + cls.size, dtype=np.int64)
        raise PruneError(f"node '{node.name}' does not carry the channels of group '{gid}'")

    def feature_node(self, gid: str) -> fx.Node:
        """The traced node whose output best represents group ``gid``'s channels for data-driven criteria.

        Starting at the group's first producer, follow the single chain of per-channel operators (norms,
        activations, residual additions) and stop before a node with several users or a consumer: for a
        conv-BN-ReLU this is the ReLU output (as CHIP and HRank hook), for the last conv of a residual block it
        is the activation after the addition (as CHIP's ``relu2``).
        """
        group = self.group(gid)
        producer = next((m.module for m in group.members if m.role == "out"), None)
        if producer is None:
            raise PruneError(f"group '{gid}' has no producer")
        node = next(n for n in self.gm.graph.nodes if n.op == "call_module" and n.target == producer)
        while len(node.users) == 1:
            nxt = next(iter(node.users))
            if not self._is_per_channel(nxt, node):
                break
            node = nxt
        return node

    def _is_per_channel(self, node: fx.Node, source: fx.Node) -> bool:
        v_in, v_out = self.ctx.values.get(source), self.ctx.values.get(node)
        if not isinstance(v_out, rules.Value) or not isinstance(v_in, rules.Value) or v_out.expand != 1:
            return False
        if node.op == "call_module":
            module = self.gm.get_submodule(str(node.target))
            return isinstance(module, rules.PER_CHANNEL_MODULES)
        name, _ = rules.function_rule(node)
        return name in rules.PER_CHANNEL_FUNCTIONS

    def capture(self, nodes: Sequence[fx.Node]) -> nn.Module:
        """A module that runs the traced model and returns ``{node.name: output}`` for ``nodes``.

        Runs at native speed (a GraphModule, not an interpreter); used to stream activation statistics.
        """
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in self.gm.graph.nodes:
            if n.op == "output":
                continue
            env[n] = graph.node_copy(n, lambda a: env[a])
        graph.output({n.name: env[n] for n in nodes})
        module = fx.GraphModule(self.gm, graph, "Capture")
        module.graph.eliminate_dead_code()
        module.recompile()
        return module

    # -- pruning ----------------------------------------------------------------------------------------------

    def _validate(self, removals: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
        clean: dict[str, np.ndarray] = {}
        for gid, indices in removals.items():
            g = self.group(gid)
            idx = np.asarray(list(indices), dtype=np.int64).reshape(-1)
            if idx.size == 0:
                continue
            if not g.prunable:
                raise PruneError(f"group '{gid}' is frozen ({g.reason})")
            if idx.min() < 0 or idx.max() >= g.size:
                bad = int(idx[(idx < 0) | (idx >= g.size)][0])
                raise PruneError(f"group '{gid}': index {bad} out of range for {g.size} channels")
            if np.unique(idx).size != idx.size:
                raise PruneError(f"group '{gid}': duplicate indices")
            if idx.size >= g.size:
                raise PruneError(f"group '{gid}': cannot remove all {g.size} channels")
            if g.block > 1:
                removed = np.zeros(g.size, dtype=bool)
                removed[idx] = True
                blocks = removed.reshape(-1, g.block)
                if not (blocks.all(1) | ~blocks.any(1)).all():
                    raise PruneError(
                        f"group '{gid}': channels must be removed in whole aligned blocks of {g.block} "
                        "(GroupNorm groups)"
                    )
            clean[gid] = idx
        return clean

    def keep_masks(self, removals: Mapping[str, Sequence[int]]) -> list[np.ndarray]:
        """Per space, a boolean mask of the channels that survive ``removals``."""
        clean = self._validate(removals)
        masks = [np.ones(sp.size, dtype=bool) for sp in self.ctx.part.spaces]
        for gid, idx in clean.items():
            for atom in self._classes[gid].atoms:
                masks[atom.space][atom.start + idx] = False
        return masks

    def prune(self, removals: Mapping[str, Sequence[int]], verify: bool = True) -> nn.Module:
        """Return a new model with the channels ``removals`` names (group id -> channel indices) removed.

        The result is an instance of the model's own class with smaller modules, or a ``torch.fx.GraphModule``
        when a function argument (a pad amount, split sizes, a view shape) had to change; a GraphModule reads
        its modules' training flags at call time, so train and eval mode keep their meaning. The original model is
        not modified. Removing a channel means zeroing it where it is produced (docs/design.md); where an operator
        turns that zero into a constant (``sigmoid(0) = 0.5``), the constant is folded into the consumer's bias.
        With ``verify=True`` (the default) the result is checked against that masked reference, run through the
        model's own forward on the example inputs in eval and train mode; a mismatch raises
        :class:`pare.EquivalenceError` naming the first diverging node. ``verify=False`` skips the check.
        """
        ctx = self.ctx
        keep = Kept(self.keep_masks(removals))
        replacements: dict[int, nn.Module] = {}
        done: set[str] = set()
        arg_changes: dict[fx.Node, tuple[str, Any, tuple[Any, ...], dict[str, Any]]] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module" and node.target not in done:
                done.add(str(node.target))
                module = self.gm.get_submodule(str(node.target))
                rule = rules.module_rule(module)
                new = rule.rebuild(ctx, node, module, keep) if rule is not None and ctx.values.get(node) else None
                if new is not None:
                    _check_not_empty(str(node.target), new)
                    rules.unshare(new, module)
                    replacements[id(module)] = new
            elif node.op in ("call_function", "call_method"):
                rebuild = rules.function_rebuild(node)
                change = rebuild(ctx, node, keep) if rebuild is not None else None
                if change is not None:
                    arg_changes[node] = change
        fold_constants(self, keep, replacements)
        # The memo substitutes the rebuilt modules, so their big original weights are never copied.
        new_model = copy.deepcopy(self.model, dict(replacements))
        self._replace_params(new_model, keep)
        pruned: nn.Module = new_model
        graph = self.gm.graph
        if arg_changes:
            graph = _rewrite_graph(self.gm.graph, arg_changes)
            pruned = fx.GraphModule(new_model, graph, type(self.model).__name__)
            pruned.train(self.model.training)
            for path, m in new_model.named_modules():  # keep each module's own mode, as in the original
                if path and isinstance(sub := _find(pruned, path), nn.Module):
                    sub.training = m.training
        if verify:
            verify_equivalence(self, pruned, graph, keep)
        return pruned

    def _replace_params(self, new_model: nn.Module, keep: Kept) -> None:
        for (target, dim), layout in self.ctx.param_layouts.items():
            kept = keep.kept(rules.Value(layout))
            if len(kept) == layout_size(layout):
                continue
            owner_path, _, name = target.rpartition(".")
            owner = new_model.get_submodule(owner_path) if owner_path else new_model
            old = getattr(owner, name)
            rules.set_param(owner, name, rules.slice_param(old, dim, kept))


def _find(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _check_not_empty(path: str, m: nn.Module) -> None:
    for attr in ("in_channels", "out_channels", "in_features", "out_features", "num_features", "num_channels"):
        if getattr(m, attr, 1) == 0:
            raise PruneError(f"removal would leave '{path}' with no {attr.replace('_', ' ')}")


def _rewrite_graph(graph: fx.Graph, changes: Mapping[fx.Node, tuple[str, Any, tuple[Any, ...], dict[str, Any]]]
                   ) -> fx.Graph:
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        change = changes.get(node)
        if change is None:
            env[node] = new.node_copy(node, lambda n: env[n])
            continue
        op, target, args, kwargs = change
        created = new.create_node(
            op, target, fx.node.map_arg(args, lambda n: env[n]), fx.node.map_arg(kwargs, lambda n: env[n]),
            name=node.name,
        )
        created.meta = dict(node.meta)
        env[node] = created
    return new


def trace(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> ChannelGraph:
    """Trace ``model`` on ``example_inputs`` (a tensor or a tuple of tensors) into a :class:`ChannelGraph`."""
    return ChannelGraph(model, example_inputs)
