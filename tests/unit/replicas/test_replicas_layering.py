"""replicas/ sits below the gateway (DESIGN.md, Packages and layers): it imports only core/,
itself and third-party code, never gateway/, geo/, health/, loadtests/ or tests/. Every import
statement counts, including those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
FORBIDDEN = ("gateway", "geo", "health", "loadtests", "tests")


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            out.append((node.lineno, str(node.args[0].value)))
    return out


def back_edges(package: Path) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        for line, module in _imported_modules(path):
            if module.split(".")[0] in FORBIDDEN:
                found.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    return found


def test_replicas_imports_only_core_and_itself():
    assert (ROOT / "replicas" / "sync" / "agent.py").is_file()  # the walk below does see the package
    assert back_edges(ROOT / "replicas") == []


def test_the_check_sees_a_back_edge(tmp_path):
    pkg = tmp_path / "replicas"
    pkg.mkdir()
    (pkg / "bad.py").write_text("def f():\n    from gateway.routing import balancer\n    import geo.dns_server\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert back_edges(pkg) == ["replicas/bad.py:2: imports gateway.routing",
                                   "replicas/bad.py:3: imports geo.dns_server"]
    finally:
        ROOT = saved
