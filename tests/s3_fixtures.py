"""A REAL S3-protocol server for tests (moto_server in its own process) and a parametrized
``store_url`` fixture, so the same store tests run on ``file://`` and on ``s3://``.

Import into a test module: ``from tests.s3_fixtures import moto_s3, store_url  # noqa: F401``.
moto implements S3 conditional writes (If-Match / If-None-Match -> 412) correctly, which is
what the release records' compare-and-swap relies on (see PLATFORM-NOTES.md).
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.procs import Proc, free_port, port_open

BUCKET = "geogate-test"
MOTO_SERVER = str(Path(sys.executable).parent / "moto_server")
# moto accepts any credentials; set them so botocore never goes looking for real ones.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass(frozen=True)
class MotoS3:
    endpoint_url: str
    bucket: str
    proc: Proc

    def env(self) -> dict[str, str]:
        """Environment for child processes (CLI, sync agents) to reach this server."""
        return {**S3_ENV, "AWS_ENDPOINT_URL": self.endpoint_url}


# One server for the whole run: every test module imports the fixture (so pytest sees one
# fixture definition per module); they all share this process, stopped after the last user.
_server: MotoS3 | None = None
_users = 0
_saved_env: dict[str, str | None] = {}


def _start() -> MotoS3:
    port = free_port()
    proc = Proc([MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)], name="moto")
    try:
        proc.wait_until(lambda: port_open(port), timeout_s=30, what="listening")
        endpoint = f"http://127.0.0.1:{port}"
        server = MotoS3(endpoint, BUCKET, proc)
        _saved_env.update({k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]})
        os.environ.update(server.env())
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        return server
    except BaseException:
        proc.stop()
        raise


def _stop(server: MotoS3) -> None:
    server.proc.stop()
    for k, v in _saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def moto_s3():
    """A moto S3 server on 127.0.0.1 with the bucket created; AWS_* variables point at it (child
    processes inherit them)."""
    global _server, _users
    if _server is None:
        _server = _start()
    _users += 1
    try:
        yield _server
    finally:
        _users -= 1
        if _users == 0:
            _stop(_server)
            _server = None


@pytest.fixture(params=["file", "s3"])
def store_url(request, tmp_path):
    """``file://<tmp>/store`` or ``s3://geogate-test/<unique prefix>``: a fresh, empty store."""
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    request.getfixturevalue("moto_s3")
    return f"s3://{BUCKET}/t-{uuid.uuid4().hex[:12]}"
