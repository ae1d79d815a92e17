"""The module map of docs/design.md, enforced: which part of pare may import which (issue #14).

Every ``import`` in ``pare/`` (top level or inside a function) is mapped to the part it names; a part may import
parts of lower layers and itself only. Also: no module below the CLI imports the package root, no ``except
ImportError`` guards pare's own modules, no file in ``pare/`` (outside ``pare/graph``) exceeds 450 lines, and the
benchmarks import no private pieces of pare.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARE = REPO / "pare"

# Lowest first; the same table is drawn in docs/design.md. "<root>" is pare/__init__.py (the public namespace).
LAYERS: list[tuple[str, ...]] = [
    ("errors", "layers", "version"),
    ("models", "data", "graph", "count", "evaluate", "checks"),
    ("criteria", "compensate", "io", "records", "foreign"),
    ("train",),
    ("allocate", "latency", "methods", "report"),
    ("config",),
    ("repair",),
    ("prune",),
    ("prune_latency", "baselines"),
    ("pipeline",),
    ("<root>",),
    ("cli",),
]
LEVEL = {part: level for level, parts in enumerate(LAYERS) for part in parts}
MAX_LINES = 450


def _part(module: str) -> str:
    """'pare.allocate.search' -> 'allocate'; 'pare' -> '<root>'."""
    parts = module.split(".")
    return "<root>" if len(parts) == 1 else parts[1]


def _modules() -> list[tuple[Path, str, ast.Module]]:
    out = []
    for path in sorted(PARE.rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        out.append((path, name, ast.parse(path.read_text(encoding="utf-8"))))
    return out


def _imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, imported pare module) for every import of pare in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name == "pare" or a.name.startswith("pare.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "pare":
                # `from pare import report` names a submodule; `from pare import prune` the root's namespace.
                for alias in node.names:
                    sub = PARE / alias.name
                    is_module = sub.is_dir() or sub.with_suffix(".py").is_file()
                    found.append((node.lineno, f"pare.{alias.name}" if is_module else "pare"))
            elif node.module.startswith("pare."):
                found.append((node.lineno, node.module))
    return found


def test_every_part_is_in_the_layer_table() -> None:
    parts = {_part(name) for _, name, _ in _modules()}
    assert parts <= set(LEVEL), f"add to LAYERS (and docs/design.md): {sorted(parts - set(LEVEL))}"


def test_parts_import_only_lower_layers() -> None:
    violations = []
    for path, name, tree in _modules():
        source = _part(name)
        for line, target in _imports(tree):
            part = _part(target)
            if part != source and LEVEL[part] >= LEVEL[source]:
                violations.append(f"{path.relative_to(REPO)}:{line}: {source} (layer {LEVEL[source]}) imports "
                                  f"{target} (layer {LEVEL[part]})")
    assert not violations, "\n".join(violations)


def test_no_import_error_guards_around_pare_modules() -> None:
    violations = []
    for path, _, tree in _modules():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Try):
                continue
            guards = any(isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                         for h in node.handlers)
            body = ast.Module(body=node.body, type_ignores=[])
            if guards and _imports(body):
                violations.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not violations, "except ImportError around pare's own modules: " + ", ".join(violations)


def test_file_sizes() -> None:
    # pare/graph is being split on its own branch (issue #14 leaves it to that work).
    long = [f"{p.relative_to(REPO)} ({n} lines)" for p in PARE.rglob("*.py")
            if "graph" not in p.relative_to(PARE).parts and (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, "files over 450 lines: " + ", ".join(long)


def test_benchmarks_import_no_private_pieces() -> None:
    """The benchmarks reach pare through its public functions (pare.pipeline.run, pare.prune, ...), so that a
    benchmark row is what a user gets from the same configuration."""
    violations = []
    for path in sorted((REPO / "bench").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pare"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private or any(p.startswith("_") for p in node.module.split(".")):
                    violations.append(f"{path.name}:{node.lineno}: from {node.module} import {private or '...'}")
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and base.id == "pare":
                    violations.append(f"{path.name}:{node.lineno}: pare...{node.attr}")
    assert not violations, "\n".join(violations)
