"""core.tls: real aiohttp and grpc.aio servers with our contexts/credentials, a CA made in
the test (cryptography), mutual TLS, and certificate files replaced while serving."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import socket
import ssl

import aiohttp
import grpc
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from core.tls import (
    ClientTlsSettings,
    ServerTls,
    ServerTlsSettings,
    TlsConfigError,
    client_ssl_context,
    grpc_channel_credentials,
    grpc_channel_options,
)
from tests.procs import free_port

HOST = "127.0.0.1"


# ---------------------------------------------------------------------------- certificates


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_leaf(ca, cn: str, *, client: bool = False):
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                               else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    if not client:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def write_pair(dirpath, stem: str, pair) -> tuple[str, str]:
    key, cert = pair
    kp, cp = os.path.join(dirpath, f"{stem}.key"), os.path.join(dirpath, f"{stem}.crt")
    write_atomic(kp, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    write_atomic(cp, cert.public_bytes(serialization.Encoding.PEM))
    return cp, kp


def write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # what cert-manager / certbot deploy hooks do: a new inode


@pytest.fixture
def pki(tmp_path):
    """Two CAs (the second for rotation), a server cert from each, and a client cert from CA 1."""
    d = str(tmp_path)
    ca1, ca2 = make_ca("geogate test CA 1"), make_ca("geogate test CA 2")
    ca1_file, _ = write_pair(d, "ca1", ca1)
    ca2_file, _ = write_pair(d, "ca2", ca2)
    server_cert, server_key = write_pair(d, "server", make_leaf(ca1, "gateway-one"))
    client_cert, client_key = write_pair(d, "client", make_leaf(ca1, "client-a", client=True))
    rogue_cert, rogue_key = write_pair(d, "rogue", make_leaf(ca2, "rogue-client", client=True))
    return {"dir": d, "ca1": ca1_file, "ca2": ca2_file, "ca1_pair": ca1, "ca2_pair": ca2,
            "server_cert": server_cert, "server_key": server_key, "client_cert": client_cert,
            "client_key": client_key, "rogue_cert": rogue_cert, "rogue_key": rogue_key}


def rotate_server_cert(pki, ca_pair, cn: str) -> None:
    key, cert = make_leaf(ca_pair, cn)
    write_atomic(pki["server_key"], key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    write_atomic(pki["server_cert"], cert.public_bytes(serialization.Encoding.PEM))


def peer_cn(port: int, ca_file: str, alpn: list[str]) -> str:
    """The CN of the certificate a fresh TLS handshake sees (a plain blocking ssl client)."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.set_alpn_protocols(alpn)
    with socket.create_connection((HOST, port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        cert = x509.load_der_x509_certificate(s.getpeercert(binary_form=True))
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


# ---------------------------------------------------------------------------- aiohttp


async def _start_http(server_tls: ServerTls):
    async def hello(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        who = ""
        if peer:
            who = dict(x[0] for x in peer["subject"]).get("commonName", "")
        return web.json_response({"ok": True, "client": who})

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, HOST, port, ssl_context=server_tls.ssl_context())
    await site.start()
    return runner, port


async def _get(port: int, ctx) -> dict:
    async with aiohttp.ClientSession() as s, \
            s.get(f"https://localhost:{port}/", ssl=ctx, timeout=aiohttp.ClientTimeout(total=10)) as r:
        assert r.status == 200
        return await r.json()


async def test_https_server_verified_by_ca(pki):
    tls = ServerTls(ServerTlsSettings(pki["server_cert"], pki["server_key"]))
    runner, port = await _start_http(tls)
    try:
        assert (await _get(port, client_ssl_context(ClientTlsSettings(ca_file=pki["ca1"]))))["ok"]
        # A client that trusts another CA refuses the server.
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await _get(port, client_ssl_context(ClientTlsSettings(ca_file=pki["ca2"])))
        # Plain HTTP to a TLS port gets nowhere.
        with pytest.raises((aiohttp.ClientError, asyncio.TimeoutError)):
            async with aiohttp.ClientSession() as s:
                await s.get(f"http://{HOST}:{port}/", timeout=aiohttp.ClientTimeout(total=5))
    finally:
        await runner.cleanup()


async def test_https_mutual_tls(pki):
    tls = ServerTls(ServerTlsSettings(pki["server_cert"], pki["server_key"], client_ca_file=pki["ca1"]))
    assert tls.mutual
    runner, port = await _start_http(tls)
    try:
        with_cert = client_ssl_context(ClientTlsSettings(ca_file=pki["ca1"], cert_file=pki["client_cert"],
                                                         key_file=pki["client_key"]))
        assert (await _get(port, with_cert))["client"] == "client-a"
        without = client_ssl_context(ClientTlsSettings(ca_file=pki["ca1"]))
        with pytest.raises(aiohttp.ClientError):
            await _get(port, without)
        rogue = client_ssl_context(ClientTlsSettings(ca_file=pki["ca1"], cert_file=pki["rogue_cert"],
                                                     key_file=pki["rogue_key"]))
        with pytest.raises(aiohttp.ClientError):
            await _get(port, rogue)
    finally:
        await runner.cleanup()


async def test_https_reload_when_files_change(pki):
    tls = ServerTls(ServerTlsSettings(pki["server_cert"], pki["server_key"]))
    runner, port = await _start_http(tls)
    try:
        assert await asyncio.to_thread(peer_cn, port, pki["ca1"], ["http/1.1"]) == "gateway-one"
        assert not tls.reload_if_changed()  # nothing changed
        rotate_server_cert(pki, pki["ca2_pair"], "gateway-two")
        watcher = asyncio.create_task(tls.watch(0.05))
        try:
            for _ in range(200):
                if tls.reloads:
                    break
                await asyncio.sleep(0.05)
        finally:
            watcher.cancel()
        assert tls.reloads == 1
        assert await asyncio.to_thread(peer_cn, port, pki["ca2"], ["http/1.1"]) == "gateway-two"
        assert (await _get(port, client_ssl_context(ClientTlsSettings(ca_file=pki["ca2"]))))["ok"]
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await _get(port, client_ssl_context(ClientTlsSettings(ca_file=pki["ca1"])))
    finally:
        await runner.cleanup()


async def test_https_broken_rotation_keeps_serving_old_cert(pki, caplog):
    tls = ServerTls(ServerTlsSettings(pki["server_cert"], pki["server_key"]))
    runner, port = await _start_http(tls)
    try:
        # Only the certificate is replaced, its key not yet: the pair does not match.
        key, cert = make_leaf(pki["ca2_pair"], "gateway-two")
        write_atomic(pki["server_cert"], cert.public_bytes(serialization.Encoding.PEM))
        assert not tls.reload_if_changed()
        assert "do not load" in tls.last_error and "TLS files changed but not reloaded" in caplog.text
        assert await asyncio.to_thread(peer_cn, port, pki["ca1"], ["http/1.1"]) == "gateway-one"
        # The key arrives: the next check succeeds.
        write_atomic(pki["server_key"], key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
        assert tls.reload_if_changed() and tls.last_error == ""
        assert await asyncio.to_thread(peer_cn, port, pki["ca2"], ["http/1.1"]) == "gateway-two"
    finally:
        await runner.cleanup()


def test_bad_files_at_startup_name_the_file(pki, tmp_path):
    with pytest.raises(TlsConfigError, match="cannot read certificate file"):
        ServerTls(ServerTlsSettings(str(tmp_path / "nope.crt"), pki["server_key"]))
    empty = tmp_path / "empty.key"
    empty.write_text("")
    with pytest.raises(TlsConfigError, match="is empty"):
        ServerTls(ServerTlsSettings(pki["server_cert"], str(empty)))
    with pytest.raises(TlsConfigError, match="key values mismatch"):
        ServerTls(ServerTlsSettings(pki["server_cert"], pki["client_key"]))
    with pytest.raises(TlsConfigError, match="both cert_file and key_file"):
        client_ssl_context(ClientTlsSettings(ca_file=pki["ca1"], cert_file=pki["client_cert"]))
    with pytest.raises(TlsConfigError, match="both cert_file and key_file"):
        grpc_channel_credentials(ClientTlsSettings(ca_file=pki["ca1"], key_file=pki["client_key"]))


# ---------------------------------------------------------------------------- gRPC


async def _start_grpc(server_tls: ServerTls):
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = free_port()
    assert server.add_secure_port(f"{HOST}:{port}", server_tls.grpc_credentials()) == port
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port


async def _check(port: int, settings: ClientTlsSettings) -> int:
    options = grpc_channel_options(settings)
    async with grpc.aio.secure_channel(f"{HOST}:{port}", grpc_channel_credentials(settings), options=options) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        return reply.status


async def test_grpc_tls_and_rotation(pki):
    tls = ServerTls(ServerTlsSettings(pki["server_cert"], pki["server_key"]))
    server, port = await _start_grpc(tls)
    try:
        ok = ClientTlsSettings(ca_file=pki["ca1"], server_name="localhost")
        assert await _check(port, ok) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await _check(port, ClientTlsSettings(ca_file=pki["ca2"], server_name="localhost"))
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await asyncio.to_thread(peer_cn, port, pki["ca1"], ["h2"]) == "gateway-one"
        # Replace the files: the next new connection's handshake uses the new certificate.
        rotate_server_cert(pki, pki["ca2_pair"], "gateway-two")
        assert await _check(port, ClientTlsSettings(ca_file=pki["ca2"], server_name="localhost")) == \
            health_pb2.HealthCheckResponse.SERVING
        assert await asyncio.to_thread(peer_cn, port, pki["ca2"], ["h2"]) == "gateway-two"
        with pytest.raises(grpc.aio.AioRpcError):
            await _check(port, ok)
    finally:
        await server.stop(None)


async def test_grpc_mutual_tls(pki):
    tls = ServerTls(ServerTlsSettings(pki["server_cert"], pki["server_key"], client_ca_file=pki["ca1"]))
    server, port = await _start_grpc(tls)
    try:
        good = ClientTlsSettings(ca_file=pki["ca1"], cert_file=pki["client_cert"], key_file=pki["client_key"],
                                 server_name="localhost")
        assert await _check(port, good) == health_pb2.HealthCheckResponse.SERVING
        for bad in (ClientTlsSettings(ca_file=pki["ca1"], server_name="localhost"),
                    ClientTlsSettings(ca_file=pki["ca1"], cert_file=pki["rogue_cert"], key_file=pki["rogue_key"],
                                      server_name="localhost")):
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await _check(port, bad)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


# ---------------------------------------------------------------------------- the gateway's clients


def _leaf_named(ca, dns_name: str):
    """A server certificate naming only `dns_name` (not the address it is reached at)."""
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(dns_name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


async def test_server_name_override_and_the_data_path_client(pki):
    """Replicas are dialled by IP; their certificates may name a service. `server_name` makes every
    client (aiohttp, the gateway's own HTTP/1.1 pool) check that name, and only that name."""
    from gateway.upstream.http1_client import ConnectionPool, UpstreamConnectError

    cert, key = write_pair(pki["dir"], "svc", _leaf_named(pki["ca1_pair"], "replica.internal"))
    tls = ServerTls(ServerTlsSettings(cert, key, client_ca_file=pki["ca1"]))

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"len": len(await request.read())})

    app = web.Application()
    app.router.add_post("/x", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, HOST, port, ssl_context=tls.ssl_context()).start()
    mutual = dict(ca_file=pki["ca1"], cert_file=pki["client_cert"], key_file=pki["client_key"])
    try:
        named = client_ssl_context(ClientTlsSettings(**mutual, server_name="replica.internal"))
        pool = ConnectionPool(f"{HOST}:{port}", max_connections=2, ssl_context=named)
        resp = await pool.post("/x", b"12345", {}, 10.0)
        assert resp.status == 200 and resp.body == b'{"len": 5}'
        await pool.close()
        async with aiohttp.ClientSession() as s, s.post(f"https://{HOST}:{port}/x", data=b"ab", ssl=named) as r:
            assert r.status == 200
        for settings in (ClientTlsSettings(**mutual),  # checks 127.0.0.1: not in the certificate
                         ClientTlsSettings(**mutual, server_name="other.internal"),
                         ClientTlsSettings(ca_file=pki["ca1"], server_name="replica.internal")):  # no client cert
            pool = ConnectionPool(f"{HOST}:{port}", max_connections=1, ssl_context=client_ssl_context(settings))
            with pytest.raises((UpstreamConnectError, ConnectionError)):
                await pool.post("/x", b"1", {}, 5.0)
            await pool.close()
    finally:
        await runner.cleanup()


def test_tls_from_the_config(pki, tmp_path):
    """[tls], [tls.upstream], [tls.peers]: relative paths are relative to the config file; a bad
    file names the section; inconsistent keys are config errors naming the key."""
    from core.config import ConfigError, parse_config
    from core.tls import ClientTls, client_tls_from_section, link_tls_from_config, server_tls_from_config

    assert os.path.dirname(pki["server_cert"]) == str(tmp_path)  # the files are there: relative names work
    cfg = parse_config("""
[tls]
cert_file = "server.crt"
key_file = "server.key"
client_ca_file = "ca1.crt"
[tls.upstream]
enabled = true
ca_file = "ca1.crt"
cert_file = "client.crt"
key_file = "client.key"
server_name = "localhost"
[tls.peers]
enabled = true
ca_file = "missing.crt"
""", base_dir=str(tmp_path))
    server = server_tls_from_config(cfg)
    assert server is not None and server.mutual and server.settings.cert_file == str(tmp_path / "server.crt")
    up = client_tls_from_section(cfg, cfg.tls.upstream, "upstream")
    assert isinstance(up, ClientTls) and up.mutual and up.grpc_options == [("grpc.ssl_target_name_override",
                                                                          "localhost")]
    with pytest.raises(TlsConfigError, match=r"\[tls\.peers\].*missing\.crt"):
        client_tls_from_section(cfg, cfg.tls.peers, "peers")
    assert server_tls_from_config(parse_config("")) is None
    assert client_tls_from_section(cfg, parse_config("").tls.upstream, "upstream") is None
    with pytest.raises(TlsConfigError, match=r"\[tls\.peers\]"):
        link_tls_from_config(cfg)  # a worker does not start on a bad [tls.peers]
    links = link_tls_from_config(parse_config(
        '[tls.upstream]\nenabled = true\nca_file = "ca1.crt"\n', base_dir=str(tmp_path)))
    assert isinstance(links.upstream, ClientTls) and not links.upstream.mutual and links.peers is None
    for text, key in (('[tls]\ncert_file = "a"\n', "tls.key_file"),
                      ('[tls]\nclient_ca_file = "a"\n', "tls.client_ca_file"),
                      ('[tls]\nadmin = true\n', "tls.admin"),
                      ('[tls.upstream]\nenabled = true\ncert_file = "a"\n', "tls.upstream.key_file"),
                      ('[tls.peers]\nkey_file = "a"\n', "tls.peers.cert_file"),
                      ('[tls]\ncheck_interval_ms = 0\n', "tls.check_interval_ms"),
                      ('[tls.upstream]\nenable = true\n', "tls.upstream.enable")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse_config(text)
