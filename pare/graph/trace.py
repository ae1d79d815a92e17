"""Tracing a model into a torch.fx graph with concrete shape metadata.

Why torch.fx: it keeps module structure (``call_module`` nodes carry module paths, so surgery can replace
modules by name) and yields a program whose function arguments (pad amounts, split sizes, view shapes) can be
rewritten after pruning. Where symbolic tracing fails inside a submodule (data-dependent Python), that submodule
becomes an opaque leaf and the engine freezes the channels it touches; see docs/design.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from pare.errors import TraceError
from pare.layers import ZeroPadShortcut

#: Module types the engine understands as a whole; fx never traces into them.
LEAF_TYPES: tuple[type[nn.Module], ...] = (ZeroPadShortcut,)


def _is_frozen_batchnorm(m: nn.Module) -> bool:
    return type(m).__name__ == "FrozenBatchNorm2d" and "running_var" in m._buffers


#: Predicates for leaf modules matched other than by type (torchvision's FrozenBatchNorm2d, by name).
LEAF_PREDICATES: list[Callable[[nn.Module], bool]] = [_is_frozen_batchnorm]


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of a traced tensor value, and whether it carries the batch dimension."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    batched: bool

    @property
    def ndim(self) -> int:
        return len(self.shape)


class _TrainingBranch(Exception):
    """Raised when a traced ``forward`` branches on ``self.training``: that module must stay a module."""


class TrainingFlag:
    """Stands for ``module.training`` while tracing.

    Passed as an argument (``F.dropout(x, p, self.training)``), it becomes a graph node that reads the module's
    flag at call time, so a returned GraphModule keeps train/eval semantics. Used in a condition (``if
    self.training``, DropPath), it makes the module a leaf of the trace, run as a module (this project's design).
    """

    def __init__(self, path: str, value: bool) -> None:
        self.path, self.value = path, value

    def __bool__(self) -> bool:
        if not self.path:  # the model's own forward: fx would refuse the whole model; keep the trace-time branch
            return self.value
        raise _TrainingBranch(self.path)


def training_flag(module: nn.Module) -> bool:
    """``module.training``, read when the traced program runs."""
    return module.training


class _Tracer(fx.Tracer):
    def __init__(self, leaf_paths: set[str]) -> None:
        super().__init__()
        self.leaf_paths = leaf_paths
        self.stack: list[str] = []
        self.failed: str | None = None  # innermost non-leaf module whose forward raised while tracing
        self.branching = False  # ... because it branched on self.training

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths or isinstance(m, LEAF_TYPES):
            return True
        if any(pred(m) for pred in LEAF_PREDICATES):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, TrainingFlag):
            if not a.path:  # the root's own flag: a GraphModule built from it has the same attribute
                return self.create_node("get_attr", "training", (), {})
            owner = self.create_node("get_attr", a.path, (), {})
            return self.create_node("call_function", training_flag, (owner,), {})
        return super().create_arg(a)

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
        except Exception as exc:
            if self.failed is None and name and name not in self.leaf_paths:
                self.failed = name
                self.branching = isinstance(exc, _TrainingBranch)
            raise
        finally:
            self.stack.pop()


def _shallow_root(model: nn.Module) -> nn.Module:
    """A copy of the root module object sharing its children, so that fx's ``_tensor_constant*`` attributes
    (tensors created while tracing) land on the copy, never on the user's model."""
    root = object.__new__(model.__class__)  # not cls.__new__: a GraphModule would get a fresh class
    root.__dict__ = model.__dict__.copy()
    for key, val in model.__dict__.items():
        if isinstance(val, dict):
            root.__dict__[key] = type(val)(val)
    return root


def symbolic_trace(model: nn.Module) -> tuple[fx.GraphModule, list[str]]:
    """Trace ``model`` with torch.fx, turning untraceable submodules into leaves.

    Every module's ``training`` flag stands for a :class:`TrainingFlag` during the trace (restored afterwards, the
    model is otherwise untouched). Returns the GraphModule and the paths of the submodules that had to be made
    opaque (``pare_reason`` in the warning says why).
    """
    root = _shallow_root(model)
    flags = {m: m.training for m in model.modules()}
    opaque: list[str] = []
    reasons: dict[str, str] = {}
    leaf_paths: set[str] = set()
    try:
        for path, m in root.named_modules():
            m.training = TrainingFlag(path, flags.get(m, root.training))  # type: ignore[assignment]
        for _ in range(64):
            tracer = _Tracer(leaf_paths)
            try:
                graph = tracer.trace(root)
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
                reasons[failing] = ("branches on self.training and is kept as a module" if tracer.branching
                                    else "is not symbolically traceable")
                continue
            break
        else:
            raise TraceError(f"cannot trace {type(model).__name__}: too many untraceable submodules")
    finally:
        for m in root.modules():
            m.training = flags.get(m, model.training)
    gm = fx.GraphModule(root, graph, type(model).__name__)
    gm.training = model.training  # only the root: its children are the user's modules, with their own flags
    for path in opaque:
        warnings.warn(f"pare: submodule '{path}' {reasons[path]}; its channels are frozen unless pare has a rule "
                      "for it", stacklevel=3)
    return gm, opaque


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

    flags = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        with torch.no_grad():
            _Recorder(gm).run(*example_inputs)
    except Exception as exc:
        raise TraceError(
            f"the model failed on the example inputs: {type(exc).__name__}: {exc}".splitlines()[0]
        ) from exc
    finally:
        for m, flag in flags.items():
            m.training = flag
    return meta


def as_input_tuple(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise TraceError("example_inputs must be a tensor or a tuple of tensors")
