"""The layering contract (pyproject.toml [tool.importlinter]) holds: core imports nothing
in-project; health, geo and replicas never import gateway; replicas never imports geo; no product
package imports loadtests or tests; loadtests imports no tests module; inside gateway/, world over
server and admin over front over routing over upstream. A new back-edge fails this test (and
`make lint`), with import-linter's report of the offending imports."""

from __future__ import annotations

import os
from pathlib import Path

from importlinter.application.use_cases import lint_imports
from importlinter.configuration import configure

import core

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_linter_reads_this_checkout():
    """import-linter finds packages through sys.path: it must see this tree, not the one the
    shared venv's editable install points at."""
    assert Path(core.__file__).resolve().parent == REPO_ROOT / "core"


def test_import_contracts_hold(capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    configure()  # what `lint-imports` does first: wires the graph builder and the printer
    kept = lint_imports(config_filename=os.fspath(REPO_ROOT / "pyproject.toml"), cache_dir=None, no_logo=True)
    report = capsys.readouterr().out
    assert kept, report
