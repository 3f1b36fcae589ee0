"""Module-level import graph of the package, read from the source (no import is executed).

Used by the architecture tests: DVC stage deps must cover what each stage's code imports, and
the package must have no import cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PKG = "whisper_obs_pruning"


def module_path(module: str) -> Path | None:
    base = SRC / module.replace(".", "/")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def top_level_imports(path: Path) -> set[str]:
    """Package modules imported at module level (not inside functions), absolute names."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    here = _module_name(path).split(".") if path.is_relative_to(SRC) else []
    package = here if is_pkg else here[:-1]
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith(PKG)}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith(PKG):
                continue
            found.add(mod)
            for a in node.names:  # `from . import x` may name a submodule
                if module_path(f"{mod}.{a.name}"):
                    found.add(f"{mod}.{a.name}")
    # importing a.b.c runs a/__init__ and a/b/__init__ first
    out = set()
    for mod in found:
        parts = mod.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return {m for m in out if module_path(m)}


def closure(start: Path) -> set[Path]:
    """Files of the package that importing ``start`` executes at module level."""
    seen: set[Path] = set()
    todo = [module_path(m) for m in top_level_imports(start)]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo += [module_path(m) for m in top_level_imports(p)]
    return seen


def graph() -> dict[str, set[str]]:
    return {
        _module_name(p): top_level_imports(p) - {_module_name(p)} for p in (SRC / PKG).rglob("*.py")
    }
