"""Property-based mutation of valid artifacts (hypothesis), shared by tests/test_fuzz.py and
bench/fuzz_artifacts.py.

One example: pick one of the three tiny base artifacts of :mod:`tests.fuzz.make_corpus`, pick 1-3 places in
its JSON spec (or provenance), and replace the value there, delete or add a key, or rename a key, using values
drawn from the hostile payloads, arbitrary text, extreme numbers and nested containers. The mutated file is
loaded with ``pare.load``; if it loads, the model also runs once on a (1, 1, 8, 8) input, because code that fx
generated only runs then. The outcome must be a model or a ``PareError``, never another exception, and no
``PWNED_*`` marker may appear in the working directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hypothesis import strategies as st

import pare
from pare.errors import PareError
from pare.io.artifact import PROVENANCE_KEY, SPEC_KEY
from tests.fuzz.make_corpus import MARKER_PREFIX, _payloads, base_artifacts, load_time_kwarg_key, read_parts, write

Bases = dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]


def make_bases(folder: Path) -> Bases:
    """Tensors and metadata of the three valid base artifacts, written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return {name: read_parts(path) for name, path in base_artifacts(folder).items()}


def _hostile_texts() -> list[str]:
    texts = [text for kind, text in _payloads("mutation").items() if kind != "long"]
    return [*texts, load_time_kwarg_key("mutation"), "a" * 300, "", "0", "x.y", "__class__", "torch:eval",
            "builtins:eval", "os:system", "Conv2d", "BatchNorm2d", "Linear", "output", "start_dim"]


_scalars = st.one_of(
    st.sampled_from(_hostile_texts()),
    st.text(max_size=40),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2, 2**31, 2**40, -7]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.none(),
    st.booleans(),
)
values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(["n", "t", "l", "d", "s", "e", "f", "dtype", "kind"]),
                                  st.sampled_from(_hostile_texts())), inner, max_size=3),
    ),
    max_leaves=12,
)


def _locations(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (tuple of keys/indices) into a JSON value, the root included."""
    found = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _locations(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _locations(value, (*path, index))
    return found


def _get(root: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        root = root[key]
    return root


@st.composite
def mutated_artifacts(draw: Callable[..., Any], bases: Bases) -> bytes:
    """Bytes of one mutated artifact (see the module docstring)."""
    base = draw(st.sampled_from(sorted(bases)))
    tensors, metadata = bases[base]
    section = draw(st.sampled_from([SPEC_KEY, SPEC_KEY, SPEC_KEY, PROVENANCE_KEY]))
    document = json.loads(metadata[section])
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_locations(document)))
        target = _get(document, path)
        action = draw(st.sampled_from(["replace", "delete", "add", "rename"]))
        if not path or action == "replace":
            if path:
                _get(document, path[:-1])[path[-1]] = draw(values)
            continue
        parent = _get(document, path[:-1])
        if action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(target, dict):
            target[draw(st.sampled_from(_hostile_texts()))] = draw(values)
        elif action == "add" and isinstance(target, list):
            target.append(draw(values))
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(st.sampled_from(_hostile_texts()))] = parent.pop(path[-1])
    return write(tensors, {**metadata, section: json.dumps(document)})


def markers(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith(MARKER_PREFIX))


def load_and_run(path: Path) -> str:
    """``"loaded"`` or ``"refused"`` for a mutated artifact; any other exception propagates (a bug)."""
    try:
        model = pare.load(path)
    except PareError:
        return "refused"
    try:
        # fx prints the generated code of a failing forward to stderr; the failure itself is expected here.
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            model.eval()(torch.randn(1, 1, 8, 8))
    except Exception:  # a mutated but well-formed model may not compute; only what it executes matters here
        pass
    return "loaded"
