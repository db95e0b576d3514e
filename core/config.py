"""The deployment's one declarative TOML file (DESIGN.md, Configuration).

Every process reads the same file and picks its own part with ``--region`` / ``--site``.
Each section is a frozen dataclass; the loader walks the TOML tables against the dataclass
fields, so an unknown key or a value of the wrong type or range is an error that names the
key path (``regions[0].pools[1].kind``) and the bad value.

Ownership: each section's dataclass is owned by the part that reads it; add fields with
defaults so DESIGN.md's example stays a complete, valid config.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file problem, always naming the key path and the offending value."""


def _check(path: str, ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {message}")


def _one_of(*choices: str):
    def check(path: str, value: Any) -> None:
        _check(path, value in choices, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")

    return check


def _positive(path: str, value: Any) -> None:
    _check(path, value > 0, f"must be > 0, got {value!r}")


def _non_negative(path: str, value: Any) -> None:
    _check(path, value >= 0, f"must be >= 0, got {value!r}")


def _fraction(path: str, value: Any) -> None:
    _check(path, 0.0 <= value <= 1.0, f"must be between 0 and 1, got {value!r}")


def _store_timeout_s(path: str, value: Any) -> None:
    # NaN fails every comparison; inf would mean "wait forever", which is what these bound.
    _check(path, 0 < value <= 3600, f"must be a number of seconds, > 0 and <= 3600, got {value!r}")


def _host_port(path: str, value: Any) -> None:
    host, sep, port = str(value).rpartition(":")
    # isascii(): str.isdigit() also accepts '²' (int() then raises) and other scripts' digits
    # (int('١٢') == 12): both were found by fuzzing the loader.
    _check(path, bool(sep and host and port.isascii() and port.isdigit() and 0 < int(port) < 65536),
           f"must be HOST:PORT, got {value!r}")


def _ip_address(path: str, value: Any) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(f"{path}: not an IP address: {value!r}") from None


def _cidr(path: str, value: Any) -> None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(f"{path}: not a CIDR network: {value!r}") from None


def _replica_url(path: str, value: Any) -> None:
    scheme, sep, rest = str(value).partition("://")
    _check(path, sep == "://" and scheme in ("http", "grpc", "https", "grpcs"),
           f"replica URL must be http://HOST:PORT or grpc://HOST:PORT, got {value!r}")
    _host_port(path, rest.rstrip("/"))


def _location(path: str, value: Any) -> None:
    _check(path, len(value) == 2, f"must be [latitude, longitude], got {value!r}")
    lat, lon = value
    _check(path, -90 <= lat <= 90 and -180 <= lon <= 180, f"latitude/longitude out of range: {value!r}")


def _each(check):
    def check_all(path: str, values: Any) -> None:
        for i, v in enumerate(values):
            check(f"{path}[{i}]", v)

    return check_all


def _v(check, **kw):
    """Field metadata carrying a validator."""
    return field(metadata={"check": check}, **kw)


# ---------------------------------------------------------------- sections


@dataclass(frozen=True)
class DeploymentSection:
    name: str = "geogate"


@dataclass(frozen=True)
class StoreSection:
    url: str = "file://.geogate/store"
    # S3 only; AWS_* environment variables are used when these are empty.
    endpoint_url: str = ""
    region: str = ""
    access_key_id_env: str = "AWS_ACCESS_KEY_ID"
    secret_access_key_env: str = "AWS_SECRET_ACCESS_KEY"
    # S3 only: how long to wait for a TCP connection / for the next bytes of an answer before a
    # request counts as hanging (it then fails at once: no retry of a hang), and how many
    # attempts a request gets when the server answers with a transient error (5xx, throttling,
    # refused or dropped connection). replicas/store/s3_store.py.
    connect_timeout_s: float = _v(_store_timeout_s, default=3.0)
    read_timeout_s: float = _v(_store_timeout_s, default=10.0)
    max_attempts: int = _v(lambda p, v: _check(p, 1 <= v <= 10, f"must be 1..10, got {v!r}"), default=3)


@dataclass(frozen=True)
class RoutingSection:
    mode: str = _v(_one_of("local-first", "nearest-to-client"), default="local-first")
    cutover: str = _v(_one_of("global", "per-site"), default="global")
    # Envoy's overprovisioning factor: a region with healthy fraction h takes min(1, factor*h).
    overprovisioning_factor: float = _v(_positive, default=1.4)
    # A recovered region takes traffic back only after being healthy this long.
    failback_hold_ms: int = _v(_non_negative, default=5000)
    trusted_proxies: list[str] = _v(_each(_cidr), default_factory=list)
    geoip_database: str = ""


@dataclass(frozen=True)
class HealthSection:
    interval_ms: int = _v(_positive, default=1000)
    timeout_ms: int = _v(_positive, default=500)
    rise: int = _v(_positive, default=2)
    fall: int = _v(_positive, default=2)
    # Passive outlier detection (Envoy's outlier_detection, in spirit).
    consecutive_failures: int = _v(_positive, default=3)
    base_ejection_ms: int = _v(_positive, default=5000)
    max_ejection_ms: int = _v(_positive, default=60000)
    max_ejection_percent: int = _v(lambda p, v: _check(p, 0 <= v <= 100, f"must be 0..100, got {v!r}"),
                                   default=50)
    # Below this healthy fraction a pool is in panic mode: route over every replica.
    panic_threshold: float = _v(_fraction, default=0.5)


@dataclass(frozen=True)
class GatewaySection:
    default_timeout_ms: int = _v(_positive, default=30000)
    per_try_timeout_ms: int = _v(_non_negative, default=0)  # 0: no per-try limit but the deadline
    max_attempts: int = _v(_positive, default=3)
    retry_budget_percent: float = _v(_non_negative, default=20.0)
    retry_budget_min_per_s: float = _v(_non_negative, default=10.0)
    retry_backoff_base_ms: int = _v(_non_negative, default=5)
    retry_backoff_max_ms: int = _v(_non_negative, default=100)
    hedge_after_percentile: float = _v(_non_negative, default=0.0)  # 0: hedging off
    max_body_bytes: int = _v(_positive, default=64 * 1024 * 1024)
    max_concurrent_requests: int = _v(_positive, default=4096)
    upstream_connections_per_replica: int = _v(_positive, default=64)
    # Where gRPC ModelInfer calls go first when a pool lists replicas of both protocols: "http"
    # (translated to KServe binary HTTP: grpcio's client costs the gateway, and the geogate
    # replica's gRPC listener costs the replica, more per call than translating; README "Speed")
    # or "grpc" (the request's bytes passed through).
    grpc_upstream: str = _v(_one_of("grpc", "http"), default="http")
    discovery_interval_ms: int = _v(_positive, default=5000)
    drain_timeout_ms: int = _v(_non_negative, default=15000)
    metrics: str = ""  # HOST:PORT for a separate /metrics listener; empty: only on admin
    access_log: bool = True  # one JSON line per inference request (stderr, or access_log_file)
    # A file instead of stderr, rotated at access_log_max_bytes keeping access_log_backups old
    # files (FILE.1 ...); with --workers N each worker writes FILE with ".wK" before its suffix.
    access_log_file: str = ""
    access_log_max_bytes: int = _v(_positive, default=64 * 1024 * 1024)
    access_log_backups: int = _v(_positive, default=5)
    # gRPC connections are closed gracefully (HTTP/2 GOAWAY, then in-flight calls finish) after
    # this long, +-10%; a worker replaced by a rolling restart waits for this to hand its clients
    # over without a failed call. 0: never (a rolling restart then stops with the connections open).
    grpc_max_connection_age_ms: int = _v(_non_negative, default=10000)


@dataclass(frozen=True)
class AdminSection:
    token: str = ""
    token_env: str = "GEOGATE_ADMIN_TOKEN"
    # Named operators with their own tokens, hashed at rest (a keys file in gateway.front.api_keys' format:
    # `python -m gateway.front.auth new-key NAME`); the name is recorded as `who` in the release history
    # and the audit log. Re-read when it changes. Either this or `token` (or both).
    operators_file: str = ""
    # With admin credentials (token or operators_file), everything on the admin listener but
    # /v2/health/*, the region summary (without replica URLs, routing and peers) and /ui/login
    # needs them; open_metrics = true lets scrapers read /metrics without (also on [gateway] metrics).
    open_metrics: bool = False
    # Lifetime of a status page login (the browser's session cookie).
    session_ttl_s: int = _v(_positive, default=12 * 3600)


# ---------------------------------------------------------------- security (gateway.front.auth, core.tls)


@dataclass(frozen=True)
class AuthSection:
    """Client authentication on the client-facing listeners (gateway.front.auth)."""

    keys_file: str = ""  # empty: no authentication, every client may call every model
    reload_interval_ms: int = _v(_positive, default=1000)  # how often the keys file is checked for changes
    # Server/model metadata, config, ready and stats need a key too (false); health never does.
    open_metadata: bool = False
    # The environment variable holding the API key this gateway presents when it forwards a
    # request to a peer region's gateway (cross-region failover); that key must be in the peers'
    # keys files. The client's own key was checked (and its limits applied) here already.
    peer_key_env: str = "GEOGATE_PEER_KEY"


@dataclass(frozen=True)
class ClientTlsSection:
    """The gateway as a TLS client (to replicas: [tls.upstream]; to peer gateways: [tls.peers])."""

    enabled: bool = False
    ca_file: str = ""  # empty: the system's trust store
    cert_file: str = ""  # client certificate (with key_file) for mutual TLS
    key_file: str = ""
    server_name: str = ""  # name checked against the server's certificate instead of its address


@dataclass(frozen=True)
class TlsSection:
    """TLS on the client-facing HTTP and gRPC listeners (core.tls); files re-read on change."""

    cert_file: str = ""  # empty (with key_file): plaintext listeners
    key_file: str = ""
    client_ca_file: str = ""  # require client certificates signed by this CA (mutual TLS)
    check_interval_ms: int = _v(_positive, default=2000)
    admin: bool = False  # the admin listener too (then status tools need https)
    upstream: ClientTlsSection = field(default_factory=ClientTlsSection)
    peers: ClientTlsSection = field(default_factory=ClientTlsSection)

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


@dataclass(frozen=True)
class LimitsSection:
    """Request limits of the client-facing listeners, beyond [gateway] max_body_bytes (body and
    decompressed body) and max_concurrent_requests (per worker)."""

    max_header_bytes: int = _v(_positive, default=16384)  # HTTP request line + headers; gRPC metadata
    max_tensor_elements: int = _v(_positive, default=1 << 26)  # per input tensor, from its shape
    # Slow clients (slowloris): the request line and headers must arrive within this of the first
    # byte (or of the connection opening), and the body within request_body_timeout_ms after them.
    request_head_timeout_ms: int = _v(_positive, default=10000)
    request_body_timeout_ms: int = _v(_positive, default=30000)
    idle_timeout_ms: int = _v(_positive, default=75000)  # idle keep-alive connections are closed


@dataclass(frozen=True)
class SigningSection:
    """Ed25519 signatures of model manifests (replicas.releases.manifest)."""

    public_key_file: str = ""  # set: sites install only versions whose manifest this key signed
    private_key_file: str = ""  # `geogate models push` signs with it (or --sign-key)


@dataclass(frozen=True)
class SyncSection:
    poll_interval_ms: int = _v(_positive, default=2000)
    load_timeout_ms: int = _v(_positive, default=120000)
    keep_previous: int = _v(_non_negative, default=1)
    # Cap on each download's rate (0: unlimited), to spare a site's WAN link.
    download_rate_limit_bytes_per_s: int = _v(_non_negative, default=0)
    # A site whose status heartbeat is older than this counts as down for global cutover.
    site_stale_after_ms: int = _v(_positive, default=15000)
    # How often gateways' version resolvers re-read release records and site status.
    resolver_poll_interval_ms: int = _v(_positive, default=1000)


@dataclass(frozen=True)
class DnsSection:
    listen: str = _v(_host_port, default="127.0.0.1:5353")
    zone: str = "geogate.test."
    service: str = "infer.geogate.test."
    ttl: int = _v(_non_negative, default=20)
    answers: int = _v(lambda p, v: _check(p, v in (1, 2), f"must be 1 or 2, got {v!r}"), default=1)
    check_interval_ms: int = _v(_positive, default=500)
    check_timeout_ms: int = _v(_positive, default=400)
    fall: int = _v(_positive, default=2)
    rise: int = _v(_positive, default=3)
    # Zone apex records.  ns: NS names (empty: "ns1.<zone>"); ns_addresses: A/AAAA answered
    # for in-zone NS names (glue; empty: none).  SOA: mname empty = first NS name, rname empty =
    # "hostmaster.<zone>"; soa_minimum_s is the negative-caching TTL (RFC 2308).
    ns: list[str] = field(default_factory=list)
    ns_addresses: list[str] = _v(_each(_ip_address), default_factory=list)
    soa_mname: str = ""
    soa_rname: str = ""
    soa_serial: int = _v(_non_negative, default=1)
    soa_refresh_s: int = _v(_positive, default=3600)
    soa_retry_s: int = _v(_positive, default=600)
    soa_expire_s: int = _v(_positive, default=604800)
    soa_minimum_s: int = _v(_non_negative, default=20)
    # HOST:PORT for /metrics and /geogate/v1/dns (region health as DNS sees it); empty: off.
    metrics: str = _v(lambda p, v: v == "" or _host_port(p, v), default="")
    # DNS over TCP (RFC 7766): open connections in all and per client address; when all are in
    # use, a new connection closes the one idle longest. A connection is closed when no complete
    # query arrives within the idle timeout (a partial length prefix or message does not count).
    tcp_max_connections: int = _v(_positive, default=256)
    tcp_max_connections_per_client: int = _v(_positive, default=16)
    tcp_idle_timeout_ms: int = _v(_positive, default=5000)
    # Response rate limiting over UDP (BIND's RRL, per source prefix): responses per second per
    # /rate_limit_ipv4_prefix_len (IPv6: /rate_limit_ipv6_prefix_len) of the source address (0:
    # off); over it, every rate_limit_slip-th response is sent truncated (TC=1: the client can
    # retry over TCP, which is not limited), the others are dropped (slip 0: all dropped).
    # At most rate_limit_max_sources prefixes are tracked (the least recently seen goes first).
    rate_limit_responses_per_s: int = _v(_non_negative, default=100)
    rate_limit_slip: int = _v(lambda p, v: _check(p, 0 <= v <= 10, f"must be 0..10, got {v!r}"), default=2)
    rate_limit_ipv4_prefix_len: int = _v(lambda p, v: _check(p, 1 <= v <= 32, f"must be 1..32, got {v!r}"),
                                         default=24)
    rate_limit_ipv6_prefix_len: int = _v(lambda p, v: _check(p, 1 <= v <= 128, f"must be 1..128, got {v!r}"),
                                         default=56)
    rate_limit_max_sources: int = _v(_positive, default=20000)


@dataclass(frozen=True)
class PoolSection:
    name: str
    kind: str = _v(_one_of("geogate", "triton"), default="geogate")
    replicas: list[str] = _v(_each(_replica_url), default_factory=list)
    discover: str = ""  # dns+srv://_grpc._tcp.eu.example.  (scheme of the SRV service: see geo.srv)
    discover_scheme: str = _v(_one_of("http", "grpc"), default="grpc")
    discover_resolver: str = ""  # HOST:PORT of the DNS server to ask; empty: the system's
    weights: dict[str, int] = field(default_factory=dict)  # replica URL -> weight (default 1)
    repository: str = ""
    # The replicas' control token (`geogate replica --control-token-file`), presented by the sync
    # agent on their repository API; empty: the replicas' repository API is open.
    control_token_file: str = ""
    metrics_scrape: bool = False
    # Where the load-signal scraper (gateway.upstream.load_signals) reads each replica's Prometheus
    # /metrics: metrics_ports maps a replica URL to its metrics port (several replicas on one
    # host); otherwise metrics_port on the replica's host; 0: the default for the kind (a geogate
    # replica reached over HTTP serves /metrics on that port, anything else on 8002, the default
    # metrics port of Triton and of `geogate replica`).
    metrics_port: int = _v(lambda p, v: _check(p, 0 <= v < 65536, f"must be a port 0..65535, got {v!r}"),
                           default=0)
    metrics_ports: dict[str, int] = _v(
        lambda p, v: [_check(f"{p}.{k}", 0 < port < 65536, f"must be a port 1..65535, got {port!r}")
                      for k, port in v.items()], default_factory=dict)
    metrics_interval_ms: int = _v(_positive, default=500)  # how often each replica is scraped


@dataclass(frozen=True)
class RegionSection:
    name: str
    location: list[float] = _v(_location, default_factory=lambda: [0.0, 0.0])
    http: str = _v(_host_port, default="127.0.0.1:8000")
    grpc: str = _v(_host_port, default="127.0.0.1:8001")
    admin: str = _v(_host_port, default="127.0.0.1:8002")
    addresses: list[str] = _v(_each(_ip_address), default_factory=list)
    client_cidrs: list[str] = _v(_each(_cidr), default_factory=list)
    pools: list[PoolSection] = field(default_factory=list)


@dataclass(frozen=True)
class CapacitySection:
    """Elastic capacity and overload handling (gateway.routing.capacity, gateway.routing.admission,
    gateway.routing.load_spill, gateway.world.autoscaler)."""

    # Capacity tracking, priority classes (shedding) and load-aware spill in the gateway's data
    # path; false: none of them (desired replica counts are not exported either).
    enabled: bool = True
    # Per-replica concurrency limit: > 0 configured; 0 learned from the latency knee.
    replica_concurrency_limit: int = _v(_non_negative, default=0)
    initial_concurrency_limit: int = _v(_positive, default=8)  # while learning
    max_concurrency_limit: int = _v(_positive, default=256)
    # Latency above knee_factor x the replica's minimum latency means it is queueing inside.
    latency_knee_factor: float = _v(lambda p, v: _check(p, v > 1.0, f"must be > 1, got {v!r}"), default=2.0)
    # Desired replicas: keep average in-flight at this fraction of the pools' limits.
    target_utilization: float = _v(lambda p, v: _check(p, 0.0 < v <= 1.0, f"must be in (0, 1], got {v!r}"),
                                   default=0.7)
    min_replicas: int = _v(_positive, default=1)
    max_replicas: int = _v(_positive, default=10)
    in_flight_window_s: float = _v(_positive, default=10.0)  # averaging window of in-flight samples
    scale_up_window_s: float = _v(_non_negative, default=3.0)
    scale_down_window_s: float = _v(_non_negative, default=60.0)  # HPA's stabilization window
    sample_interval_ms: int = _v(_positive, default=250)
    # Admission (priority classes; gateway.routing.admission): sheddable is refused above its
    # utilization (in-flight over the replicas' concurrency limits) OR expected-queueing bound;
    # standard only above both (README "Overload" says why); critical never.
    default_priority: str = _v(_one_of("critical", "standard", "sheddable"), default="standard")
    sheddable_max_utilization: float = _v(_positive, default=1.0)
    sheddable_max_queue_ms: float = _v(_non_negative, default=50.0)
    # Standard traffic is refused only in deep overload: past the knee is queueing, and a
    # transient stall (a replica loading a model, a GC pause) must not cost standard requests
    # that would have waited a moment.
    standard_max_utilization: float = _v(_positive, default=8.0)
    standard_max_queue_ms: float = _v(_non_negative, default=5000.0)
    # Load-aware spill to a peer region: enter above spill_queue_ms of expected local queueing,
    # leave below spill_queue_ms * spill_exit_fraction, staying at least spill_min_dwell_ms.
    spill_queue_ms: float = _v(_positive, default=100.0)
    spill_exit_fraction: float = _v(lambda p, v: _check(p, 0.0 < v < 1.0, f"must be in (0, 1), got {v!r}"),
                                    default=0.7)
    spill_min_dwell_ms: int = _v(_non_negative, default=2000)
    spill_ramp_step: float = _v(lambda p, v: _check(p, 0.0 < v <= 1.0, f"must be in (0, 1], got {v!r}"),
                                default=0.25)
    # Local autoscaler (`geogate up --autoscale`, gateway.world.autoscaler): it answers DNS on this
    # HOST:PORT and scales every pool whose discover_resolver is this address (empty: off).
    autoscale_dns: str = _v(lambda p, v: v == "" or _host_port(p, v), default="")
    autoscale_interval_ms: int = _v(_positive, default=1000)
    # Longest wait for the gateway to stop using a replica removed from DNS before stopping it.
    autoscale_drain_wait_ms: int = _v(_positive, default=30000)

    def __post_init__(self) -> None:
        _check("capacity.max_replicas", self.max_replicas >= self.min_replicas,
               f"must be >= capacity.min_replicas ({self.min_replicas}), got {self.max_replicas}")
        _check("capacity.standard_max_utilization",
               self.standard_max_utilization >= self.sheddable_max_utilization,
               "must be >= capacity.sheddable_max_utilization (sheddable traffic is refused first)")
        _check("capacity.standard_max_queue_ms", self.standard_max_queue_ms >= self.sheddable_max_queue_ms,
               "must be >= capacity.sheddable_max_queue_ms (sheddable traffic is refused first)")


@dataclass(frozen=True)
class Config:
    deployment: DeploymentSection = field(default_factory=DeploymentSection)
    store: StoreSection = field(default_factory=StoreSection)
    routing: RoutingSection = field(default_factory=RoutingSection)
    health: HealthSection = field(default_factory=HealthSection)
    gateway: GatewaySection = field(default_factory=GatewaySection)
    admin: AdminSection = field(default_factory=AdminSection)
    sync: SyncSection = field(default_factory=SyncSection)
    dns: DnsSection = field(default_factory=DnsSection)
    regions: list[RegionSection] = field(default_factory=list)
    capacity: CapacitySection = field(default_factory=CapacitySection)
    auth: AuthSection = field(default_factory=AuthSection)
    tls: TlsSection = field(default_factory=TlsSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    signing: SigningSection = field(default_factory=SigningSection)
    # Where the file was read from: relative paths in it are relative to this directory.
    base_dir: str = field(default=".", metadata={"internal": True})

    def region(self, name: str) -> RegionSection:
        for r in self.regions:
            if r.name == name:
                return r
        known = ", ".join(r.name for r in self.regions) or "none"
        raise ConfigError(f"--region/--site: no region named {name!r} (known: {known})")

    def resolve_path(self, path: str) -> str:
        """A path from the config, made absolute against the config file's directory."""
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(self.base_dir, path))

    def admin_token(self) -> str:
        return self.admin.token or os.environ.get(self.admin.token_env, "")


# ---------------------------------------------------------------- loader


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(path: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        _check(path, isinstance(value, dict), f"must be a table, got {value!r}")
        return _build(path, tp, value)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        _check(path, isinstance(value, list), f"must be a list, got {value!r}")
        return [_convert(f"{path}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if origin is dict:
        _key_tp, val_tp = typing.get_args(tp)
        _check(path, isinstance(value, dict), f"must be a table, got {value!r}")
        return {str(k): _convert(f"{path}.{k}", val_tp, v) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for alt in typing.get_args(tp):
            try:
                return _convert(path, alt, value)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: unexpected value {value!r}")
    if tp is float:
        _check(path, isinstance(value, (int, float)) and not isinstance(value, bool),
               f"must be a number, got {value!r}")
        return float(value)
    if tp is int:
        _check(path, isinstance(value, int) and not isinstance(value, bool), f"must be an integer, got {value!r}")
        return value
    if tp is bool:
        _check(path, isinstance(value, bool), f"must be true or false, got {value!r}")
        return value
    if tp is str:
        _check(path, isinstance(value, str), f"must be a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")


def _build(path: str, cls: type, table: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"{where}{unknown[0]}: unknown key (known keys here: {', '.join(sorted(fields))})"
        )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key_path = f"{path}.{name}" if path else name
        if name not in table:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key_path}: required key is missing")
            continue
        value = _convert(key_path, hints[name], table[name])
        check = f.metadata.get("check")
        if check:
            check(key_path, value)
        kwargs[name] = value
    return cls(**kwargs)


def _cross_checks(cfg: Config) -> None:
    seen_regions: set[str] = set()
    for i, region in enumerate(cfg.regions):
        _check(f"regions[{i}].name", region.name not in seen_regions, f"duplicate region {region.name!r}")
        seen_regions.add(region.name)
        seen_pools: set[str] = set()
        for j, pool in enumerate(region.pools):
            p = f"regions[{i}].pools[{j}]"
            _check(f"{p}.name", pool.name not in seen_pools, f"duplicate pool {pool.name!r}")
            seen_pools.add(pool.name)
            _check(p, bool(pool.replicas) != bool(pool.discover),
                   "give exactly one of 'replicas' (a list of URLs) or 'discover' (dns+srv://NAME)")
            if pool.discover:
                _check(f"{p}.discover", pool.discover.startswith("dns+srv://")
                       and len(pool.discover) > len("dns+srv://"),
                       f"must be dns+srv://NAME, got {pool.discover!r}")
            for url in pool.weights:
                _check(f"{p}.weights", url in pool.replicas, f"weight for unknown replica {url!r}")
    scheme = cfg.store.url.partition("://")[0]
    _check("store.url", scheme in ("file", "s3"), f"must start with file:// or s3://, got {cfg.store.url!r}")
    _security_checks(cfg)


def _security_checks(cfg: Config) -> None:
    t = cfg.tls
    _check("tls.key_file" if t.cert_file else "tls.cert_file", bool(t.cert_file) == bool(t.key_file),
           "give both tls.cert_file and tls.key_file (or neither: plaintext listeners)")
    _check("tls.client_ca_file", not t.client_ca_file or bool(t.cert_file),
           "client certificates need TLS on the listeners: set tls.cert_file and tls.key_file too")
    _check("tls.admin", not t.admin or bool(t.cert_file), "needs tls.cert_file and tls.key_file")
    for name, c in (("upstream", t.upstream), ("peers", t.peers)):
        _check(f"tls.{name}.key_file" if c.cert_file else f"tls.{name}.cert_file",
               bool(c.cert_file) == bool(c.key_file), "give both cert_file and key_file (or neither)")


def parse_config(text: str, *, base_dir: str = ".", source: str = "<string>") -> Config:
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    cfg = _build("", Config, table)
    cfg = dataclasses.replace(cfg, base_dir=base_dir)
    _cross_checks(cfg)
    return cfg


def load_config(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {str(p)!r}: {exc.strerror}") from None
    try:
        return parse_config(text, base_dir=str(p.resolve().parent), source=str(p))
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
