"""The composition root: every part of one gateway worker, built from the config with its
collaborators passed in explicitly (no hub object read with getattr, no module globals).

    config -> TLS (listeners; links to replicas and peers) -> API keys, admin credentials
           -> metrics, access log, version resolver -> RegionState (pools, health, region
              order, capacity, forwarder) -> InferencePipeline + ModelQueries
           -> HttpFront, GrpcFront -> admin listener (region summary, admin API, status page,
              capacity)

``build_worker`` raises StartupError when a file the config names (keys, certificates,
operators) cannot be used: a gateway must not start without the security it was told to have.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiohttp import web

from core.config import Config, RegionSection
from core.tls import LinkTls, ServerTls, TlsConfigError, link_tls_from_config, server_tls_from_config
from gateway.admin import capacity_api, models_api, status_page
from gateway.admin.listener import AdminListener
from gateway.admin.region_summary import region_summary
from gateway.front.access_log import AccessLog
from gateway.front.admin_auth import AdminCredentials, admin_credentials_from_config
from gateway.front.api_keys import KeysFileError
from gateway.front.auth import Authenticator
from gateway.front.generate import GenerateFront
from gateway.front.grpc_adapter import GrpcFront
from gateway.front.http_adapter import HttpFront, HttpLimits
from gateway.front.pipeline import InferencePipeline, ModelQueries, PipelineSettings
from gateway.front.stream_relay import StreamServices, StreamSettings
from gateway.server.metrics import GatewayMetrics
from gateway.server.region_state import RegionState
from gateway.upstream.http_stream import HttpStreamClient
from replicas.releases.resolver import VersionResolver, resolver_for_gateway

log = logging.getLogger("geogate.gateway")


class StartupError(Exception):
    """A security file (keys, certificates) the config names cannot be used."""


@dataclass(slots=True)
class Worker:
    """What one worker process serves with; ``gateway.server.main`` runs it."""

    cfg: Config
    region: RegionSection
    state: RegionState
    pipeline: InferencePipeline
    http_front: HttpFront
    generate: GenerateFront
    grpc_front: GrpcFront
    admin: AdminListener
    server_tls: ServerTls | None
    auth: Authenticator | None
    admin_credentials: AdminCredentials


def make_authenticator(cfg: Config) -> Authenticator | None:
    """The client listeners' Authenticator (None: [auth] keys_file not set, no authentication)."""
    if not cfg.auth.keys_file:
        return None
    # check_on_request False: the keys file is re-read by a background task (file IO off the loop)
    return Authenticator(cfg.resolve_path(cfg.auth.keys_file), reload_interval_s=cfg.auth.reload_interval_ms / 1000.0,
                         check_on_request=False)


def make_resolver(cfg: Config, region: RegionSection) -> VersionResolver:
    """Model versions from the store's release records. A store that cannot even be opened (a
    bad URL scheme is a config error caught earlier; this is e.g. missing credentials) must not
    stop the data path: requested versions (or the replicas' default) are used, and said."""
    try:
        return resolver_for_gateway(cfg, region.name)
    except Exception as exc:
        log.warning("version resolver unavailable (%s); forwarding requested versions as-is", exc)
        return VersionResolver(None, cutover=cfg.routing.cutover, site=region.name)


def build_worker(cfg: Config, region: RegionSection, *, worker: int = 0, workers: int = 1) -> Worker:
    try:
        server_tls = server_tls_from_config(cfg)
        links: LinkTls = link_tls_from_config(cfg)
        auth = make_authenticator(cfg)
        admin_credentials = admin_credentials_from_config(cfg)
    except (TlsConfigError, KeysFileError) as exc:
        raise StartupError(str(exc)) from None
    metrics = GatewayMetrics(region.name)
    access_log = AccessLog.from_config(cfg.gateway, base_dir=cfg.base_dir, worker=worker, workers=workers)
    state = RegionState(cfg, region, metrics=metrics, access_log=access_log, resolver=make_resolver(cfg, region),
                        links=links, worker=worker, workers=workers)
    settings = PipelineSettings.from_config(cfg, region.name)
    pipeline = InferencePipeline(settings, auth=auth, models=state,
                                 catalog=state.catalog, forwarder=state.forwarder, metrics=metrics, load=state.load,
                                 access_log=access_log)
    queries = ModelQueries(models=state, catalog=state.catalog, pools=state.pools)
    admin = AdminListener(readiness=state.readiness, region_summary=lambda: region_summary(state),
                          exposition=metrics.exposition, credentials=admin_credentials,
                          open_metrics=cfg.admin.open_metrics)
    generate = GenerateFront(settings, auth=auth, models=state, forwarder=state.forwarder, metrics=metrics,
                             load=state.load, access_log=access_log, client=HttpStreamClient(tls=links.upstream),
                             limits=HttpLimits(cfg))
    http_front = HttpFront(cfg, pipeline=pipeline, queries=queries, state=state, auth=auth,
                           region_summary=admin.public_summary, generate=generate)
    streams = StreamServices(StreamSettings(region=region.name, max_elements=cfg.limits.max_tensor_elements,
                                            max_attempts=cfg.gateway.max_attempts),
                             auth=auth, models=state, catalog=state.catalog, pools=state.pools,
                             overload=state.overload, metrics=metrics, sequences=state.forwarder.sequences)
    grpc_front = GrpcFront(cfg, pipeline=pipeline, queries=queries, state=state, auth=auth, streams=streams)
    return Worker(cfg, region, state, pipeline, http_front, generate, grpc_front, admin, server_tls, auth,
                  admin_credentials)


def build_admin_app(w: Worker) -> web.Application:
    """The admin listener: health, region summary and /metrics, the model-version admin API, the
    status page and the capacity view."""
    app = w.admin.app()
    models_api.mount(app, w.cfg, credentials=w.admin_credentials)
    status_page.mount(app, w.state, credentials=w.admin_credentials)
    capacity_api.mount(app, w.state.capacity_control)
    return app
