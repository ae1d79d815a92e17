"""Generate the hostile-artifact corpus in ``tests/fuzz/corpus/`` (committed; rerun after changing this file).

    python3 -m tests.fuzz.make_corpus

Each file is a tiny valid artifact with one field made hostile: a string field carrying a line break,
carriage return, quote or comment start followed by a statement that writes a ``PWNED_*`` marker file into the
working directory, a unicode look-alike, a dunder or an over-long name; or the structure made hostile: deep
nesting, enormous shapes and counts, a bad ``format_version``, NaN literals, duplicate keys, a lying
safetensors header, a truncated file. ``index.json`` maps each file name to its kind. The kinds cover every
attack of issue #11, in every string field of the three spec kinds (tree with an fx graph, zoo, skeleton).
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from torch import fx, nn

import pare
from pare.io.artifact import PROVENANCE_KEY, SPEC_KEY

CORPUS = Path(__file__).resolve().parent / "corpus"
MARKER_PREFIX = "PWNED"
INPUT_SHAPE = [1, 8, 8]


def marker_statement(tag: str) -> str:
    """Python that creates the file ``PWNED_<tag>`` in the working directory when executed."""
    return f"__import__('pathlib').Path('{MARKER_PREFIX}_{tag}').touch()"


def load_time_kwarg_key(tag: str) -> str:
    """The keyword-argument key of issue #11: fx splits lines on '\\n' only, Python also on '\\r', so this
    key ends ``forward`` early, runs the statement at module level when fx compiles the graph (load time),
    and then redefines ``forward`` so that the model still computes its outputs."""
    return f"start_dim=1)\r{marker_statement(tag)}\rdef forward(self, x):\r    return x.flatten(start_dim"


def _payloads(tag: str) -> dict[str, str]:
    run = marker_statement(tag)
    return {
        "newline": f"x\n{run}\n",
        "carriage-return": f"x\r{run}\r",
        "quote": f"x'); {run}; ('",
        "double-quote": f'x"); {run}; ("',
        "comment": f"x  # {run}",
        "lookalike": "c\u043env",  # Cyrillic o
        "fullwidth": "\uff43\uff4f\uff4e\uff56",  # NFKC-normalises to "conv"
        "zero-width": "conv\u200b",
        "dunder": "__globals__",
        "long": "a" * 5_000,
    }


class Tiny(nn.Module):
    """Input (N, 1, 8, 8) -> logits (N, 3); traced into a GraphModule with kwargs, methods and get_attr."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2, 3)
        self.register_buffer("scale", torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)), inplace=False) * self.scale
        y = F.adaptive_avg_pool2d(y, 1)
        return self.fc(torch.flatten(y, start_dim=1).contiguous())


class UserNet(nn.Module):
    """A class pare cannot rebuild (skeleton artifact)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(1, 2, 3))


def base_artifacts(folder: Path) -> dict[str, Path]:
    """The three valid tiny artifacts the corpus is mutated from: ``graph``, ``zoo``, ``skeleton``."""
    torch.manual_seed(0)
    models = {
        "graph": fx.symbolic_trace(Tiny()).eval(),
        "zoo": pare.models.create("small_cnn", width=2, num_classes=3).eval(),
        "skeleton": UserNet().eval(),
    }
    meta = {"input_shape": INPUT_SHAPE, "criterion": "l1"}
    return {name: pare.save(model, folder / f"{name}.safetensors", metadata=meta, reproducible=True)
            for name, model in models.items()}


def read_parts(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata())  # noqa: SIM118


def write(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    return safetensors_bytes(tensors, metadata=metadata)


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def raw_file(header: dict[str, Any], data: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


# ------------------------------------------------------------------------------------------------ string fields
Edit = Callable[[dict[str, Any], str], None]


def _node(spec: dict[str, Any], op: str) -> dict[str, Any]:
    return next(n for n in spec["tree"]["graph"]["nodes"] if n["op"] == op)


def _kwarg_node(spec: dict[str, Any]) -> dict[str, Any]:
    return next(n for n in spec["tree"]["graph"]["nodes"] if n["kwargs"]["d"])


def _set_kwarg_key(spec: dict[str, Any], value: str) -> None:
    _kwarg_node(spec)["kwargs"]["d"][0][0] = value


def _children(spec: dict[str, Any]) -> list[list[Any]]:
    return spec["tree"]["children"]


def _first_leaf(spec: dict[str, Any]) -> dict[str, Any]:
    return next(leaf for leaf in spec["leaves"] if "args" in leaf)


GRAPH_FIELDS: dict[str, Edit] = {
    "node-name": lambda s, v: _node(s, "call_function").update(name=v),
    "placeholder-target": lambda s, v: _node(s, "placeholder").update(target=v),
    "call-function-target": lambda s, v: _node(s, "call_function").update(target=f"torch:{v}"),
    "call-method-target": lambda s, v: _node(s, "call_method").update(target=v),
    "call-module-target": lambda s, v: _node(s, "call_module").update(target=v),
    "get-attr-target": lambda s, v: _node(s, "get_attr").update(target=v),
    "kwarg-key": _set_kwarg_key,
    "node-reference": lambda s, v: _node(s, "output")["args"]["t"].__setitem__(0, {"n": v}),
    "dtype-constant": lambda s, v: _kwarg_node(s)["kwargs"]["d"].append(["dtype", {"dtype": v}]),
    "class-name": lambda s, v: s["tree"].update(class_name=v),
    "child-name": lambda s, v: _children(s)[0].__setitem__(0, v),
    "buffer-name": lambda s, v: s["tree"]["buffers"][0].__setitem__(0, v),
    "leaf-type": lambda s, v: _children(s)[0][1].update(type=v),
    "leaf-arg-name": lambda s, v: _children(s)[0][1]["args"].__setitem__(v, 1),
    "leaf-arg-value": lambda s, v: _children(s)[0][1]["args"].update(padding_mode=v),
    "training-entry": lambda s, v: s["training"].append(v),
    "frozen-entry": lambda s, v: s["frozen"].append(v),
    "root-type": lambda s, v: s.update(root_type=v),
}
ZOO_FIELDS: dict[str, Edit] = {
    "zoo-name": lambda s, v: s["zoo"].update(name=v),
    "zoo-option-name": lambda s, v: s["zoo"]["kwargs"].__setitem__(v, 1),
    "zoo-option-value": lambda s, v: s["zoo"]["kwargs"].update(sparsity=v),
    "leaf-path": lambda s, v: _first_leaf(s).update(path=v),
    "module-path": lambda s, v: s["modules"][0].__setitem__(0, v),
    "module-type": lambda s, v: s["modules"][0].__setitem__(1, v),
}
SKELETON_FIELDS: dict[str, Edit] = {
    "unsupported-text": lambda s, v: s.update(unsupported=v),
    "kept-leaf-type": lambda s, v: s["leaves"].append({"path": "conv", "type": v, "kept": True}),
}
# Payloads that a field legitimately accepts are not hostile there (a padding mode may not contain a newline,
# but "a" * 20000 is also refused there; every payload below is refused in every listed field).
STRING_KINDS = ("newline", "carriage-return", "quote", "double-quote", "comment", "lookalike", "fullwidth",
                "zero-width", "dunder", "long")  # fmt: skip


def _spec_variants(bases: dict[str, Path]) -> Iterator[tuple[str, str, bytes]]:
    for base, fields in (("graph", GRAPH_FIELDS), ("zoo", ZOO_FIELDS), ("skeleton", SKELETON_FIELDS)):
        tensors, metadata = read_parts(bases[base])
        spec = json.loads(metadata[SPEC_KEY])
        for index, (field, edit) in enumerate(fields.items()):
            # Every field gets the line-break family; the other kinds rotate over the fields.
            kinds = ["newline", "carriage-return", *[STRING_KINDS[2 + (index + k) % 8] for k in range(0, 8, 3)]]
            for kind in kinds:
                tag = f"{field}-{kind}"
                mutated = copy.deepcopy(spec)
                edit(mutated, _payloads(tag)[kind])
                yield kind, f"{base}-{field}", write(tensors, {**metadata, SPEC_KEY: _dump(mutated)})
    tensors, metadata = read_parts(bases["graph"])
    spec = json.loads(metadata[SPEC_KEY])
    # The exploit of issue #11 itself, and its plain-newline form.
    for kind, key in (("kwarg-exploit", load_time_kwarg_key("kwarg-exploit")),
                      ("kwarg-exploit", f"start_dim=1)\n{marker_statement('kwarg-newline')}\nz = dict(a")):
        mutated = copy.deepcopy(spec)
        _set_kwarg_key(mutated, key)
        yield kind, "graph-kwarg-key", write(tensors, {**metadata, SPEC_KEY: _dump(mutated)})
    # Provenance: free text, but no control characters, bounded.
    for kind, value in (("newline", f"x\n{marker_statement('provenance')}"), ("comment", "x\x00#")):
        provenance = json.loads(metadata[PROVENANCE_KEY])
        provenance["criterion"] = value
        yield kind, "provenance-value", write(tensors, {**metadata, PROVENANCE_KEY: json.dumps(provenance)})
    # A tensor name in the safetensors header.
    hostile_name = "conv.weight\n" + marker_statement("tensor")
    renamed = {(hostile_name if k == "conv.weight" else k): v for k, v in tensors.items()}
    yield "newline", "tensor-name", write(renamed, metadata)
    yield "newline", "metadata-key", write(tensors, {**metadata, "x\n" + marker_statement("meta"): "1"})


# ------------------------------------------------------------------------------------------- structural kinds
def _structural(bases: dict[str, Path]) -> Iterator[tuple[str, str, bytes]]:
    tensors, metadata = read_parts(bases["graph"])
    text = metadata[SPEC_KEY]
    spec = json.loads(text)

    def with_spec(new: Any) -> bytes:
        return write(tensors, {**metadata, SPEC_KEY: new if isinstance(new, str) else json.dumps(new)})

    def edited(edit: Callable[[dict[str, Any]], None]) -> bytes:
        mutated = copy.deepcopy(spec)
        edit(mutated)
        return with_spec(mutated)

    for version in (-7, 0, 2, 10**30, "1", True, 1.0, None):
        yield "version", f"format-version-{version!r}", edited(lambda s, v=version: s.update(format_version=v))
    yield "version", "format-version-missing", edited(lambda s: s.pop("format_version"))
    deep = "[" * 5000 + "]" * 5000
    yield "deep", "args-5000-deep", with_spec(text.replace('"args":{"t":[]}', f'"args":{{"t":[{deep}]}}', 1))
    nested: Any = {"n": "x"}
    for _ in range(100):
        nested = {"t": [nested]}
    yield "deep", "args-100-tuples", edited(lambda s: _node(s, "output")["args"]["t"].__setitem__(0, nested))
    tree: Any = {"kind": "holder", "children": [], "params": [], "buffers": []}
    for _ in range(60):
        tree = {"kind": "holder", "children": [["m", tree]], "params": [], "buffers": []}
    yield "deep", "module-tree-60-deep", edited(lambda s: _children(s).append(["deep", tree]))
    yield "deep", "provenance-deep", write(tensors, {**metadata, PROVENANCE_KEY: "[" * 3000 + "]" * 3000})
    yield "huge", "param-shape", edited(lambda s: s["tree"]["buffers"][0].__setitem__(1, [2**40, 2**40]))
    yield "huge", "leaf-channels", edited(lambda s: _children(s)[0][1]["args"].update(out_channels=10**12))
    yield "huge", "negative-shape", edited(lambda s: s["tree"]["buffers"][0].__setitem__(1, [-1]))
    yield "huge", "huge-int-arg", edited(lambda s: _kwarg_node(s)["kwargs"]["d"].__setitem__(0, ["start_dim", 10**40]))
    zoo_tensors, zoo_metadata = read_parts(bases["zoo"])
    zoo_spec = json.loads(zoo_metadata[SPEC_KEY])
    for option, value in (("num_classes", 10**9), ("width", 10**6)):
        mutated = copy.deepcopy(zoo_spec)
        mutated["zoo"]["kwargs"][option] = value
        yield "huge", f"zoo-{option}", write(zoo_tensors, {**zoo_metadata, SPEC_KEY: _dump(mutated)})
    header = {"__metadata__": metadata, "w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}}
    yield "huge", "header-tensor-shape", raw_file(header, bytes(16))
    yield "huge", "header-length-claim", raw_file(header, bytes(16), length=2**60)
    yield "huge", "header-dtype", raw_file({**header, "w": {**header["w"], "dtype": "PICKLE", "shape": [4]}}, bytes(16))
    yield "structure", "nan-literal", with_spec(text.replace('"format_version":1', '"format_version":1,"x":NaN'))
    yield "structure", "duplicate-key", with_spec(text.replace('"kind":"tree"', '"kind":"tree","kind":"zoo"', 1))
    yield "structure", "unknown-key", edited(lambda s: s.update(code="import os"))
    yield "structure", "spec-not-object", with_spec("[1, 2]")
    yield "structure", "spec-not-json", with_spec("{'format_version': 1")
    yield "structure", "kwargs-as-list", edited(lambda s: _kwarg_node(s).update(kwargs={"l": []}))
    yield "structure", "unknown-arg-tag", edited(
        lambda s: _node(s, "output")["args"]["t"].__setitem__(0, {"code": "x"}))
    yield "structure", "unknown-op", edited(lambda s: _node(s, "call_function").update(op="exec"))
    yield "structure", "function-not-allowlisted", edited(
        lambda s: _node(s, "call_function").update(target="builtins:eval"))
    yield "structure", "method-not-allowed", edited(lambda s: _node(s, "call_method").update(target="register_hook"))
    valid = write(tensors, metadata)
    yield "truncated", "truncated-half", valid[: len(valid) // 2]
    yield "truncated", "truncated-header", valid[:20]
    yield "truncated", "empty", b""


def generate(folder: Path = CORPUS) -> dict[str, str]:
    """Write the corpus and its ``index.json`` (file name -> kind); return the index."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    bases_dir = folder / "_bases"
    bases_dir.mkdir()
    bases = base_artifacts(bases_dir)
    index: dict[str, str] = {}
    for number, (kind, field, data) in enumerate([*_spec_variants(bases), *_structural(bases)]):
        name = f"{number:03d}-{kind}-{field}.safetensors"
        (folder / name).write_bytes(data)
        index[name] = kind
    shutil.rmtree(bases_dir)
    (folder / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return index


if __name__ == "__main__":
    result = generate()
    size = sum(p.stat().st_size for p in CORPUS.iterdir())
    print(f"wrote {len(result)} hostile artifacts ({size / 1e3:.0f} kB) to {CORPUS}")
