"""Pickle-free artifacts of (pruned) models: one safetensors file = all tensors + JSON architecture +
provenance.

Layout of the safetensors string metadata:

* ``pare.format`` = ``"pare-artifact"``
* ``pare.spec``: JSON architecture spec (``format_version``, ``kind``, ...), see below.
* ``pare.provenance``: JSON provenance (pare/torch version, git commit, timestamp, source sha256, user
  metadata).

The tensor entries are every parameter and buffer of the model (non-persistent buffers included), by dotted
name.

Spec kinds:

* ``"zoo"``: the model has ``pare_zoo = {"name", "kwargs"}``. ``load`` calls ``pare.models.create`` and
  replaces every leaf by the stored one (pruned layers are leaves of the same types with smaller constructor
  arguments).
* ``"tree"``: the model is built only from containers (Sequential, ModuleList, ModuleDict, plain ``nn.Module``
  holders, ``torch.fx.GraphModule`` with its graph stored as JSON) and allowlisted leaves: rebuilt from the
  spec.
* ``"skeleton"``: any other class. ``load`` needs ``skeleton=``, an instance of the unpruned class, and
  replaces its leaves.

Leaves whose type is not allowlisted are recorded by class name and taken unchanged from the zoo model or the
skeleton (their tensors still come from the file). No code is ever imported or evaluated from the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from pare import models
from pare.errors import CheckpointError, PareError
from pare.io._atomic import atomic_write_bytes
from pare.io._fxjson import build_graph_module, graph_from_json, graph_to_json
from pare.io._layers import build_leaf, describe_leaf, is_supported_leaf, qualified_name
from pare.io._meta import meta_init
from pare.io._provenance import build_provenance, canonical_safetensors
from pare.io._schema import MAX_HEADER_BYTES, parse_json, read_header
from pare.io._validate import FORMAT_VERSIONS, validate_provenance, validate_spec
from pare.io.checkpoint import ARTIFACT_FORMAT, ARTIFACT_FORMAT_KEY, read_safetensors

FORMAT_VERSION = max(FORMAT_VERSIONS)
MAX_PROVENANCE_BYTES = 1 << 18
SPEC_KEY = "pare.spec"
PROVENANCE_KEY = "pare.provenance"


class _Unsupported(Exception):
    """Internal: the module tree contains a module the generic tree spec cannot describe."""


# --------------------------------------------------------------------------------------------------- describe
def _own_tensors(module: nn.Module) -> tuple[list[list[Any]], list[list[Any]]]:
    params = [[name, list(p.shape)] for name, p in module._parameters.items() if p is not None]
    buffers = [
        [name, list(b.shape), name not in module._non_persistent_buffers_set]
        for name, b in module._buffers.items()
        if b is not None
    ]
    return params, buffers


def _describe_tree(module: nn.Module, path: str) -> dict[str, Any]:
    """Generic description of a container/leaf tree; raises _Unsupported at the first foreign module."""
    kind_of = {
        nn.Sequential: "sequential",
        nn.ModuleList: "modulelist",
        nn.ModuleDict: "moduledict",
        nn.Module: "holder",
    }
    if isinstance(module, fx.GraphModule):
        kind = "graph"
    elif type(module) in kind_of:
        kind = kind_of[type(module)]
    elif is_supported_leaf(module):
        return {"kind": "leaf", **describe_leaf(module, path)}
    else:
        raise _Unsupported(f"{path or '<root>'} ({qualified_name(type(module))})")
    params, buffers = _own_tensors(module)
    children = [
        [name, _describe_tree(child, f"{path}.{name}" if path else name)]
        for name, child in module._modules.items()
        if child is not None
    ]
    desc: dict[str, Any] = {"kind": kind, "children": children, "params": params, "buffers": buffers}
    if isinstance(module, fx.GraphModule):
        desc["graph"] = graph_to_json(module.graph)
        desc["class_name"] = type(module).__name__
    return desc


def _describe_leaves(model: nn.Module) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Every leaf (childless module) with its constructor args, and the class of every non-leaf module."""
    leaves: list[dict[str, Any]] = []
    inner: list[list[str]] = []
    for path, module in model.named_modules(remove_duplicate=False):
        if any(True for _ in module.children()):
            inner.append([path, qualified_name(type(module))])
        elif path == "":
            continue  # a childless root is the skeleton itself; root_type checks its class
        elif is_supported_leaf(module):
            leaves.append({"path": path, **describe_leaf(module, path)})
        else:
            leaves.append({"path": path, "type": qualified_name(type(module)), "kept": True})
    return leaves, inner


def _zoo_entry(model: nn.Module) -> dict[str, Any] | None:
    zoo = getattr(model, "pare_zoo", None)
    if not isinstance(zoo, dict) or not isinstance(zoo.get("name"), str):
        return None
    kwargs = zoo.get("kwargs") or {}
    try:
        entry = json.loads(json.dumps({"name": zoo["name"], "kwargs": kwargs}))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"model.pare_zoo kwargs are not JSON-serialisable: {exc}") from None
    return entry


def build_spec(model: nn.Module) -> dict[str, Any]:
    """The JSON architecture spec of ``model`` (see module docstring)."""
    spec: dict[str, Any] = {"format_version": FORMAT_VERSION, "root_type": qualified_name(type(model))}
    zoo = _zoo_entry(model)
    if zoo is not None and not isinstance(model, fx.GraphModule):
        leaves, inner = _describe_leaves(model)
        spec.update(kind="zoo", zoo=zoo, leaves=leaves, modules=inner)
    else:
        try:
            spec.update(kind="tree", tree=_describe_tree(model, ""))
        except _Unsupported as exc:
            if isinstance(model, fx.GraphModule):
                # A skeleton could not carry the rewritten graph arguments, so the reload would be wrong.
                raise CheckpointError(
                    f"cannot store this GraphModule: it contains {exc}, which is neither a container nor an "
                    "allowlisted layer"
                ) from None
            leaves, inner = _describe_leaves(model)
            spec.update(kind="skeleton", unsupported=str(exc), leaves=leaves, modules=inner)
    spec["training"] = [path for path, m in model.named_modules(remove_duplicate=False) if m.training]
    spec["frozen"] = [
        name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad
    ]
    return spec


# ------------------------------------------------------------------------------------------------------- save
def _collect_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        # Copies: safetensors refuses tensors that share storage (tied weights, views of one buffer).
        tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
    return tensors


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    metadata: dict[str, Any] | None = None,
    reproducible: bool = False,
) -> Path:
    """Write ``model`` as a pare artifact (one safetensors file) atomically; return the path.

    Two saves of the same model with the same metadata give byte-identical files when the creation time is
    fixed: set ``SOURCE_DATE_EPOCH`` or pass ``reproducible=True`` (no time recorded).

    Args:
        model: any module; zoo models, container/GraphModule trees and other classes are all accepted (the
            last need ``skeleton=`` to load).
        path: destination file (conventionally ``*.safetensors``); its directory must exist.
        metadata: JSON-able user provenance merged into the provenance record, e.g. ``criterion``, ``budget``,
            ``source_sha256`` (sha256 of the checkpoint the model was pruned from).
        reproducible: record no creation time unless ``SOURCE_DATE_EPOCH`` gives one.

    Raises:
        CheckpointError: a module or argument that cannot be stored; ConfigError: bad metadata or
            ``SOURCE_DATE_EPOCH``.
    """
    from safetensors.torch import save as safetensors_bytes

    spec = build_spec(model)
    provenance = build_provenance(metadata, reproducible=reproducible)
    header = {
        ARTIFACT_FORMAT_KEY: ARTIFACT_FORMAT,
        SPEC_KEY: json.dumps(spec, separators=(",", ":")),
        PROVENANCE_KEY: json.dumps(provenance, separators=(",", ":")),
    }
    data = canonical_safetensors(safetensors_bytes(_collect_tensors(model), metadata=header))
    return atomic_write_bytes(path, data)


# ------------------------------------------------------------------------------------------------------- load
def _parse_header(metadata: dict[str, str], path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Spec and provenance of an artifact's string metadata, validated against the whole schema."""
    if metadata.get(ARTIFACT_FORMAT_KEY) != ARTIFACT_FORMAT:
        raise CheckpointError(
            f"{path}: not a pare artifact (safetensors metadata lacks {ARTIFACT_FORMAT_KEY})"
        )
    unknown = sorted(set(metadata) - {ARTIFACT_FORMAT_KEY, SPEC_KEY, PROVENANCE_KEY})
    if unknown or SPEC_KEY not in metadata:
        problem = f"unknown metadata keys {unknown!r:.80}" if unknown else f"no {SPEC_KEY} entry"
        raise CheckpointError(f"{path}: malformed artifact ({problem})")
    try:
        spec = validate_spec(parse_json(metadata[SPEC_KEY], "spec", MAX_HEADER_BYTES))
        provenance = validate_provenance(
            parse_json(metadata.get(PROVENANCE_KEY, "{}"), "provenance", MAX_PROVENANCE_BYTES)
        )
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return spec, provenance


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"spec": ..., "provenance": ...}`` of an artifact, read from the header only (no model is built).

    Raises:
        CheckpointError: missing or corrupt file, or a header that breaks the schema (:mod:`pare.io._validate`).
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"{file}: no such artifact file")
    _, metadata = read_header(file)
    spec, provenance = _parse_header(metadata, file)
    return {"spec": spec, "provenance": provenance}


def _placeholder(shape: Any, where: str) -> torch.Tensor:
    if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise CheckpointError(f"artifact spec: tensor '{where}' has a malformed shape {shape!r}")
    return torch.empty(shape, device="meta")


def _build_tree(desc: Any, path: str) -> nn.Module:
    if not isinstance(desc, dict):
        raise CheckpointError(f"artifact spec: module '{path or '<root>'}' is malformed")
    kind = desc.get("kind")
    if kind == "leaf":
        with meta_init():
            return build_leaf(desc, path)
    containers: dict[str, type[nn.Module]] = {
        "sequential": nn.Sequential,
        "modulelist": nn.ModuleList,
        "moduledict": nn.ModuleDict,
        "holder": nn.Module,
        "graph": nn.Module,
    }
    if kind not in containers:
        raise CheckpointError(f"artifact spec: module '{path or '<root>'}' has unknown kind {kind!r}")
    module = containers[kind]()
    try:
        for name, child in desc.get("children", []):
            module.add_module(name, _build_tree(child, f"{path}.{name}" if path else name))
        for name, shape in desc.get("params", []):
            module.register_parameter(name, nn.Parameter(_placeholder(shape, f"{path}.{name}")))
        for name, shape, persistent in desc.get("buffers", []):
            module.register_buffer(name, _placeholder(shape, f"{path}.{name}"), persistent=bool(persistent))
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"artifact spec: module '{path or '<root>'}' is malformed ({exc})") from None
    if kind != "graph":
        return module
    graph = graph_from_json(desc.get("graph"))
    return build_graph_module(module, graph, desc.get("class_name", "GraphModule"), path or "<root>")


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, name = path.split(".")
    owner = root
    for part in parents:
        child = owner._modules.get(part)
        if child is None:
            raise CheckpointError(f"skeleton has no submodule '{'.'.join(parents)}' to hold leaf '{path}'")
        owner = child
    owner._modules[name] = module


def _replace_leaves(skeleton: nn.Module, spec: dict[str, Any], source: str) -> nn.Module:
    if qualified_name(type(skeleton)) != spec.get("root_type"):
        raise CheckpointError(
            f"{source} is a {qualified_name(type(skeleton))}, "
            f"the artifact was saved from a {spec.get('root_type')}"
        )
    modules = dict(skeleton.named_modules(remove_duplicate=False))
    for path, type_name in spec.get("modules", []):
        found = modules.get(path)
        if found is None or qualified_name(type(found)) != type_name:
            have = "nothing" if found is None else qualified_name(type(found))
            raise CheckpointError(
                f"{source} does not match the artifact: at '{path}' expected {type_name}, has {have}"
            )
    for leaf in spec.get("leaves", []):
        path = leaf.get("path") if isinstance(leaf, dict) else None
        if not isinstance(path, str) or not path:
            raise CheckpointError(f"artifact spec: malformed leaf entry {str(leaf)[:120]}")
        if leaf.get("kept"):
            found = modules.get(path)
            if found is None or qualified_name(type(found)) != leaf.get("type"):
                raise CheckpointError(
                    f"{source} does not match the artifact: leaf '{path}' must be a {leaf.get('type')} "
                    "(not allowlisted, so it is taken from the skeleton)"
                )
            continue
        with meta_init():
            replacement = build_leaf(leaf, path)
        _set_submodule(skeleton, path, replacement)
    return skeleton


def _assign_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], frozen: set[str], path: Path) -> None:
    """Put every file tensor in its slot (keeping the file's dtype); strict about names and shapes."""
    slots: dict[str, tuple[nn.Module, str, bool]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name, param in module._parameters.items():
            if param is not None:
                slots[f"{prefix}.{name}" if prefix else name] = (module, name, True)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                slots[f"{prefix}.{name}" if prefix else name] = (module, name, False)
    missing = sorted(set(slots) - set(tensors))
    unexpected = sorted(set(tensors) - set(slots))
    mismatched = []
    for key in sorted(set(slots) & set(tensors)):
        module, name, is_param = slots[key]
        current = module._parameters[name] if is_param else module._buffers[name]
        if current is not None and current.shape != tensors[key].shape:
            mismatched.append(f"{key} file {tuple(tensors[key].shape)} vs rebuilt {tuple(current.shape)}")
    if missing or unexpected or mismatched:
        parts = []
        for label, names in (
            ("missing from file", missing),
            ("not in model", unexpected),
            ("shape", mismatched),
        ):
            if names:
                more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
                parts.append(f"{label}: {', '.join(names[:5])}{more}")
        raise CheckpointError(f"{path}: tensors do not fit the rebuilt model: " + "; ".join(parts))
    for key, (module, name, is_param) in slots.items():
        if is_param:
            module._parameters[name] = nn.Parameter(tensors[key], requires_grad=key not in frozen)
        else:
            module._buffers[name] = tensors[key]


def load(path: str | os.PathLike[str], *, skeleton: nn.Module | None = None) -> nn.Module:
    """Rebuild the model saved by :func:`save` (on CPU), with its dtypes, training flags and frozen
    parameters.

    Args:
        path: the artifact file.
        skeleton: an instance of the unpruned model class. Required for ``"skeleton"`` artifacts (user
            classes); for ``"zoo"`` artifacts it replaces the ``pare.models.create`` call; ignored for
            ``"tree"`` artifacts. It is modified in place (its leaves are replaced) and returned.

    Raises:
        CheckpointError: corrupt file, unknown/unsafe spec, skeleton missing or of the wrong class, tensors
            that do not fit the rebuilt modules.
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"{file}: no such artifact file")
    # Header and spec are checked in full before any tensor is read or any module built.
    _, metadata = read_header(file)
    spec, _ = _parse_header(metadata, file)
    tensors, _ = read_safetensors(file)
    try:
        model = _rebuild(spec, tensors, skeleton, file)
    except PareError:
        raise
    except Exception as exc:  # a file that passed the schema can still make a constructor or fx fail
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        raise CheckpointError(f"{file}: cannot rebuild the model ({reason})") from None
    training = set(spec["training"])
    for module_path, module in model.named_modules(remove_duplicate=False):
        module.training = module_path in training
    return model


def _rebuild(
    spec: dict[str, Any], tensors: dict[str, torch.Tensor], skeleton: nn.Module | None, file: Path
) -> nn.Module:
    """The model of a validated spec, holding the file's tensors."""
    kind = spec["kind"]
    if kind == "tree":
        model = _build_tree(spec["tree"], "")
    else:
        if skeleton is not None:
            base, source = skeleton, "skeleton"
        elif kind == "zoo":
            base, source = _create_zoo_model(spec["zoo"], file), "zoo model"
        else:
            raise CheckpointError(
                f"{file}: saved from {spec['root_type']}, which pare cannot rebuild on its own "
                f"({spec['unsupported']}); pass skeleton= an instance of that class"
            )
        model = _replace_leaves(base, spec, source)
    _assign_tensors(model, tensors, set(spec["frozen"]), file)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{file}: the file holds no data for {', '.join(left[:5])}")
    return model


def _create_zoo_model(zoo: Any, path: Path) -> nn.Module:
    if not isinstance(zoo, dict) or not isinstance(zoo.get("name"), str) or not isinstance(zoo.get("kwargs"), dict):
        raise CheckpointError(f"{path}: artifact zoo entry is malformed")
    try:
        # Built on the meta device: every tensor comes from the file, so a file claiming an enormous zoo model
        # cannot make pare allocate more than the file holds.
        with meta_init():
            model = models.create(zoo["name"], **zoo["kwargs"])
    except Exception as exc:  # the zoo raises its own errors for unknown names / bad kwargs
        raise CheckpointError(f"{path}: cannot create zoo model {zoo['name']!r}: {exc}") from None
    return model
