"""mkdocs hook: the API reference page is generated from ``eqxtl/__init__.pyi``, the one list
of public names, so it cannot miss a name or list a removed one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- api: generated from eqxtl/__init__.pyi -->"

# Subpackage -> section title, in the order of the layers (bottom up).
SECTIONS = {
    "models": "Models",
    "io": "Checkpoints in and out",
    "tuning": "What trains: filter specs, optimizer groups, adapters, zero-shot heads",
    "data": "Data",
    "training": "Training and evaluation",
    "_util": "Utilities",
    "errors": "Errors",
}


def public_names(stub: Path = ROOT / "eqxtl" / "__init__.pyi") -> dict[str, str]:
    """``{public name: its object's dotted path}`` from the stub's ``from .x import N as P``
    lines."""
    pattern = re.compile(r"^from \.([\w.]+) import (\w+) as (\w+)", re.M)
    found = pattern.findall(stub.read_text())
    return {public: f"eqxtl.{module}.{name}" for module, name, public in found}


def api_markdown() -> str:
    """One ``::: module.Name`` block per public name, grouped by subpackage."""
    groups: dict[str, list[tuple[str, str]]] = {key: [] for key in SECTIONS}
    for name, target in sorted(public_names().items(), key=lambda kv: kv[0].lower()):
        groups[target.split(".")[1]].append((name, target))
    out = []
    for key, title in SECTIONS.items():
        if groups[key]:
            out.append(f"## {title}\n")
            out.extend(
                f"::: {target}\n    options:\n      heading: eqxtl.{name}\n"
                for name, target in groups[key]
            )
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, api_markdown())
    return markdown
