"""The package's shape (issue 20): layered subpackages, short functions, small modules, no
public name shadowed by a module, a bounded public surface, and architecture facts only in
``models/``. Each check reads the source; none imports JAX."""

import ast
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "eqxtl"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_BODY_LINES = 80
MAX_MODULE_LINES = 620  # "no module over ~600 lines"
MAX_TOP_LEVEL_FILES = 8
MAX_PUBLIC_NAMES = 110
# Names that only models/ may spell out in code (strings and identifiers, not docstrings or
# comments): the families and the checkpoint libraries.
ARCHITECTURE_WORDS = re.compile(
    r"\b(clip|resnet|efficientnet|vit|dinov2|siglip|mixer|timm|open_clip|transformers|"
    r"big_vision|torchvision)\b",
    re.IGNORECASE,
)


def _relative(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = fn.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return 0 if not body else body[-1].end_lineno - body[0].lineno + 1


def test_no_function_body_over_80_lines():
    long = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if (n := _body_lines(node)) > MAX_BODY_LINES:
                    long.append(f"{_relative(path)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"function bodies over {MAX_BODY_LINES} lines: {long}"


def test_no_module_over_600_lines():
    big = [
        f"{_relative(p)} ({n})"
        for p in MODULES
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_at_most_8_files_at_the_top():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_FILES, top


def _public_names() -> set[str]:
    stub = ast.parse((PACKAGE / "__init__.pyi").read_text())
    return {
        alias.asname or alias.name
        for node in stub.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }


def test_public_surface_is_bounded():
    names = _public_names()
    assert len(names) <= MAX_PUBLIC_NAMES, len(names)


def test_public_stub_imports_resolve_to_existing_modules():
    missing = []
    for node in ast.parse((PACKAGE / "__init__.pyi").read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = PACKAGE.joinpath(*node.module.split("."))
            if not (base.with_suffix(".py").exists() or (base / "__init__.py").exists()):
                missing.append(node.module)
    assert not missing, missing


def test_no_public_name_is_shadowed_by_a_module():
    names = _public_names()
    modules = {p.stem for p in MODULES if p.stem != "__init__"}
    modules |= {p.parent.name for p in MODULES if p.stem == "__init__"}
    assert not names & modules, f"modules named like public names: {sorted(names & modules)}"


def _code_tokens(source: str) -> list[tuple[int, str]]:
    """``(line, text)`` of every name and string token that is not a docstring."""
    docstrings = set()  # every line of a bare string statement (module, class, attribute docs)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docstrings.update(range(node.lineno, node.end_lineno + 1))
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.NAME, tokenize.STRING) and tok.start[0] not in docstrings:
            out.append((tok.start[0], tok.string))
    return out


def test_architecture_facts_live_in_models():
    found = []
    for path in MODULES:
        if path.parent.name == "models" or "models" in path.relative_to(PACKAGE).parts:
            continue
        if path.suffix != ".py":
            continue
        for line, text in _code_tokens(path.read_text()):
            if ARCHITECTURE_WORDS.search(text):
                found.append(f"{_relative(path)}:{line} {text[:60]}")
    assert not found, "architecture or library names outside models/:\n" + "\n".join(found)


def test_imports_only_go_down():
    """The import-linter contract in pyproject.toml: models < io < tuning | data < training
    < cli."""
    lint = Path(sys.executable).parent / "lint-imports"
    run = subprocess.run([str(lint)], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
