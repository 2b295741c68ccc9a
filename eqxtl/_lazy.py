"""Lazy public names for a package, listed once in its ``__init__.pyi`` stub."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path


def _exports(stub: Path) -> dict[str, tuple[str, str]]:
    """``{public name: (relative module, attribute)}`` from the stub's relative imports."""
    out = {}
    for node in ast.parse(stub.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            for alias in node.names:
                out[alias.asname or alias.name] = (node.module, alias.name)
    return out


def attach_stub(package: str, init_file: str):
    """``(__getattr__, __dir__, __all__)`` for ``package``: every name that its
    ``__init__.pyi`` imports as ``from .x import name as name`` loads on first access."""
    exports = _exports(Path(init_file).with_suffix(".pyi"))
    module = sys.modules[package]

    def __getattr__(name: str):
        if name not in exports:
            if importlib.util.find_spec(f"{package}.{name}") is not None:  # a submodule
                return importlib.import_module(f"{package}.{name}")
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        relative, attr = exports[name]
        value = getattr(importlib.import_module(f"{package}.{relative}"), attr)
        setattr(module, name, value)
        return value

    def __dir__():
        return sorted(set(module.__dict__) | set(exports))

    return __getattr__, __dir__, sorted(exports)
