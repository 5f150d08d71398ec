"""The layout's layers hold: the numerical core imports no app module, and no module imports loop.

Imports are read from the source (``ast``), function-level imports included: an import inside a
function that closes a loop is a cycle too.
"""

from __future__ import annotations

import pytest

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cg3d_bids"
#: What the core may import from the rest of cg3d_bids: the shared base modules.
CORE_MAY_IMPORT = {"cg3d_bids.errors", "cg3d_bids.atomic", "cg3d_bids.hashing"}
#: Third-party packages the core must never import.
CORE_FORBIDDEN = ("bids", "nipype", "jinja2", "matplotlib", "nilearn")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


@pytest.mark.slow
def test_core_imports_nothing_of_the_app():
    for path in (PACKAGE / "core").rglob("*.py"):
        for name in _imports(path):
            if name.startswith("cg3d_bids.") and not name.startswith("cg3d_bids.core"):
                allowed = any(name == m or name.startswith(m + ".") for m in CORE_MAY_IMPORT)
                assert allowed, f"{path.relative_to(PACKAGE)} imports {name}"
            assert name.split(".")[0] not in CORE_FORBIDDEN, f"{path.relative_to(PACKAGE)} imports {name}"


@pytest.mark.slow
def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    edges = {m: {d for d in deps if not (m and d.startswith(m + "."))} for m, deps in graph.items()}
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        seen[node] = 1
        stack.append(node)
        for dep in sorted(edges[node]):
            if seen.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in seen:
                visit(dep)
        stack.pop()
        seen[node] = 2

    for module in sorted(edges):
        if module not in seen:
            visit(module)


def test_the_cycle_check_can_fail(tmp_path, monkeypatch):
    """A planted two-module loop (one import inside a function) is found."""
    pkg = tmp_path / "cg3d_bids"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    try:
        test_no_import_cycles()
    except AssertionError as exc:
        assert "cg3d_bids.a -> cg3d_bids.b -> cg3d_bids.a" in str(exc)
    else:
        raise AssertionError("the planted cycle was not found")


def test_the_command_line_starts_without_torch():
    """``cg3d --help``/``--version`` and argument errors answer in about a second: the command
    line, its settings and the encoder registry import no torch/timm (the stages do, when run)."""
    import subprocess
    import sys

    code = ("import sys, cg3d_bids.cli.main, cg3d_bids.settings, cg3d_bids.core.models; "
            "from cg3d_bids.core.models import all_encoder_names; all_encoder_names(); "
            "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
