"""The artifact spec schema: :func:`validate_spec` walks the whole JSON spec before ``load`` builds anything.

The grammar of each field is in :mod:`pare.io._schema`; this module says which field has which grammar.
Spec layout: see :mod:`pare.io.artifact` (this project's design).
"""

from __future__ import annotations

from typing import Any

from pare.io._layers import LEAF_TYPES
from pare.io._schema import (
    MAX_JSON_DEPTH,
    MAX_LEAF_INT,
    MAX_LIST,
    MAX_ZOO_INT,
    check_identifier,
    check_list,
    check_object,
    check_part,
    check_path,
    check_plain,
    check_qualname,
    check_scalar,
    check_shape,
    check_target,
    check_text,
    fail,
    is_identifier,
)

FORMAT_VERSIONS = (1,)  # format versions this pare reads
_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
_CONTAINERS = ("sequential", "modulelist", "moduledict", "holder", "graph")
_CONSTANT_TAGS = ("dtype", "memory_format", "layout", "device")


def check_format_version(spec: Any) -> int:
    """``spec["format_version"]``: a positive integer this version of pare knows."""
    version = spec.get("format_version") if isinstance(spec, dict) else None
    if not (isinstance(version, int) and not isinstance(version, bool) and version in FORMAT_VERSIONS):
        known = ", ".join(map(str, FORMAT_VERSIONS))
        raise fail("spec", f"format_version {version!r} is not supported (this pare reads version {known})")
    return version


def _leaf_args(args: Any, where: str) -> None:
    if not isinstance(args, dict) or len(args) > 32:
        raise fail(where, "leaf arguments must be an object of at most 32 entries")
    for key, value in args.items():
        check_identifier(key, f"{where} argument name")
        check_plain(value, f"{where} argument '{key}'", MAX_LEAF_INT)


def _leaf_type(value: Any, where: str) -> None:
    if not (isinstance(value, str) and value in LEAF_TYPES):
        raise fail(where, f"layer type {value!r:.60} is not allowlisted")


def _validate_leaves(spec: dict[str, Any]) -> None:
    for index, leaf in enumerate(check_list(spec["leaves"], "spec leaves")):
        where = f"spec leaf {index}"
        if isinstance(leaf, dict) and "kept" in leaf:
            check_object(leaf, where, {"path", "type", "kept"})
            check_qualname(leaf["type"], f"{where} type")
            if leaf["kept"] is not True:
                raise fail(where, "'kept' must be true")
        else:
            check_object(leaf, where, {"path", "type", "args"})
            _leaf_type(leaf["type"], where)
            _leaf_args(leaf["args"], where)
        check_path(leaf["path"], f"{where} path")
    for index, entry in enumerate(check_list(spec["modules"], "spec modules")):
        where = f"spec module {index}"
        pair = check_list(entry, where, 2)
        if len(pair) != 2:
            raise fail(where, "expected [path, type]")
        check_path(pair[0], f"{where} path", allow_root=True)
        check_qualname(pair[1], f"{where} type")


def _validate_zoo(zoo: Any) -> None:
    check_object(zoo, "spec zoo", {"name", "kwargs"})
    check_identifier(zoo["name"], "spec zoo name")
    kwargs = zoo["kwargs"]
    if not isinstance(kwargs, dict) or len(kwargs) > 32:
        raise fail("spec zoo kwargs", "must be an object of at most 32 entries")
    for key, value in kwargs.items():
        check_identifier(key, "spec zoo option name")
        if isinstance(value, dict):  # e.g. a per-stage sparsity table
            for inner_key, inner in value.items():
                check_text(inner_key, f"spec zoo option '{key}' key", 64)
                check_plain(inner, f"spec zoo option '{key}'", MAX_ZOO_INT)
        else:
            check_plain(value, f"spec zoo option '{key}'", MAX_ZOO_INT)


def _validate_tree(desc: Any, path: str, depth: int, budget: list[int]) -> None:
    where = f"spec module '{path or '<root>'}'"
    if depth > MAX_JSON_DEPTH // 3:
        raise fail(where, "module tree nests too deeply")
    budget[0] -= 1
    if budget[0] < 0:
        raise fail("spec tree", f"has more than {MAX_LIST} modules")
    kind = desc.get("kind") if isinstance(desc, dict) else None
    if kind == "leaf":
        check_object(desc, where, {"kind", "type", "args"})
        _leaf_type(desc["type"], where)
        _leaf_args(desc["args"], where)
        return
    if kind not in _CONTAINERS:
        raise fail(where, f"unknown module kind {kind!r}" if isinstance(kind, str) else "is malformed")
    graph_keys = {"graph", "class_name"} if kind == "graph" else set()
    check_object(desc, where, {"kind", "children", "params", "buffers", *graph_keys})
    names: set[str] = set()

    def claim(name: Any, what: str) -> str:
        check_part(name, f"{where} {what} name") if what == "child" else check_identifier(name, f"{where} {what}")
        if name in names:
            raise fail(where, f"name {name!r} is used twice")
        names.add(name)
        return name

    for entry in check_list(desc["children"], f"{where} children"):
        pair = check_list(entry, f"{where} child", 2)
        if len(pair) != 2:
            raise fail(where, "child entries must be [name, module]")
        name = claim(pair[0], "child")
        _validate_tree(pair[1], f"{path}.{name}" if path else name, depth + 1, budget)
    for entry in check_list(desc["params"], f"{where} params"):
        pair = check_list(entry, f"{where} parameter", 2)
        if len(pair) != 2:
            raise fail(where, "parameter entries must be [name, shape]")
        check_shape(pair[1], f"{where} parameter {claim(pair[0], 'parameter')}")
    for entry in check_list(desc["buffers"], f"{where} buffers"):
        triple = check_list(entry, f"{where} buffer", 3)
        if len(triple) != 3 or not isinstance(triple[2], bool):
            raise fail(where, "buffer entries must be [name, shape, persistent]")
        check_shape(triple[1], f"{where} buffer {claim(triple[0], 'buffer')}")
    if kind == "graph":
        check_identifier(desc["class_name"], f"{where} class_name")
        validate_graph(desc["graph"], f"graph at '{path or '<root>'}'")


def _validate_value(value: Any, where: str, depth: int) -> None:
    """A tagged graph argument (see :mod:`pare.io._fxjson`)."""
    if depth > MAX_JSON_DEPTH // 2:
        raise fail(where, "argument nests too deeply")
    if not isinstance(value, dict):
        check_scalar(value, where)
        return
    if len(value) != 1:
        raise fail(where, f"malformed argument {value!r:.60}")
    ((tag, body),) = value.items()
    if tag == "n":
        check_identifier(body, f"{where} node reference")
    elif tag in ("t", "l", "s"):
        items = check_list(body, where, 4096)
        if tag == "s" and len(items) != 3:
            raise fail(where, "slice needs [start, stop, step]")
        for item in items:
            _validate_value(item, where, depth + 1)
    elif tag == "d":
        for pair in check_list(body, where, 4096):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise fail(where, "dict entries must be [key, value]")
            if isinstance(pair[0], (dict, list, float)):
                raise fail(where, "dict keys must be names or integers")
            check_scalar(pair[0], where)
            _validate_value(pair[1], where, depth + 1)
    elif tag == "e":
        if body != 1:
            raise fail(where, "malformed Ellipsis")
    elif tag == "f":
        if body not in ("inf", "-inf", "nan"):
            raise fail(where, f"malformed float {body!r:.40}")
    elif tag in _CONSTANT_TAGS:
        if tag == "device":
            check_text(body, where, 32)
        else:
            check_identifier(body, where)
    else:
        raise fail(where, f"unknown argument tag {tag!r:.40}")


def validate_graph(graph: Any, where: str) -> None:
    """Node list of a stored fx graph: unique identifier names, known ops, well-formed targets and args.

    Keyword-argument keys must be identifiers: fx writes them verbatim into the Python source it executes.
    """
    check_object(graph, where, {"nodes"})
    names: set[str] = set()
    for spec in check_list(graph["nodes"], f"{where} nodes"):
        check_object(spec, f"{where} node", {"op", "name", "target", "args", "kwargs"})
        name = check_identifier(spec["name"], f"{where} node name")
        here = f"{where} node '{name}'"
        if name in names:
            raise fail(here, "name is used twice")
        names.add(name)
        if spec["op"] not in _OPS:
            raise fail(here, f"unknown op {spec['op']!r:.40}")
        check_target(spec["op"], spec["target"], f"{here} target")
        args, kwargs = spec["args"], spec["kwargs"]
        if not (isinstance(args, dict) and set(args) == {"t"}):
            raise fail(here, "args must be a tuple")
        if not (isinstance(kwargs, dict) and set(kwargs) == {"d"}):
            raise fail(here, "kwargs must be a dict")
        _validate_value(args, f"{here} args", 0)
        _validate_value(kwargs, f"{here} kwargs", 0)
        for key, _ in kwargs["d"]:
            if not is_identifier(key):
                raise fail(here, f"keyword argument name {key!r:.60} is not a valid name")


def validate_spec(spec: Any) -> dict[str, Any]:
    """Check the whole artifact spec (see :mod:`pare.io.artifact` for its layout); return it unchanged.

    Raises:
        CheckpointError: naming the first field that breaks the schema.
    """
    if not isinstance(spec, dict):
        raise fail("spec", "is not a JSON object")
    check_format_version(spec)
    kind = spec.get("kind")
    common = {"format_version", "root_type", "kind", "training", "frozen"}
    if kind == "tree":
        check_object(spec, "spec", common | {"tree"})
        _validate_tree(spec["tree"], "", 0, [MAX_LIST])
    elif kind == "zoo":
        check_object(spec, "spec", common | {"zoo", "leaves", "modules"})
        _validate_zoo(spec["zoo"])
        _validate_leaves(spec)
    elif kind == "skeleton":
        check_object(spec, "spec", common | {"unsupported", "leaves", "modules"})
        check_text(spec["unsupported"], "spec unsupported")
        _validate_leaves(spec)
    else:
        raise fail("spec", f"unknown kind {kind!r:.40}")
    check_qualname(spec["root_type"], "spec root_type")
    for path in check_list(spec["training"], "spec training"):
        check_path(path, "spec training entry", allow_root=True)
    for path in check_list(spec["frozen"], "spec frozen"):
        check_path(path, "spec frozen entry")
    return spec


def _no_control_characters(value: Any, where: str) -> None:
    if isinstance(value, str):
        if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value):
            raise fail(where, f"text {value!r:.60} contains control characters (line breaks included)")
    elif isinstance(value, list):
        for item in value:
            _no_control_characters(item, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            _no_control_characters(key, where)
            _no_control_characters(item, where)


def validate_provenance(provenance: Any) -> dict[str, Any]:
    """Provenance is only displayed, never executed or used to build anything: an object of at most 256
    entries (size and depth are bounded by the parser) whose text holds no control characters, so that
    nothing printed from it can forge lines of pare's output."""
    if not isinstance(provenance, dict) or len(provenance) > 256:
        raise fail("provenance", "must be a JSON object of at most 256 entries")
    _no_control_characters(provenance, "provenance")
    return provenance
