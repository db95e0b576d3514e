"""gateway.front.auth over real sockets and processes: the CLI, refusals over real HTTP and gRPC
servers, the admin operators' audit. The in-process tests are in tests/unit/gateway/front/test_auth.py."""

import json
import subprocess
import sys

import grpc
import pytest

from gateway.front.api_keys import split_key
from gateway.front.auth import Authenticator
from tests.auth_keys import make_key


def test_cli_new_key_round_trip(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gateway.front.auth", "new-key", "team-a", "--models", "demo*",
                          "--rate-per-s", "50", "--burst", "100", "--max-concurrent", "8"],
                         capture_output=True, text=True, timeout=60, check=True)
    key, _, entry_text = out.stdout.partition("\n")
    assert key.startswith("gk_")
    assert split_key(key)[1] not in entry_text  # only the hash is printed for the file
    p = tmp_path / "keys.toml"
    p.write_text(entry_text)
    auth = Authenticator(str(p))
    d = auth.authorize(key, "demo")
    assert d.allowed and d.key_name == "team-a"
    assert auth.authorize(key, "other").http_status == 403
    chk = subprocess.run([sys.executable, "-m", "gateway.front.auth", "check", str(p)], capture_output=True, text=True,
                         timeout=60)
    assert chk.returncode == 0 and "1 keys (team-a)" in chk.stdout
    j = subprocess.run([sys.executable, "-m", "gateway.front.auth", "new-key", "svc", "--json"], capture_output=True,
                       text=True, timeout=60, check=True)
    key2, _, line = j.stdout.partition("\n")
    jp = tmp_path / "keys.json"
    jp.write_text(json.dumps({"keys": [json.loads(line)]}))
    assert Authenticator(str(jp)).authorize(key2, "anything").allowed


async def test_refusals_over_real_http_and_grpc():
    """The helpers the fronts use (http_refusal, grpc_abort) on a real aiohttp server and a real
    grpc.aio server: statuses, codes, messages, Retry-After."""
    import aiohttp
    from aiohttp import web

    from gateway.front.auth import grpc_abort, http_refusal
    from tests.procs import free_port

    key, e = make_key("team-a", models=["demo*"], rate_per_s=0.001, burst=1)
    auth = Authenticator(table={"keys": [e]})

    async def handler(request):
        d = auth.authorize_headers(request.headers, request.match_info["model"])
        if not d.allowed:
            return http_refusal(d)
        try:
            return web.json_response({"key": d.key_name})
        finally:
            d.release()

    app = web.Application()
    app.router.add_post("/v2/models/{model}/infer", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()

    async def grpc_handler(request: bytes, context):
        md = dict(context.invocation_metadata() or ())
        d = auth.authorize_headers(md, request.decode())
        if not d.allowed:
            await grpc_abort(context, d)
        d.release()
        return d.key_name.encode()

    server = grpc.aio.server()
    ident = lambda b: b  # noqa: E731
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {
        "Call": grpc.unary_unary_rpc_method_handler(grpc_handler, request_deserializer=ident,
                                                    response_serializer=ident)}),))
    gport = free_port()
    server.add_insecure_port(f"127.0.0.1:{gport}")
    await server.start()
    try:
        async with aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{port}/v2/models/%s/infer"
            async with s.post(url % "demo") as r:
                assert r.status == 401 and "missing API key" in (await r.json())["error"]
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
            async with s.post(url % "secret", headers={"Authorization": f"Bearer {key}"}) as r:
                assert r.status == 403 and "may not call model 'secret'" in (await r.json())["error"]
            async with s.post(url % "demo", headers={"x-api-key": key}) as r:
                assert r.status == 200 and (await r.json()) == {"key": "team-a"}
            async with s.post(url % "demo", headers={"x-api-key": key}) as r:
                assert r.status == 429 and "rate limit" in (await r.json())["error"]
                assert int(r.headers["Retry-After"]) >= 1
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gport}") as ch:
            call = ch.unary_unary("/t.T/Call", request_serializer=ident, response_deserializer=ident)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await call(b"demo", timeout=10)
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await call(b"secret", metadata=(("authorization", f"Bearer {key}"),), timeout=10)
            assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED and "secret" in exc.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await call(b"demo", metadata=(("x-api-key", key),), timeout=10)
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(exc.value.trailing_metadata()).get("retry-after", "").isdigit()
    finally:
        await server.stop(None)
        await runner.cleanup()


async def test_admin_operators_are_recorded_and_audited(tmp_path, caplog):
    """gateway.admin.models_api with [admin] operators_file: the operator's own name goes into the
    release history (not the body's "who"); every change, refused ones too, is an audit line."""
    import logging

    import aiohttp
    from aiohttp import web

    from gateway.admin.models_api import add_model_admin_routes
    from replicas.demo.onnx_model import write_repository_entry
    from replicas.releases.models_cli import push_version
    from replicas.store import open_store
    from tests.procs import free_port

    store = open_store(f"file://{tmp_path / 'store'}")
    for v in (1, 2):
        write_repository_entry(tmp_path / "repo", v)
        await push_version(store, "demo", tmp_path / "repo" / "demo", version=str(v), who="ci")
    op_key, op = make_key("ops-ann")
    ops = Authenticator(table={"keys": [op]})
    app = web.Application()
    add_model_admin_routes(app, store, token="shared", operators=ops)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    caplog.set_level(logging.INFO, logger="geogate.audit")
    url = f"http://127.0.0.1:{port}/admin/v1/models/demo/promote"
    try:
        async with aiohttp.ClientSession() as s:
            async def promote(token: str, who: str, version: str = "1") -> tuple[int, dict]:
                async with s.post(url, json={"version": version, "who": who},
                                  headers={"Authorization": f"Bearer {token}"}) as r:
                    return r.status, await r.json()

            status, doc = await promote(op_key, "mallory")
            assert status == 200 and doc["release"]["history"][-1]["who"] == "ops-ann"
            status, doc = await promote("shared", "bob", "2")  # the shared token: the body says who
            assert status == 200 and doc["release"]["history"][-1]["who"] == "bob"
            status, doc = await promote("gk_000000000000_forged", "eve")
            assert status == 403 and "invalid operator token" in doc["error"]
            status, doc = await promote("wrong", "eve")
            assert status == 403 and doc["error"] == "invalid admin token"
            async with s.get(f"http://127.0.0.1:{port}/admin/v1/models",
                             headers={"Authorization": f"Bearer {op_key}"}) as r:
                assert r.status == 200  # reads are allowed, and not audited
    finally:
        await runner.cleanup()
        await store.close()
    audits = [r.audit for r in caplog.records if hasattr(r, "audit")]
    assert [(a["who"], a["action"], a["status"]) for a in audits] == \
        [("ops-ann", "promote", 200), ("bob", "promote", 200), ("", "promote", 403), ("", "promote", 403)]
    assert all(a["model"] == "demo" and a["when"] and a["remote"] == "127.0.0.1" for a in audits)
    assert audits[0]["version"] == "1" and "invalid operator token" in audits[2]["error"]
