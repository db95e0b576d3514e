"""TLS for the client-facing listeners, reloaded when the certificate files change, and
client-side TLS (optionally mutual) from the gateway to replicas and peer gateways.

Server side (one ``ServerTls`` per gateway worker, shared by both listeners):
- aiohttp: ``ssl_context()`` is passed to ``web.SockSite(..., ssl_context=...)``. A reload calls
  ``load_cert_chain`` on that same context: connections already open keep their session, new
  handshakes get the new certificate. ``reload_if_changed()`` is cheap (three ``stat`` calls);
  ``watch()`` runs it every ``check_interval_s`` as a background task.
- grpc.aio: ``grpc_credentials()`` is passed to ``server.add_secure_port(address, creds)``. It
  uses ``grpc.dynamic_ssl_server_credentials``: gRPC calls our fetcher before every new
  handshake and we hand it a new certificate configuration only when the files changed.
- ``client_ca_file`` set: clients must present a certificate signed by that CA (mutual TLS);
  the handshake fails otherwise.
A reload that fails (a half-written file, a key that does not match the certificate) is logged
and the previous certificate stays in use; the next check tries again.

Client side (gateway -> replica / peer gateway): ``client_ssl_context(...)`` for HTTP clients
and ``grpc_channel_credentials(...)`` for gRPC channels, from files, with an optional client
certificate for mutual TLS.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from core.watched_file import WatchedFiles

if TYPE_CHECKING:
    from core.config import ClientTlsSection, Config

log = logging.getLogger("geogate.tls")

CHECK_INTERVAL_S = 2.0
MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2
H2_ALPN = ["h2"]
HTTP_ALPN = ["http/1.1"]


class TlsConfigError(ValueError):
    """Certificate or key files that cannot be used; the message names the file."""


@dataclass(frozen=True, slots=True)
class ServerTlsSettings:
    """What a listener needs (mirrors the proposed ``[tls]`` config section)."""

    cert_file: str
    key_file: str
    client_ca_file: str = ""  # non-empty: require client certificates signed by this CA (mTLS)
    check_interval_s: float = CHECK_INTERVAL_S


@dataclass(frozen=True, slots=True)
class ClientTlsSettings:
    """Gateway -> replica / peer (mirrors the proposed ``[upstream_tls]`` config section)."""

    ca_file: str = ""  # empty: the system's trust store
    cert_file: str = ""  # client certificate for mutual TLS (with key_file)
    key_file: str = ""
    server_name: str = ""  # override the name checked against the certificate (SNI too)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TlsConfigError(f"cannot read {what} {path!r}: {exc.strerror}") from None
    if not data.strip():
        raise TlsConfigError(f"{what} {path!r} is empty")
    return data


class ServerTls:
    """Server certificate, key and optional client CA, reloaded when their files change."""

    def __init__(self, settings: ServerTlsSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()  # gRPC calls the fetcher from its own threads
        # Two consumers of the same files, each with what it last loaded: the aiohttp context
        # (reload_if_changed) and gRPC's certificate fetcher (_grpc_fetch).
        self._files = WatchedFiles(settings.cert_file, settings.key_file, settings.client_ca_file)
        self._ctx = self._new_context()  # raises TlsConfigError: a bad file at startup is fatal
        self._grpc_files = WatchedFiles(*self._files.paths, seen=self._files.seen)
        self.reloads = 0
        self.last_error = ""

    @property
    def mutual(self) -> bool:
        return bool(self.settings.client_ca_file)

    # ------------------------------------------------------------------ aiohttp

    def _load_into(self, ctx: ssl.SSLContext) -> None:
        s = self.settings
        _read(s.cert_file, "certificate file")
        _read(s.key_file, "key file")
        try:
            ctx.load_cert_chain(s.cert_file, s.key_file)
        except (ssl.SSLError, OSError) as exc:
            raise TlsConfigError(f"cannot load certificate {s.cert_file!r} with key {s.key_file!r}: {exc}") from None
        if s.client_ca_file:
            _read(s.client_ca_file, "client CA file")
            try:
                ctx.load_verify_locations(cafile=s.client_ca_file)
            except (ssl.SSLError, OSError) as exc:
                raise TlsConfigError(f"cannot load client CA {s.client_ca_file!r}: {exc}") from None

    def _new_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = MIN_TLS_VERSION
        ctx.set_alpn_protocols(HTTP_ALPN)
        if self.settings.client_ca_file:
            ctx.verify_mode = ssl.CERT_REQUIRED
        self._load_into(ctx)
        return ctx

    def ssl_context(self) -> ssl.SSLContext:
        """The context for aiohttp's listener (the same object for the process's lifetime)."""
        return self._ctx

    def reload_if_changed(self) -> bool:
        """Load changed files into the live context; True when new handshakes see new files.

        Note: OpenSSL can add CA certificates to a live context but not remove them; a client
        CA that must be distrusted needs a restart."""
        with self._lock:
            sig = self._files.changed()
            if sig is None:
                return False
            try:
                # Check the pair on a scratch context first: a failed load_cert_chain on the live
                # context can leave it with the new certificate and no key (every handshake fails).
                _check_pair(self.settings)
                self._load_into(self._ctx)
            except TlsConfigError as exc:
                if exc.args[0] != self.last_error:
                    log.error("TLS files changed but not reloaded (keeping the previous certificate): %s", exc)
                self.last_error = str(exc)
                return False  # the signature is kept old: retried at the next check
            self._files.accept(sig)
            self.last_error = ""
            self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.settings.cert_file)
        return True

    async def watch(self, interval_s: float | None = None) -> None:
        """Poll the files until cancelled (start with ``asyncio.create_task``)."""
        interval = interval_s or self.settings.check_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                # stat + maybe a reload: quick, but keep file IO off the loop all the same
                await asyncio.to_thread(self.reload_if_changed)
            except Exception:  # never let the watcher die
                log.exception("TLS reload check failed")

    # ------------------------------------------------------------------ gRPC

    def _grpc_config(self):
        s = self.settings
        cert, key = _read(s.cert_file, "certificate file"), _read(s.key_file, "key file")
        ca = _read(s.client_ca_file, "client CA file") if s.client_ca_file else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _grpc_fetch(self):
        """Called by gRPC before each new handshake: a new configuration, or None (no change)."""
        with self._lock:
            sig = self._grpc_files.changed()
            if sig is None:
                return None
            try:
                config = self._grpc_config()
                _check_pair(self.settings)
            except TlsConfigError as exc:
                log.error("gRPC TLS files changed but not reloaded: %s", exc)
                return None
            self._grpc_files.accept(sig)
        log.info("gRPC TLS certificate reloaded from %s", self.settings.cert_file)
        return config

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``grpc.aio.Server.add_secure_port`` (reloading, optionally mutual)."""
        return grpc.dynamic_ssl_server_credentials(self._grpc_config(), self._grpc_fetch,
                                                   require_client_authentication=self.mutual)


def _check_pair(s: ServerTlsSettings) -> None:
    """A certificate and key that belong together (gRPC would fail the handshake instead)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(s.cert_file, s.key_file)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"certificate {s.cert_file!r} and key {s.key_file!r} do not load: {exc}") from None


# ---------------------------------------------------------------------------- client side


class _NamedContext(ssl.SSLContext):
    """A client context that checks the server's certificate against a fixed name (and sends it
    as SNI) whatever address the connection went to: replicas are dialled by IP:port, their
    certificates often name a service. Every TLS client (asyncio, uvloop, aiohttp) goes through
    ``wrap_bio``/``wrap_socket``, so the override holds for all of them."""

    server_name_override = ""

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None, session=None):
        return super().wrap_bio(incoming, outgoing, server_side=server_side,
                                server_hostname=self.server_name_override or server_hostname, session=session)

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, suppress_ragged_eofs=True,
                    server_hostname=None, session=None):
        return super().wrap_socket(sock, server_side=server_side, do_handshake_on_connect=do_handshake_on_connect,
                                   suppress_ragged_eofs=suppress_ragged_eofs,
                                   server_hostname=self.server_name_override or server_hostname, session=session)


def client_ssl_context(settings: ClientTlsSettings) -> ssl.SSLContext:
    """For HTTP clients (aiohttp ``ssl=`` / a TLS socket) talking to replicas or peers."""
    ctx = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificates and host names
    ctx.server_name_override = settings.server_name
    ctx.minimum_version = MIN_TLS_VERSION
    try:
        if settings.ca_file:
            _read(settings.ca_file, "CA file")
            ctx.load_verify_locations(cafile=settings.ca_file)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if settings.cert_file or settings.key_file:
            if not (settings.cert_file and settings.key_file):
                raise TlsConfigError("client TLS: give both cert_file and key_file for mutual TLS")
            ctx.load_cert_chain(settings.cert_file, settings.key_file)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"client TLS files unusable: {exc}") from None
    return ctx


def grpc_channel_credentials(settings: ClientTlsSettings) -> grpc.ChannelCredentials:
    """For ``grpc.aio.secure_channel`` to replicas or peers. With ``server_name`` set, also pass
    ``("grpc.ssl_target_name_override", server_name)`` in the channel options
    (``grpc_channel_options``)."""
    ca = _read(settings.ca_file, "CA file") if settings.ca_file else None
    if bool(settings.cert_file) != bool(settings.key_file):
        raise TlsConfigError("client TLS: give both cert_file and key_file for mutual TLS")
    key = _read(settings.key_file, "client key file") if settings.key_file else None
    cert = _read(settings.cert_file, "client certificate file") if settings.cert_file else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def grpc_channel_options(settings: ClientTlsSettings) -> list[tuple[str, str]]:
    return [("grpc.ssl_target_name_override", settings.server_name)] if settings.server_name else []


# ---------------------------------------------------------------------------- from the config


class ClientTls:
    """One kind of outgoing link's TLS (gateway -> replicas, or -> peer gateways), built once per
    worker from files: an SSL context for HTTP and channel credentials for gRPC."""

    def __init__(self, settings: ClientTlsSettings) -> None:
        self.settings = settings
        self.ssl_context = client_ssl_context(settings)  # raises TlsConfigError naming the file
        self._grpc_credentials = grpc_channel_credentials(settings)
        self.grpc_options = grpc_channel_options(settings)

    @property
    def mutual(self) -> bool:
        return bool(self.settings.cert_file)

    def http_base(self, address: str) -> str:
        return f"https://{address}"

    def grpc_channel(self, address: str, options: list | None = None) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(address, self._grpc_credentials, options=[*(options or []),
                                                                                   *self.grpc_options])


def server_tls_from_config(cfg: Config) -> ServerTls | None:
    """The client-facing listeners' TLS from ``[tls]`` (None: plaintext); TlsConfigError when a
    file is unusable (a gateway must not start without the TLS it was told to serve)."""
    t = cfg.tls
    if not t.cert_file:
        return None
    return ServerTls(ServerTlsSettings(cfg.resolve_path(t.cert_file), cfg.resolve_path(t.key_file),
                                       cfg.resolve_path(t.client_ca_file) if t.client_ca_file else "",
                                       check_interval_s=t.check_interval_ms / 1000.0))


def client_tls_from_section(cfg: Config, section: ClientTlsSection, what: str) -> ClientTls | None:
    """``[tls.upstream]`` / ``[tls.peers]`` as a ClientTls (None when not enabled)."""
    if not section.enabled:
        return None

    def path(p: str) -> str:
        return cfg.resolve_path(p) if p else ""

    try:
        return ClientTls(ClientTlsSettings(path(section.ca_file), path(section.cert_file), path(section.key_file),
                                           section.server_name))
    except TlsConfigError as exc:
        raise TlsConfigError(f"[tls.{what}]: {exc}") from None


@dataclass(frozen=True, slots=True)
class LinkTls:
    """A gateway worker's outgoing TLS, built once from the config and handed to the parts that
    open links (replica pools and their health checks; peer links and region health)."""

    upstream: ClientTls | None = None  # to replicas ([tls.upstream]); None: plaintext
    peers: ClientTls | None = None  # to peer gateways ([tls.peers]); None: plaintext


def link_tls_from_config(cfg: Config) -> LinkTls:
    """``[tls.upstream]`` and ``[tls.peers]``; TlsConfigError when a file is unusable."""
    return LinkTls(upstream=client_tls_from_section(cfg, cfg.tls.upstream, "upstream"),
                   peers=client_tls_from_section(cfg, cfg.tls.peers, "peers"))
