"""Serialise a ``torch.fx.Graph`` to JSON and rebuild it without ``eval`` or importing arbitrary names.

Node arguments are tagged so that every Python value fx graphs carry survives the round trip exactly:
``{"n": name}`` node reference, ``{"t": [...]}`` tuple, ``{"l": [...]}`` list, ``{"d": [[k, v], ...]}`` dict,
``{"s": [start, stop, step]}`` slice, ``{"e": 1}`` Ellipsis, ``{"f": "inf"}`` non-finite float, ``{"dtype":
...}``, ``{"device": ...}``, ``{"memory_format": ...}``, ``{"layout": ...}``; None, bools, ints, finite floats
and strings are stored as plain JSON.

Function targets are written as ``"namespace:name"`` and resolved on load only inside a fixed allowlist:
arithmetic/indexing functions of ``operator``, public tensor functions of ``torch`` (the ATen ops plus
``torch.functional``), public functions of ``torch.nn.functional`` and ``builtins.getattr`` with a public
attribute name. ``call_method`` targets must be public ``torch.Tensor`` methods outside a small deny list.
"""

from __future__ import annotations

import ast
import builtins
import functools
import math
import operator
from typing import Any

import torch
import torch.functional
import torch.nn.functional as F
from torch import fx, nn

from pare.errors import CheckpointError
from pare.io._schema import is_identifier as _is_identifier

_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")

_OPERATOR_NAMES = (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg", "pos", "abs", "invert",
    "and_", "or_", "xor", "lshift", "rshift", "lt", "le", "eq", "ne", "ge", "gt", "not_", "truth",
    "is_", "is_not", "contains", "getitem", "setitem", "iadd", "isub", "imul", "itruediv", "ifloordiv",
    "imod", "ipow", "imatmul", "iand", "ior", "ixor", "ilshift", "irshift", "index", "concat",
)  # fmt: skip
# Reachable through the torch namespace but they touch files or global state rather than compute on tensors.
_TORCH_DENY = frozenset({"from_file", "load", "save"})
# Not tensor math: hooks take callables, storages expose file-backed memory, apply_/map_ call Python
# callables.
_METHOD_DENY = frozenset(
    {
        "apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook", "backward",
        "storage", "untyped_storage", "share_memory_", "numpy", "tolist", "pin_memory", "record_stream",
    }
)  # fmt: skip
_F_DENY = frozenset(
    {"handle_torch_function", "has_torch_function", "has_torch_function_unary", "has_torch_function_variadic",
     "boolean_dispatch", "assert_int_or_pair"}
)  # fmt: skip


@functools.cache
def _allowed_functions() -> dict[str, Any]:
    """``"namespace:name" -> callable`` for every function a graph may call."""
    table: dict[str, Any] = {}
    for name in _OPERATOR_NAMES:
        if hasattr(operator, name):
            table[f"operator:{name}"] = getattr(operator, name)
    for name in dir(F):
        value = getattr(F, name)
        if (
            not name.startswith("_")
            and name not in _F_DENY
            and callable(value)
            and not isinstance(value, type)
            and str(getattr(value, "__module__", "") or "").startswith("torch")
        ):
            table[f"torch.nn.functional:{name}"] = value
    torch_names = {n for n in dir(torch._C._VariableFunctions) if not n.startswith("_")}
    torch_names |= set(torch.functional.__all__)
    for name in sorted(torch_names - _TORCH_DENY):
        value = getattr(torch, name, None)
        if value is not None and callable(value) and not isinstance(value, type):
            table[f"torch:{name}"] = value
    table["builtins:getattr"] = builtins.getattr
    return table


@functools.cache
def _function_names() -> dict[int, str]:
    # First namespace wins, so F.conv2d (which is torch.conv2d) is written under the name the graph shows.
    names: dict[int, str] = {}
    for key, value in _allowed_functions().items():
        names.setdefault(id(value), key)
    return names


def _check_attr_path(target: Any, node: str) -> str:
    parts = target.split(".") if isinstance(target, str) else [None]
    # Sequential/ModuleList children are named "0", "1", ...; dunder names would reach Python internals.
    valid = [
        isinstance(part, str) and ((part.isascii() and part.isdigit()) or _is_identifier(part))
        for part in parts
    ]
    if not all(valid) or any(part.startswith("__") for part in parts):
        raise CheckpointError(f"artifact graph: node '{node}' has an invalid attribute path {target!r}")
    return target


def _encode_value(value: Any, node: str) -> Any:
    if isinstance(value, fx.Node):
        return {"n": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"f": repr(value)}
    if isinstance(value, tuple):
        return {"t": [_encode_value(item, node) for item in value]}
    if isinstance(value, list):
        return {"l": [_encode_value(item, node) for item in value]}
    if isinstance(value, dict):
        return {"d": [[_encode_value(k, node), _encode_value(v, node)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"s": [_encode_value(part, node) for part in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"e": 1}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    raise CheckpointError(f"graph node '{node}': argument of type {type(value).__name__} cannot be stored")


def _torch_constant(name: Any, kind: type, node: str) -> Any:
    value = getattr(torch, name, None) if _is_identifier(name) else None
    if not isinstance(value, kind):
        raise CheckpointError(f"artifact graph: node '{node}' has an unknown {kind.__name__} {name!r}")
    return value


def _decode_value(value: Any, env: dict[str, fx.Node], node: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if not isinstance(value, dict) or len(value) != 1:
        raise CheckpointError(f"artifact graph: node '{node}' has a malformed argument {str(value)[:80]}")
    ((tag, body),) = value.items()
    if tag == "n":
        if body not in env:
            raise CheckpointError(f"artifact graph: node '{node}' refers to unknown or later node {body!r}")
        return env[body]
    if tag in ("t", "l", "s") and isinstance(body, list):
        items = [_decode_value(item, env, node) for item in body]
        if tag == "t":
            return tuple(items)
        if tag == "l":
            return items
        if len(items) == 3:
            return slice(*items)
    if tag == "d" and isinstance(body, list) and all(isinstance(p, list) and len(p) == 2 for p in body):
        return {_decode_value(k, env, node): _decode_value(v, env, node) for k, v in body}
    if tag == "e":
        return Ellipsis
    if tag == "f" and body in ("inf", "-inf", "nan"):
        return float(body)
    if tag == "dtype":
        return _torch_constant(body, torch.dtype, node)
    if tag == "memory_format":
        return _torch_constant(body, torch.memory_format, node)
    if tag == "layout":
        return _torch_constant(body, torch.layout, node)
    if tag == "device" and isinstance(body, str):
        try:
            return torch.device(body)
        except RuntimeError:
            pass
    raise CheckpointError(f"artifact graph: node '{node}' has a malformed argument {str(value)[:80]}")


def _encode_target(node: fx.Node) -> str:
    if node.op != "call_function":
        return str(node.target)
    name = _function_names().get(id(node.target))
    if name is None:
        raise CheckpointError(
            f"graph node '{node.name}' calls {getattr(node.target, '__qualname__', node.target)!r}, "
            "which is not "
            "in the allowlist (operator, torch, torch.nn.functional functions)"
        )
    return name


def graph_to_json(graph: fx.Graph) -> dict[str, Any]:
    """JSON-able ``graph``: ``{"nodes": [{"op", "name", "target", "args", "kwargs"}, ...]}``."""
    codegen = getattr(graph, "_codegen", None)
    if codegen is not None and type(codegen) is not fx.graph.CodeGen:
        raise CheckpointError(
            f"graph uses {type(codegen).__name__} code generation; only plain fx graphs are stored"
        )
    nodes = []
    for node in graph.nodes:
        nodes.append(
            {
                "op": node.op,
                "name": node.name,
                "target": _encode_target(node),
                "args": _encode_value(tuple(node.args), node.name),
                "kwargs": _encode_value(dict(node.kwargs), node.name),
            }
        )
    return {"nodes": nodes}


def _resolve_target(spec: dict[str, Any], name: str) -> Any:
    op, target = spec["op"], spec["target"]
    if op == "call_function":
        function = _allowed_functions().get(target) if isinstance(target, str) else None
        if function is None:
            raise CheckpointError(f"artifact graph: node '{name}' calls {target!r}, which is not allowlisted")
        return function
    if op == "call_method":
        if not (_is_identifier(target) and not target.startswith("_") and target not in _METHOD_DENY):
            raise CheckpointError(
                f"artifact graph: node '{name}' calls method {target!r}, which is not allowed"
            )
        if not callable(getattr(torch.Tensor, target, None)):
            raise CheckpointError(
                f"artifact graph: node '{name}' calls {target!r}, which is not a Tensor method"
            )
        return target
    if op in ("get_attr", "call_module"):
        return _check_attr_path(target, name)
    if op == "placeholder":
        if not _is_identifier(target):
            raise CheckpointError(f"artifact graph: placeholder '{name}' has an invalid name {target!r}")
        return target
    return "output"


def graph_from_json(data: Any) -> fx.Graph:
    """Rebuild a graph written by :func:`graph_to_json`; CheckpointError on anything outside the allowlist."""
    nodes = data.get("nodes") if isinstance(data, dict) else None
    if not isinstance(nodes, list):
        raise CheckpointError("artifact graph: missing node list")
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for spec in nodes:
        if not isinstance(spec, dict) or spec.get("op") not in _OPS or not _is_identifier(spec.get("name")):
            raise CheckpointError(f"artifact graph: malformed node {str(spec)[:120]}")
        name = spec["name"]
        target = _resolve_target(spec, name)
        args = _decode_value(spec.get("args"), env, name)
        kwargs = _decode_value(spec.get("kwargs"), env, name)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise CheckpointError(f"artifact graph: node '{name}' has malformed args/kwargs")
        # fx writes keyword names verbatim into the source it generates: only plain identifiers may pass.
        if not all(_is_identifier(key) for key in kwargs):
            raise CheckpointError(f"artifact graph: node '{name}' has an invalid keyword argument name")
        if target is builtins.getattr and not (
            len(args) == 2 and isinstance(args[1], str) and not args[1].startswith("_")
        ):
            raise CheckpointError(f"artifact graph: node '{name}' uses getattr on a private or computed name")
        env[name] = graph.create_node(spec["op"], target, args, kwargs, name=name)
    try:
        graph.lint()
    except Exception as exc:  # lint raises RuntimeError/AssertionError for inconsistent graphs
        raise CheckpointError(f"artifact graph: inconsistent graph ({exc})") from None
    return graph


# Statements and expressions fx never generates for a plain graph: finding one means a file string changed
# the shape of the code.
_FORBIDDEN_SYNTAX = (
    ast.Import, ast.ImportFrom, ast.Lambda, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Global,
    ast.Nonlocal, ast.With, ast.AsyncWith, ast.Try, ast.Raise, ast.While, ast.For, ast.AsyncFor, ast.If,
    ast.Delete, ast.Yield, ast.YieldFrom, ast.Await, ast.NamedExpr, ast.ListComp, ast.SetComp, ast.DictComp,
    ast.GeneratorExp, ast.Assert, ast.JoinedStr, ast.Starred,
)  # fmt: skip
_CODE_BUILTINS = frozenset({"self", "getattr", "slice", "Ellipsis", "None", "True", "False"})


def check_generated_code(graph: fx.Graph) -> None:
    """Second line of defence: parse the source fx would execute for ``graph`` and refuse anything but
    plain assignments of node values (every name a node, a placeholder or a global fx itself registered).

    Raises:
        CheckpointError: the generated code has a shape fx never produces for a stored graph.
    """
    try:
        code = graph.python_code(root_module="self")
        tree = ast.parse(code.src)
    except Exception as exc:  # fx fails in many ways on odd graphs (e.g. a binary operator given one argument)
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        raise CheckpointError(f"artifact graph: cannot generate code ({reason})") from None
    nodes = {node.name for node in graph.nodes}
    allowed = nodes | set(code.globals) | _CODE_BUILTINS
    functions = tree.body
    if len(functions) != 1 or not isinstance(functions[0], ast.FunctionDef) or functions[0].name != "forward":
        raise CheckpointError("artifact graph: generated code is not a single forward function")
    for item in ast.walk(functions[0]):
        bad = isinstance(item, _FORBIDDEN_SYNTAX) and item is not functions[0]
        bad = bad or (isinstance(item, ast.Name) and item.id not in allowed)
        bad = bad or (isinstance(item, ast.Attribute) and item.attr.startswith("__"))
        bad = bad or (isinstance(item, ast.arg) and item.arg not in nodes | {"self"})
        if bad:
            raise CheckpointError(
                f"artifact graph: generated code contains {type(item).__name__} at line "
                f"{getattr(item, 'lineno', '?')}, which no stored graph produces"
            )


def build_graph_module(root: nn.Module, graph: fx.Graph, class_name: str, where: str) -> fx.GraphModule:
    """``fx.GraphModule(root, graph, class_name)`` after :func:`check_generated_code` passed."""
    if not _is_identifier(class_name):
        raise CheckpointError(f"artifact spec: graph module '{where}' has a bad class name")
    check_generated_code(graph)
    try:
        return fx.GraphModule(root, graph, class_name)
    except Exception as exc:  # a graph that passed every check can still refer to modules the tree lacks
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        raise CheckpointError(f"artifact graph at '{where}' does not fit its modules ({reason})") from None
