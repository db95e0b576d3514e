import os

import pytest

from tests.procs import Proc

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


@pytest.fixture
def procs():
    """Collects processes a test starts; stops them all afterwards, whatever happened."""
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        p.stop()
