"""Tracing a model into a torch.fx graph with concrete shape metadata.

Why torch.fx: it keeps module structure (``call_module`` nodes carry module paths, so surgery can replace
modules by name) and yields a program whose function arguments (pad amounts, split sizes, view shapes) can be
rewritten after pruning. Where symbolic tracing fails inside a submodule (data-dependent Python), that submodule
becomes an opaque leaf and the engine freezes the channels it touches; see docs/design.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from pare.errors import TraceError
from pare.layers import ZeroPadShortcut

#: Module types the engine understands as a whole; fx never traces into them.
LEAF_TYPES: tuple[type[nn.Module], ...] = (ZeroPadShortcut,)


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of a traced tensor value, and whether it carries the batch dimension."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    batched: bool

    @property
    def ndim(self) -> int:
        return len(self.shape)


class _Tracer(fx.Tracer):
    def __init__(self, leaf_paths: set[str]) -> None:
        super().__init__()
        self.leaf_paths = leaf_paths
        self.stack: list[str] = []
        self.failed: str | None = None  # innermost non-leaf module whose forward raised while tracing

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths or isinstance(m, LEAF_TYPES):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        # The module whose forward() issued this node, for error messages that name a module path.
        node.meta["pare_scope"] = self.stack[-1] if self.stack else ""
        return node

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        name = self.path_of_module(m)
        self.stack.append(name)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None and name and name not in self.leaf_paths:
                self.failed = name
            raise
        finally:
            self.stack.pop()


def symbolic_trace(model: nn.Module) -> tuple[fx.GraphModule, list[str]]:
    """Trace ``model`` with torch.fx, turning untraceable submodules into leaves.

    Returns the GraphModule and the paths of the submodules that had to be made opaque.
    """
    opaque: list[str] = []
    leaf_paths: set[str] = set()
    for _ in range(64):
        tracer = _Tracer(leaf_paths)
        try:
            graph = tracer.trace(model)
        except Exception as exc:
            failing = tracer.failed
            if failing is None:
                raise TraceError(
                    f"cannot trace {type(model).__name__}: its own forward() is not symbolically traceable "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); wrap the "
                    "data-dependent part in a submodule so pare can treat it as opaque"
                ) from exc
            leaf_paths.add(failing)
            opaque.append(failing)
            continue
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        for path in opaque:
            warnings.warn(
                f"pare: submodule '{path}' is not symbolically traceable; its channels are frozen",
                stacklevel=3,
            )
        return gm, opaque
    raise TraceError(f"cannot trace {type(model).__name__}: too many untraceable submodules")


def _meta_of(value: Any, batched: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorMeta(tuple(value.shape), value.dtype, batched)
    if isinstance(value, (tuple, list)):
        return type(value)(_meta_of(v, batched) for v in value)
    return value


def _has_batched(value: Any, batched: dict[fx.Node, bool]) -> bool:
    found = False

    def visit(a: Any) -> Any:
        nonlocal found
        if isinstance(a, fx.Node) and batched.get(a, False):
            found = True
        return a

    fx.node.map_aggregate(value, visit)
    return found


def propagate(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> dict[fx.Node, Any]:
    """Run ``gm`` once on ``example_inputs`` and return, per node, its output's metadata.

    Tensors become :class:`TensorMeta`; Python values (sizes, ints) are kept as they are, since later rules read
    them (e.g. a ``view`` argument computed from ``x.size(0)``).
    """
    meta: dict[fx.Node, Any] = {}
    batched: dict[fx.Node, bool] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n.op == "placeholder":
                batched[n] = True
            elif n.op == "get_attr":
                batched[n] = False
            else:
                batched[n] = _has_batched((n.args, n.kwargs), batched)
            meta[n] = _meta_of(out, batched[n])
            return out

    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            _Recorder(gm).run(*example_inputs)
    except Exception as exc:
        raise TraceError(
            f"the model failed on the example inputs: {type(exc).__name__}: {exc}".splitlines()[0]
        ) from exc
    finally:
        gm.train(was_training)
    return meta


def as_input_tuple(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise TraceError("example_inputs must be a tensor or a tuple of tensors")
