import os
from pathlib import Path

import pytest

import tests.fuzzing  # noqa: F401  (registers the hypothesis profiles --hypothesis-profile names)
from tests.procs import Proc

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
# Child processes started from another directory (`geogate up` tests run in a temp cwd, printed
# commands from /) must run this checkout's code, not the checkout the shared venv's editable
# install points at (/work/main from a worktree).
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)


@pytest.fixture
def procs():
    """Collects processes a test starts; stops them all afterwards, whatever happened."""
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        p.stop()
