"""Strict validation of everything an artifact file says, before any module, tensor or graph is built.

Threat model (this project's design, see docs/security.md): an artifact is a file from someone else. Nothing it
holds may be executed, name Python internals, or make pare allocate more memory than the file's own size. So
every field of the safetensors header and of the JSON spec is checked against the grammar below first, and
``load`` only builds what passed:

* every string that becomes a Python identifier (node, placeholder, parameter, buffer, child module and
  keyword-argument names, method names, the graph's class name) is an ASCII identifier, not a keyword and not
  a dunder (``__x``); module paths are dots between such names or decimal indices;
* every value has one of the allowed JSON types; no NaN/Infinity literals, no duplicate object keys;
* strings, lists, nesting depth, node and module counts and integer magnitudes are bounded;
* tensor shapes are bounded, and the safetensors header must describe exactly the bytes the file holds.

Every violation raises :class:`~pare.errors.CheckpointError` naming the field.
"""

from __future__ import annotations

import json
import keyword
import math
import re
from pathlib import Path
from typing import Any

from pare.errors import CheckpointError

MAX_HEADER_BYTES = 64 << 20  # safetensors JSON header (the spec lives inside it)
MAX_JSON_DEPTH = 64
MAX_LIST = 200_000  # items of any one list (graph nodes, leaves, tensors)
MAX_STRING = 4096
MAX_NAME = 255  # one identifier or module-path component
MAX_PATH = 2048  # dotted module / tensor path
MAX_DIMS = 8
MAX_DIM = 1 << 31
MAX_ELEMENTS = 1 << 40
MAX_INT = 1 << 62
MAX_LEAF_INT = 1 << 31  # constructor arguments of a layer
MAX_ZOO_INT = 1 << 16  # zoo options (class count, widths): the zoo builds its model before the file's tensors
_PRINTABLE = re.compile(r"[ -~]*")  # printable ASCII: no line breaks, no control or look-alike characters
_QUALNAME = re.compile(r"[A-Za-z0-9_.<>]{1,512}")
_NAMESPACES = ("operator", "torch", "torch.nn.functional", "builtins")
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def fail(where: str, problem: str) -> CheckpointError:
    """A CheckpointError ``artifact <where>: <problem>`` (the caller raises it)."""
    return CheckpointError(f"artifact {where}: {problem}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------------------------------------ names
def is_identifier(name: Any) -> bool:
    """ASCII Python identifier, not a keyword, at most MAX_NAME characters, not starting with ``__``."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= MAX_NAME
        and name.isascii()
        and name.isidentifier()
        and not keyword.iskeyword(name)
        and not name.startswith("__")
    )


def _is_part(part: str) -> bool:
    # Sequential/ModuleList children are named "0", "1", ...
    return is_identifier(part) or (0 < len(part) <= 12 and part.isascii() and part.isdigit())


def check_identifier(value: Any, where: str) -> str:
    if not is_identifier(value):
        raise fail(where, f"{_show(value)} is not a valid name (ASCII identifier, no keyword, no '__' prefix)")
    return value


def check_part(value: Any, where: str) -> str:
    if not (isinstance(value, str) and _is_part(value)):
        raise fail(where, f"{_show(value)} is not a valid module or tensor name")
    return value


def check_path(value: Any, where: str, *, allow_root: bool = False) -> str:
    """Dotted module/tensor path of identifiers or decimal indices (``layer1.0.conv1``)."""
    if allow_root and value == "":
        return value
    if not (isinstance(value, str) and 0 < len(value) <= MAX_PATH and all(map(_is_part, value.split(".")))):
        raise fail(where, f"{_show(value)} is not a valid module path")
    return value


def check_text(value: Any, where: str, limit: int = MAX_STRING) -> str:
    if not (isinstance(value, str) and len(value) <= limit and _PRINTABLE.fullmatch(value)):
        raise fail(where, f"{_show(value)} is not printable ASCII text of at most {limit} characters")
    return value


def check_qualname(value: Any, where: str) -> str:
    """A class's ``module.QualName`` (compared, never imported)."""
    if not (isinstance(value, str) and _QUALNAME.fullmatch(value)):
        raise fail(where, f"{_show(value)} is not a class name")
    return value


# ----------------------------------------------------------------------------------------------------- values
def check_int(value: Any, where: str, low: int = -MAX_INT, high: int = MAX_INT) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
        raise fail(where, f"{_show(value)} is not an integer in [{low}, {high}]")
    return value


def check_list(value: Any, where: str, limit: int = MAX_LIST) -> list[Any]:
    if not isinstance(value, list) or len(value) > limit:
        raise fail(where, f"expected a list of at most {limit} items, found {_show(value)}")
    return value


def check_object(value: Any, where: str, required: set[str], optional: set[str] = frozenset()) -> dict:
    """A JSON object with exactly the ``required`` keys plus any of ``optional``."""
    if not isinstance(value, dict):
        raise fail(where, f"expected an object, found {_show(value)}")
    missing = required - set(value)
    extra = set(value) - required - optional
    if missing or extra:
        detail = [f"missing {sorted(missing)}" if missing else "", f"unknown {_show(sorted(extra))}" if extra else ""]
        raise fail(where, "malformed object (" + ", ".join(d for d in detail if d) + ")")
    return value


def check_scalar(value: Any, where: str, int_limit: int = MAX_INT) -> Any:
    """None, bool, bounded int, finite float or printable string."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return check_int(value, where, -int_limit, int_limit)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise fail(where, f"non-finite number {value!r}")
        return value
    return check_text(value, where, 256)


def check_plain(value: Any, where: str, int_limit: int, depth: int = 0) -> Any:
    """A scalar or a (nested, at most 3 deep) list of scalars: layer and zoo constructor arguments."""
    if isinstance(value, list):
        if depth >= 3:
            raise fail(where, "argument nested too deeply")
        for item in check_list(value, where, 64):
            check_plain(item, where, int_limit, depth + 1)
        return value
    return check_scalar(value, where, int_limit)


def check_shape(value: Any, where: str) -> list[int]:
    dims = check_list(value, f"{where} shape", MAX_DIMS)
    elements = 1
    for dim in dims:
        elements *= check_int(dim, f"{where} shape", 0, MAX_DIM)
    if elements > MAX_ELEMENTS:
        raise fail(where, f"shape {_show(dims)} is too large")
    return dims


def check_target(op: str, target: Any, where: str) -> None:
    """Syntax of a graph node's target (the allowlist itself is applied by the graph loader)."""
    if op == "call_function":
        namespace, _, name = target.rpartition(":") if isinstance(target, str) else ("", "", "")
        if namespace not in _NAMESPACES or not is_identifier(name):
            raise fail(where, f"function {_show(target)} is not allowlisted (namespace:name)")
    elif op in ("call_method", "placeholder"):
        check_identifier(target, where)
    elif op in ("get_attr", "call_module"):
        check_path(target, where)
    elif target != "output":
        raise fail(where, f"output node target must be 'output', found {_show(target)}")


# ---------------------------------------------------------------------------------------------------- parsing
def _reject_constant(token: str) -> Any:
    raise ValueError(f"non-finite number {token} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        keys = [key for key, _ in pairs]
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"duplicate key {_show(duplicate)}")
    return result


def _depth(text: str) -> int:
    """Bracket nesting depth of a JSON text (brackets inside strings are counted too: an upper bound)."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def parse_json(text: Any, where: str, limit: int) -> Any:
    """``json.loads`` with size and depth bounds, no NaN/Infinity and no duplicate keys."""
    if not isinstance(text, (str, bytes)) or len(text) > limit:
        raise fail(where, f"is not a JSON text of at most {limit} bytes")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise fail(where, "is not UTF-8") from None
    if _depth(text) > MAX_JSON_DEPTH:
        raise fail(where, f"nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:
        raise fail(where, f"is not valid JSON ({' '.join(str(exc).split())[:200]})") from None


def read_header(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Tensor entries and string metadata of a safetensors file, checked before any tensor is read.

    The header must describe tensors of known dtypes and bounded shapes whose byte ranges tile the data area
    exactly, so that a file cannot make the reader allocate more than the file's own size.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: not a safetensors file or truncated (header length {length})")
        header = parse_json(handle.read(length), "header", MAX_HEADER_BYTES)
    if not isinstance(header, dict):
        raise fail("header", "is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise fail("header", "__metadata__ must map strings to strings")
    if len(header) > MAX_LIST:
        raise fail("header", f"lists {len(header)} tensors (at most {MAX_LIST})")
    spans = []
    for name, entry in header.items():
        where = f"tensor {_show(name)}"
        check_path(name, where)
        check_object(entry, where, {"dtype", "shape", "data_offsets"})
        itemsize = _SAFETENSORS_ITEMSIZE.get(entry["dtype"])
        if itemsize is None:
            raise fail(where, f"unknown dtype {_show(entry['dtype'])}")
        elements = math.prod(check_shape(entry["shape"], where))
        offsets = check_list(entry["data_offsets"], f"{where} data_offsets", 2)
        begin, end = (check_int(o, f"{where} data_offsets", 0, size) for o in offsets) if len(offsets) == 2 else (0, -1)
        if end - begin != elements * itemsize:
            raise fail(where, f"data_offsets {_show(offsets)} do not hold {elements} x {itemsize} bytes")
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise fail("header", "tensor byte ranges overlap or leave gaps")
        position = end
    if position != size - 8 - length:
        raise CheckpointError(
            f"{path}: truncated or padded safetensors file (header describes {position} data bytes, "
            f"file holds {size - 8 - length})"
        )
    return header, metadata
