"""The sync agent reaches replicas that require mutual TLS: ``[tls.upstream]`` (CA and client
certificate) is used by its HTTP and gRPC repository clients. Two replicas serve TLS and demand
a client certificate signed by the test CA; one is reached over HTTP, one over gRPC."""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
from pathlib import Path

from replicas.demo.onnx_model import write_repository_entry
from replicas.releases.site_status import read_site
from tests.e2e.test_security_e2e import Pki, https
from tests.e2e.test_sync import _with_store, promote, push, run
from tests.procs import GEOGATE, ReplicaProc

READY_WAIT_S = 60.0
SYNC_WAIT_S = 180


def _replica_ready(replica: ReplicaProc, ctx: ssl.SSLContext) -> bool:
    try:
        return https(f"https://{replica.http_url}/v2/health/ready", ctx, timeout_s=1)[0] == 200
    except (OSError, urllib.error.URLError):
        return False


def _ready_versions(replica: ReplicaProc, ctx: ssl.SSLContext) -> set[str]:
    status, _, body = https(f"https://{replica.http_url}/v2/repository/index", ctx, body=b"{}", method="POST")
    assert status == 200, body
    return {str(r["version"]) for r in json.loads(body) if r.get("name") == "demo" and r.get("state") == "READY"}


def _config(path: Path, store: str, reps: list[ReplicaProc], upstream: str) -> Path:
    path.write_text(f"""
[store]
url = "{store}"
[sync]
poll_interval_ms = 300
load_timeout_ms = 60000
[tls.upstream]
{upstream}
[[regions]]
name = "eu"
  [[regions.pools]]
  name = "eu-ort"
  replicas = ["http://{reps[0].http_url}", "grpc://{reps[1].grpc_url}"]
  repository = "eu/models"
""")
    return path


def _sync_once(cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*GEOGATE, "sync", "--config", str(cfg), "--site", "eu", "--once"],
                          capture_output=True, text=True, timeout=SYNC_WAIT_S)


def test_sync_agent_loads_versions_on_replicas_that_require_client_certificates(tmp_path, procs):
    pki = Pki(tmp_path)
    repo = tmp_path / "eu" / "models"
    repo.mkdir(parents=True)
    reps = [ReplicaProc(str(repo), extra=["--tls-cert", pki.replica_cert, "--tls-key", pki.replica_key,
                                          "--tls-client-ca", pki.ca]) for _ in range(2)]
    procs.extend(reps)
    with_cert = pki.client_ctx(cert=True)
    for r in reps:
        r.wait_until(lambda r=r: _replica_ready(r, with_cert), READY_WAIT_S)
    # The replicas really do demand a client certificate.
    try:
        refused = https(f"https://{reps[0].http_url}/v2/health/ready", pki.client_ctx(), timeout_s=5)[0] != 200
    except (OSError, urllib.error.URLError):
        refused = True
    assert refused

    (tmp_path / "store").mkdir()
    store = f"file://{tmp_path / 'store'}"
    src = tmp_path / "src"
    write_repository_entry(src, 1)
    push(store, src / "demo", 1)
    promote(store, 1)

    # [tls.upstream] with the CA but no client certificate: the handshake is refused, nothing loads.
    no_cert = _config(tmp_path / "no-cert.toml", store, reps, f'enabled = true\nca_file = "{pki.ca}"')
    done = _sync_once(no_cert)
    assert done.returncode == 0, done.stderr[-3000:]
    status = run(_with_store(store, lambda s: read_site(s, "eu")))
    assert status.replicas and not any(h["ok"] for h in status.replicas.values()), status.replicas
    assert all(_ready_versions(r, with_cert) == set() for r in reps)

    # With the client certificate: both replicas (HTTP and gRPC) load v1.
    mutual = _config(tmp_path / "mutual.toml", store, reps,
                     f'enabled = true\nca_file = "{pki.ca}"\ncert_file = "{pki.client_cert}"\n'
                     f'key_file = "{pki.client_key}"')
    done = _sync_once(mutual)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(_ready_versions(r, with_cert) == {"1"} for r in reps), done.stderr[-3000:]
    status = run(_with_store(store, lambda s: read_site(s, "eu")))
    assert status.models["demo"].ready == ["1"]
    assert len(status.replicas) == 2 and all(h["ok"] for h in status.replicas.values()), status.replicas
