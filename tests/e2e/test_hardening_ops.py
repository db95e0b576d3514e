"""Operator-safe store handling (issue 17), against real processes: `geogate models ...` and
`geogate sync` as operators run them, `geogate up`, on a file:// store and on a moto S3 server.

- read commands on a missing store (directory or bucket) fail clearly and create nothing; a
  store path that is a regular file is a clear error, not a traceback;
- a frozen S3 server (SIGSTOP): `geogate models list` fails within about the read timeout
  (before: 243 s); a sync agent logs which store has not answered for how long, exports it as
  metrics and keeps its replicas serving; a sync agent never creates a missing store;
- `--s3-endpoint` makes an S3 store usable without a config file;
- `geogate up --store s3://...` without the bucket: an error naming `--create-bucket`; with it,
  the bucket is created and the world serves;
- promote / canary of a version whose files are corrupt in the store: refused, release
  unchanged (CLI and admin API); `--no-verify` skips the check.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import aiohttp
import boto3
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from botocore.exceptions import ClientError

from gateway.admin.models_api import add_model_admin_routes
from replicas.demo.onnx_model import write_repository_entry
from replicas.releases.models_cli import push_version
from replicas.releases.records import CorruptVersion, Releases
from replicas.store import open_store
from tests.e2e.test_sync import serves, wait_for
from tests.e2e.test_world_up import World, _base_port, start_world, tritonclient_infer
from tests.procs import GEOGATE, Proc, ReplicaProc, free_port, geogate, port_open
from tests.s3_fixtures import MOTO_SERVER, S3_ENV, moto_s3, store_url  # noqa: F401

MODELS = [*GEOGATE, "models"]
READ_TIMEOUT_S = 2.0  # [store] read_timeout_s in the frozen-store configs
DEFAULT_READ_TIMEOUT_S = 10.0  # s3_store.READ_TIMEOUT_S: what a command without a config waits
# A Python CLI process starts in ~1-2 s here; on the shared 2-core machine allow for more.
PROCESS_SLACK_S = 10.0
TOKEN = "ops-token"


def _env(**extra: str) -> dict[str, str]:
    """The environment for a CLI child: S3 credentials, and NO $AWS_ENDPOINT_URL (the session's
    moto fixture sets it): what reaches the server is what the command line says."""
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    return {**env, **S3_ENV, **extra}


def _env_for(url: str) -> dict[str, str]:
    """For the parametrized ``store_url``: the session moto server's endpoint from its env."""
    if url.startswith("s3://"):
        return _env(AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"])
    return _env()


def models(*args: str, env: dict[str, str] | None = None, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*MODELS, *args, "--who", "ops"], capture_output=True, text=True, timeout=timeout_s,
                          env=env or _env())


def _no_traceback(p: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in p.stderr, p.stderr


class MotoProc:
    """A private moto S3 server (its own process: freezing it must not stall other tests)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = Proc([MOTO_SERVER, "-H", "127.0.0.1", "-p", str(self.port)], name="moto-private")
        self.proc.wait_until(lambda: port_open(self.port), timeout_s=30, what="listening")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def freeze(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)


@pytest.fixture
def moto_private(procs):
    m = MotoProc()
    procs.append(m.proc)
    m.client().create_bucket(Bucket="ops")
    try:
        yield m
    finally:
        m.thaw()  # whatever happened: a stopped process cannot be stopped with SIGTERM


def _bucket_exists(client, bucket: str) -> bool:
    try:
        client.head_bucket(Bucket=bucket)
        return True
    except ClientError:
        return False


def _s3_config(path: Path, url: str, endpoint: str, extra: str = "") -> Path:
    path.write_text(f'[store]\nurl = "{url}"\nendpoint_url = "{endpoint}"\n'
                    f"connect_timeout_s = 1\nread_timeout_s = {READ_TIMEOUT_S}\n{extra}")
    return path


# ---------------------------------------------------------------- missing stores, wrong paths


READ_COMMANDS = [["list"], ["list", "--json"], ["status"], ["status", "demo", "--json"]]
CHANGE_COMMANDS = [["promote", "demo", "1"], ["canary", "demo", "1", "--weight", "0.5"], ["rollback", "demo"]]


def test_reads_on_a_missing_file_store_create_nothing(tmp_path):
    gone = tmp_path / "nonexistent" / "store"
    for args in READ_COMMANDS + CHANGE_COMMANDS:
        p = models(*args, "--store", f"file://{gone}")
        assert p.returncode == 1, (args, p.stdout, p.stderr)
        assert f"directory {gone} does not exist" in p.stderr and "nothing was created" in p.stderr, p.stderr
        assert p.stdout == "", p.stdout  # no empty table passing for an empty store
        _no_traceback(p)
    # The same through a config naming the store (relative to the config file's directory).
    cfg = tmp_path / "geogate.toml"
    cfg.write_text('[store]\nurl = "file://nonexistent/store"\n')
    for args in READ_COMMANDS:
        p = models(*args, "--config", str(cfg))
        assert p.returncode == 1 and "does not exist" in p.stderr, p.stderr
    assert not (tmp_path / "nonexistent").exists()
    # Only a push makes the store.
    write_repository_entry(tmp_path / "src", 1)
    pushed = models("push", "demo", str(tmp_path / "src" / "demo"), "--quiet", "--store", f"file://{gone}")
    assert pushed.returncode == 0, pushed.stderr
    listed = models("list", "--json", "--store", f"file://{gone}")
    assert listed.returncode == 0 and list(json.loads(listed.stdout)) == ["demo"]


def test_reads_on_a_missing_bucket_create_nothing(moto_s3, tmp_path):  # noqa: F811
    bucket = f"missing-{uuid.uuid4().hex[:10]}"
    for args in READ_COMMANDS + CHANGE_COMMANDS:
        p = models(*args, "--store", f"s3://{bucket}/p", "--s3-endpoint", moto_s3.endpoint_url)
        assert p.returncode == 1, (args, p.stdout, p.stderr)
        assert f"bucket {bucket!r} does not exist at {moto_s3.endpoint_url}" in p.stderr, p.stderr
        assert p.stdout == ""
        _no_traceback(p)
    # push does not create a bucket either: the bucket is the operator's (or `geogate up --create-bucket`'s).
    write_repository_entry(tmp_path / "src", 1)
    p = models("push", "demo", str(tmp_path / "src" / "demo"), "--quiet", "--store", f"s3://{bucket}/p",
               "--s3-endpoint", moto_s3.endpoint_url)
    assert p.returncode == 1 and "create the bucket first" in p.stderr, p.stderr
    assert not _bucket_exists(boto3.client("s3", endpoint_url=moto_s3.endpoint_url), bucket)


def test_store_path_that_is_a_file(tmp_path):
    afile = tmp_path / "store.txt"
    afile.write_text("not a store")
    write_repository_entry(tmp_path / "src", 1)
    for args in [*READ_COMMANDS, *CHANGE_COMMANDS, ["push", "demo", str(tmp_path / "src" / "demo"), "--quiet"]]:
        p = models(*args, "--store", f"file://{afile}")
        assert p.returncode == 1, (args, p.stderr)
        assert f"{afile} is not a directory" in p.stderr, p.stderr
        _no_traceback(p)
    assert afile.read_text() == "not a store"
    p = models("list", "--store", f"file://{afile}", "--s3-endpoint", "http://127.0.0.1:9")
    assert p.returncode == 1 and "needs an s3:// store" in p.stderr, p.stderr


# ---------------------------------------------------------------- a frozen S3 server


def _seconds_waited(stderr: str) -> float:
    m = re.search(r"did not answer within ([\d.]+) s", stderr)
    assert m, stderr
    return float(m.group(1))


def test_frozen_s3_list_fails_within_the_timeout(tmp_path, moto_private):
    store = "s3://ops/frozen"
    write_repository_entry(tmp_path / "src", 1)
    cfg = _s3_config(tmp_path / "geogate.toml", store, moto_private.endpoint)
    assert models("push", "demo", str(tmp_path / "src" / "demo"), "--quiet", "--config", str(cfg)).returncode == 0
    moto_private.freeze()
    try:
        for args in (["list"], ["status", "--json"]):
            t0 = time.monotonic()
            p = models(*args, "--config", str(cfg), timeout_s=120)
            took_s = time.monotonic() - t0
            assert p.returncode == 1, p.stdout + p.stderr
            assert f"store {store} did not answer" in p.stderr and "read_timeout_s = 2" in p.stderr, p.stderr
            # One attempt: a hang is not retried (botocore's retries made this 4 x 60 s).
            assert READ_TIMEOUT_S <= _seconds_waited(p.stderr) < READ_TIMEOUT_S + 1.5
            assert took_s < READ_TIMEOUT_S + PROCESS_SLACK_S, took_s
            _no_traceback(p)
        # Without a config: the defaults bound it too.
        t0 = time.monotonic()
        p = models("list", "--store", store, "--s3-endpoint", moto_private.endpoint, timeout_s=120)
        took_s = time.monotonic() - t0
        assert p.returncode == 1 and "did not answer" in p.stderr, p.stderr
        assert took_s < DEFAULT_READ_TIMEOUT_S + PROCESS_SLACK_S, took_s
    finally:
        moto_private.thaw()
    p = models("list", "--json", "--config", str(cfg))
    assert p.returncode == 0 and list(json.loads(p.stdout)) == ["demo"]


def _metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    m = re.search(rf"^{re.escape(name)} ([-+.\deE]+)$", text, re.M)
    return float(m.group(1)) if m else None


def _sync_config(path: Path, store_lines: str, replica: ReplicaProc, repo: Path) -> Path:
    path.write_text(f"""
[store]
{store_lines}
[sync]
poll_interval_ms = 300
load_timeout_ms = 60000
[[regions]]
name = "eu"
  [[regions.pools]]
  name = "eu-ort"
  replicas = ["http://{replica.http_url}"]
  repository = "{repo}"
""")
    return path


def _push_and_promote(url: str, src: Path, version: int, **store_kw) -> None:
    async def go() -> None:
        store = open_store(url, **store_kw)
        try:
            await push_version(store, "demo", src, version=str(version), who="ops")
            await Releases(store).promote("demo", str(version), who="ops", verify=True)
        finally:
            await store.close()

    asyncio.run(go())


def test_sync_agent_reports_a_frozen_store_and_keeps_serving(tmp_path, procs, moto_private, monkeypatch):
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    store = "s3://ops/site"
    repo = tmp_path / "eu" / "models"
    repo.mkdir(parents=True)
    replica = ReplicaProc(str(repo))
    procs.append(replica)
    replica.wait_ready()
    write_repository_entry(tmp_path / "src", 1)
    _push_and_promote(store, tmp_path / "src" / "demo", 1, endpoint_url=moto_private.endpoint)
    cfg = _sync_config(tmp_path / "geogate.toml", f'url = "{store}"\nendpoint_url = "{moto_private.endpoint}"\n'
                       f"connect_timeout_s = 1\nread_timeout_s = 1", replica, repo)
    metrics_port = free_port()
    agent = geogate("sync", "--config", str(cfg), "--site", "eu", "--metrics", f"127.0.0.1:{metrics_port}",
                    name="sync-eu", env=_env())
    procs.append(agent)
    wait_for(lambda: serves(replica, 1), "v1 served", procs=[agent, replica])
    wait_for(lambda: _metric(metrics_port, 'geogate_sync_store_up{site="eu"}') == 1.0, "store up")
    pattern = re.compile(rf"store unreachable: {re.escape(store)} hangs and has not answered for (\d+) s")

    def silences() -> list[int]:
        return [int(s) for s in pattern.findall(agent.output())]

    moto_private.freeze()
    try:
        wait_for(lambda: len(silences()) >= 1, "a warning naming the frozen store", procs=[agent])
        # It keeps saying so, with the time growing, and the metric says the same, live.
        wait_for(lambda: len(silences()) >= 2 and silences()[-1] >= 3, "the silence growing", procs=[agent])
        assert silences() == sorted(silences())
        line = next(json.loads(x) for x in agent.output().splitlines() if pattern.search(x))
        assert line["level"] == "warning" and line["store"] == store and line["kind"] == "timeout"
        # live: at least what the last line said (rounded to whole seconds there)
        assert _metric(metrics_port, 'geogate_sync_store_unanswered_seconds{site="eu"}') >= silences()[-1] - 0.5
        assert _metric(metrics_port, 'geogate_sync_store_failures_total{kind="timeout",site="eu"}') >= 2
        assert _metric(metrics_port, 'geogate_sync_store_up{site="eu"}') == 0.0
        # What it has keeps serving.
        assert serves(replica, 1) and agent.alive()
        assert (repo / "demo" / "1" / "MANIFEST.json").is_file()
    finally:
        moto_private.thaw()
    wait_for(lambda: _metric(metrics_port, 'geogate_sync_store_up{site="eu"}') == 1.0, "store up again",
             procs=[agent])
    assert _metric(metrics_port, 'geogate_sync_store_unanswered_seconds{site="eu"}') == 0.0
    assert serves(replica, 1) and agent.alive()


def test_sync_agent_never_creates_the_store(tmp_path, procs):
    root = tmp_path / "share" / "store"  # an unmounted share, say
    repo = tmp_path / "eu" / "models"
    repo.mkdir(parents=True)
    replica = ReplicaProc(str(repo))
    procs.append(replica)
    replica.wait_ready()
    cfg = _sync_config(tmp_path / "geogate.toml", f'url = "file://{root}"', replica, repo)
    agent = geogate("sync", "--config", str(cfg), "--site", "eu", name="sync-eu")
    procs.append(agent)
    missing = f"store unreachable: file://{root} is missing"
    wait_for(lambda: agent.output().count(missing) >= 2, "two rounds failing on the missing store", procs=[agent])
    assert not root.exists() and not root.parent.exists() and agent.alive()
    # The operator's push makes the store; the agent picks it up.
    write_repository_entry(tmp_path / "src", 1)
    _push_and_promote(f"file://{root}", tmp_path / "src" / "demo", 1)
    wait_for(lambda: serves(replica, 1), "v1 served once the store exists", procs=[agent])
    # The store vanishes (the share unmounted): not re-created, what serves keeps serving.
    away = root.with_name("store-away")
    before = agent.output().count(missing)
    root.rename(away)
    wait_for(lambda: agent.output().count(missing) >= before + 2, "the vanished store noticed", procs=[agent])
    assert not root.exists() and serves(replica, 1) and agent.alive()


# ---------------------------------------------------------------- S3 without a config file


def test_s3_endpoint_without_a_config(tmp_path, moto_private):
    store = f"s3://ops/noconfig-{uuid.uuid4().hex[:6]}"
    flags = ["--store", store, "--s3-endpoint", moto_private.endpoint]
    env = _env()
    assert "AWS_ENDPOINT_URL" not in env
    for v in (1, 2):
        write_repository_entry(tmp_path / "src", v)
        p = models("push", "demo", str(tmp_path / "src" / "demo"), "--version", str(v), "--quiet", *flags, env=env)
        assert p.returncode == 0 and f"to {store}" in p.stdout, p.stderr
    assert models("promote", "demo", "2", *flags, env=env).returncode == 0
    listing = json.loads(models("list", "--json", *flags, env=env).stdout)
    assert listing["demo"]["release"]["stable"] == "2"
    assert [v["version"] for v in listing["demo"]["versions"]] == ["1", "2"]
    keys = [o["Key"] for o in moto_private.client().list_objects_v2(Bucket="ops")["Contents"]]
    assert f"{store.removeprefix('s3://ops/')}/releases/demo.json" in keys  # it went to this server
    p = models("status", "--json", *flags, "--s3-region", "eu-west-1", env=env)
    assert p.returncode == 0 and json.loads(p.stdout) == {}


# ---------------------------------------------------------------- geogate up --create-bucket


def test_up_needs_the_bucket_or_create_bucket(tmp_path, moto_s3):  # noqa: F811
    bucket = f"world-{uuid.uuid4().hex[:10]}"
    s3 = boto3.client("s3", endpoint_url=moto_s3.endpoint_url)
    shape = ["--regions", "eu-west", "--replicas", "1", "--store", f"s3://{bucket}/w",
             "--s3-endpoint", moto_s3.endpoint_url]
    res = subprocess.run([*GEOGATE, "up", "--dir", str(tmp_path / "no"), *shape, "--base-port", str(_base_port())],
                         capture_output=True, text=True, timeout=120, env=moto_s3.env(), check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"bucket {bucket!r} does not exist" in res.stderr and "geogate up --create-bucket" in res.stderr
    _no_traceback(res)
    assert not _bucket_exists(s3, bucket)
    res = subprocess.run([*GEOGATE, "up", "--dir", str(tmp_path / "file"), "--create-bucket", "--base-port",
                          str(_base_port())], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 1 and "--create-bucket is for an s3:// store" in res.stderr, res.stderr

    w: World = start_world(tmp_path, *shape, "--create-bucket", "--base-port", str(_base_port()), env=moto_s3.env())
    try:
        w.wait_ready()
        assert f"created the store s3://{bucket}/w" in w.output()
        assert _bucket_exists(s3, bucket)
        assert w.info["models"]["demo"]["stable"] == "1"
        assert tritonclient_infer(w.region("eu-west"), "http") == "1"
        w.stop()
        assert w.proc.popen.returncode == 0, w.output()[-3000:]
    finally:
        if w.proc.alive():
            w.proc.stop(60)


# ---------------------------------------------------------------- promote verifies checksums


async def _corrupt(url: str, how: str) -> None:
    store = open_store(url)
    try:
        key = "models/demo/2/model.onnx"
        if how == "missing":
            await store.delete(key)
            return
        data = bytearray((await store.get(key)).data)
        if how == "bitflip":
            data[len(data) // 3] ^= 0x40  # same size, manifest unchanged
        else:
            del data[-10:]
        await store.put(key, bytes(data))
    finally:
        await store.close()


@pytest.mark.parametrize("how", ["bitflip", "truncated", "missing"])
def test_promote_of_a_corrupt_version_is_refused(store_url, tmp_path, how):  # noqa: F811
    env = _env_for(store_url)
    for v in (1, 2):
        write_repository_entry(tmp_path / "src", v)
        assert models("push", "demo", str(tmp_path / "src" / "demo"), "--version", str(v), "--quiet",
                      "--store", store_url, env=env).returncode == 0
    assert models("promote", "demo", "1", "--store", store_url, env=env).returncode == 0
    before = json.loads(models("list", "--json", "--store", store_url, env=env).stdout)["demo"]["release"]
    asyncio.run(_corrupt(store_url, how))
    reason = {"bitflip": "model.onnx: sha256", "truncated": "model.onnx: size", "missing": "model.onnx: missing"}[how]
    for args in (["promote", "demo", "2"], ["canary", "demo", "2", "--weight", "0.2"]):
        p = models(*args, "--store", store_url, env=env)
        assert p.returncode == 1, p.stdout + p.stderr
        assert "does not match its MANIFEST.json" in p.stderr and reason in p.stderr, p.stderr
        assert "release was NOT changed" in p.stderr
        _no_traceback(p)
    after = json.loads(models("list", "--json", "--store", store_url, env=env).stdout)["demo"]["release"]
    assert after == before and after["stable"] == "1" and after["generation"] == 1
    # --no-verify: the operator's call (the sites still refuse it: tests/e2e/test_sync_faults.py).
    p = models("promote", "demo", "2", "--no-verify", "--store", store_url, env=env)
    assert p.returncode == 0 and "promoted demo version 2" in p.stdout, p.stderr
    rec = json.loads(models("list", "--json", "--store", store_url, env=env).stdout)["demo"]["release"]
    assert rec["stable"] == "2" and rec["generation"] == 2


async def test_admin_promote_refuses_a_corrupt_version(store_url, tmp_path):  # noqa: F811
    """The admin API's promote and canary use the same check (replicas.releases.manifest.verify_in_store)."""
    store = open_store(store_url)
    for v in (1, 2):
        write_repository_entry(tmp_path / "src", v)
        await push_version(store, "demo", tmp_path / "src" / "demo", version=str(v), who="ops")
    await Releases(store).promote("demo", "1", who="ops", verify=True)
    await _corrupt(store_url, "bitflip")
    with pytest.raises(CorruptVersion, match="sha256"):
        await Releases(store).promote("demo", "2", who="ops", verify=True)
    app = web.Application()
    add_model_admin_routes(app, store, token=TOKEN)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession(base_url=str(server.make_url(""))) as session:
            auth = {"Authorization": f"Bearer {TOKEN}"}
            for path, body in (("promote", {"version": "2"}), ("canary", {"version": "2", "weight": 0.5})):
                async with session.post(f"/admin/v1/models/demo/{path}", json=body, headers=auth) as r:
                    error = (await r.json())["error"]
                    assert r.status == 409 and "does not match its MANIFEST.json" in error, error
            rec = await Releases(store).get("demo")
            assert rec.stable == "1" and rec.canary is None and rec.generation == 1
    finally:
        await server.close()
        await store.close()


def test_verify_streams_big_files(store_url, tmp_path):  # noqa: F811
    """A version bigger than one read chunk verifies (and a flipped byte deep in it is found)."""
    env = _env_for(store_url)
    write_repository_entry(tmp_path / "src", 1)
    (tmp_path / "src" / "demo" / "1" / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    assert models("push", "demo", str(tmp_path / "src" / "demo"), "--quiet", "--store", store_url,
                  env=env).returncode == 0

    async def flip_deep() -> None:
        store = open_store(store_url)
        try:
            data = bytearray((await store.get("models/demo/1/weights.bin")).data)
            data[-5] ^= 1
            await store.put("models/demo/1/weights.bin", bytes(data))
        finally:
            await store.close()

    p = models("promote", "demo", "1", "--store", store_url, env=env)
    assert p.returncode == 0, p.stderr
    asyncio.run(flip_deep())
    write_repository_entry(tmp_path / "src", 2)
    assert models("push", "demo", str(tmp_path / "src" / "demo"), "--version", "2", "--quiet", "--store", store_url,
                  env=env).returncode == 0
    assert models("promote", "demo", "2", "--store", store_url, env=env).returncode == 0
    p = models("promote", "demo", "1", "--store", store_url, env=env)  # back to the damaged one
    assert p.returncode == 1 and "weights.bin: sha256" in p.stderr, p.stderr



# ---------------------------------------------------------------- retries: what is retried, what is not


EMPTY_LISTING = (b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/'
                 b'2006-03-01/"><Name>b</Name><Prefix></Prefix><KeyCount>0</KeyCount><MaxKeys>1000</MaxKeys>'
                 b"<IsTruncated>false</IsTruncated></ListBucketResult>")
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your '
             b"request rate.</Message></Error>")


async def _s3_standin(behaviour):
    """A loopback HTTP server answering S3 list requests as ``behaviour(n)`` says (n: 1, 2, ...):
    "503" (SlowDown), "hang" (never answers) or "ok" (an empty listing). Returns (server, requests seen)."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.path_qs)
        what = behaviour(len(seen))
        if what == "503":
            return web.Response(status=503, body=SLOW_DOWN, content_type="application/xml")
        if what == "hang":
            await asyncio.sleep(3600)
        return web.Response(body=EMPTY_LISTING, content_type="application/xml")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server, seen


async def test_transient_errors_are_retried_and_a_hang_is_not(monkeypatch):
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    from replicas.store import StoreTimeout, StoreUnavailable
    from replicas.store.s3_store import S3Store

    # Two 503 SlowDown, then an answer: 3 attempts make it, 2 do not.
    for attempts, ok in ((3, True), (2, False)):
        server, seen = await _s3_standin(lambda n: "503" if n <= 2 else "ok")
        store = S3Store("s3://b/p", endpoint_url=str(server.make_url("")).rstrip("/"), max_attempts=attempts)
        try:
            if ok:
                assert await store.list("releases/") == []
            else:
                with pytest.raises(StoreUnavailable, match="SlowDown"):
                    await store.list("releases/")
            assert len(seen) == (3 if ok else 2)
        finally:
            await store.close()
            await server.close()
    # A server that does not answer: one attempt, then StoreTimeout after read_timeout_s.
    server, seen = await _s3_standin(lambda n: "hang")
    store = S3Store("s3://b/p", endpoint_url=str(server.make_url("")).rstrip("/"), max_attempts=3,
                    read_timeout_s=1.0)
    t0 = time.monotonic()
    try:
        with pytest.raises(StoreTimeout, match=r"did not answer within 1\.\d s") as info:
            await store.list("releases/")
        assert 1.0 <= info.value.waited_s < 2.5 and time.monotonic() - t0 < 5
        assert len(seen) == 1
    finally:
        await store.close()
        await server.close()
