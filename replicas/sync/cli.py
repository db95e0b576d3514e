"""`geogate sync --config FILE --site S`: the command line of one site's sync agent (the agent
itself: ``replicas.sync.agent``). Builds the agent's parts from the config: the site's
repositories and replicas (``targets_for_site``), the pools' control tokens, ``[tls.upstream]``
for reaching replicas that serve TLS (mutual when it names a client certificate)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from core.config import Config, ConfigError, load_config
from core.logs import setup_logging
from core.srv_discovery import SrvDiscovery
from core.tls import client_tls_from_section
from replicas.releases.manifest import load_public_key
from replicas.server.repository import ControlToken, ControlTokenError
from replicas.store import StoreUnavailable, open_store_from_config
from replicas.sync.agent import SyncAgent
from replicas.sync.metrics import serve_metrics
from replicas.sync.state import Target

log = logging.getLogger("geogate.sync")


def _control_token(cfg: Config, pool) -> str:
    """The pool's replica control token (its control_token_file), checked as replicas check it."""
    if not pool.control_token_file:
        return ""
    path = cfg.resolve_path(pool.control_token_file)
    try:
        return ControlToken.from_file(path).text
    except ControlTokenError as exc:
        raise ConfigError(f"pool {pool.name!r} control_token_file: {exc}") from None


def targets_for_site(cfg: Config, site: str) -> list[Target]:
    """The site's model repositories, each with the replicas of the pools that share it."""
    region = cfg.region(site)
    by_repo: dict[str, Target] = {}
    for pool in region.pools:
        if not pool.repository:
            log.warning("pool has no repository: nothing to sync", extra={"fields": {"pool": pool.name}})
            continue
        repo = cfg.resolve_path(pool.repository)
        token = _control_token(cfg, pool)
        t = by_repo.setdefault(repo, Target(Path(repo), [], [], control_token=token))
        if token != t.control_token:
            raise ConfigError(f"pool {pool.name!r}: pools {t.pools} share its repository {pool.repository!r} but "
                              "not its control_token_file (the sync agent loads them all with one token)")
        t.pools.append(pool.name)
        t.replicas.extend(u for u in pool.replicas if u not in t.replicas)
        t.configured.extend(u for u in pool.replicas if u not in t.configured)
        if pool.discover:
            t.discoveries.append(SrvDiscovery(pool.discover, pool.discover_scheme, resolver=pool.discover_resolver))
    return list(by_repo.values())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="deployment config")
    parser.add_argument("--site", required=True, help="the region whose pools' repositories this agent fills")
    parser.add_argument("--store", default="", metavar="URL", help="override the config's [store] url")
    parser.add_argument("--metrics", default="", metavar="HOST:PORT",
                        help="serve Prometheus /metrics here (default: off)")
    parser.add_argument("--once", action="store_true", help="one pass, then exit (0 when no version failed)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


async def _amain(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    targets = targets_for_site(cfg, args.site)
    replica_tls = client_tls_from_section(cfg, cfg.tls.upstream, "upstream")
    for t in targets:
        t.repository.mkdir(parents=True, exist_ok=True)
    # create=False: a sync agent never makes the store. A store directory that vanished in an
    # outage (an unmounted share) must not come back empty and be written into: the agent
    # keeps serving what it has and waits for the real store to return.
    store = open_store_from_config(cfg, args.store, create=False)
    agent = SyncAgent(store, args.site, targets, poll_interval_s=cfg.sync.poll_interval_ms / 1000,
                      load_timeout_s=cfg.sync.load_timeout_ms / 1000, keep_previous=cfg.sync.keep_previous,
                      rate_limit_bytes_per_s=cfg.sync.download_rate_limit_bytes_per_s,
                      cutover=cfg.routing.cutover, resolver_poll_s=cfg.sync.resolver_poll_interval_ms / 1000,
                      site_stale_after_s=cfg.sync.site_stale_after_ms / 1000,
                      manifest_public_key=load_public_key(cfg.resolve_path(cfg.signing.public_key_file))
                      if cfg.signing.public_key_file else None,
                      replica_tls=replica_tls)
    log.info("sync agent starting", extra={"fields": {
        "site": args.site, "store": store.url, "repositories": [str(t.repository) for t in targets],
        "replicas": [u for t in targets for u in t.replicas], "replica_tls": replica_tls is not None}})
    try:
        if args.once:
            await asyncio.to_thread(agent.clean_staging)
            try:
                await agent.sync_once()
            except StoreUnavailable as exc:
                agent.status.store_failed(exc, retry_in_s=None)
                return 1
            finally:
                await agent.close()
            return 1 if any(st.failed for st in agent.models.values()) else 0
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        runner = await serve_metrics(agent.metrics, args.metrics) if args.metrics else None
        try:
            await agent.run()
        finally:
            if runner is not None:
                await runner.cleanup()
        return 0
    finally:
        await store.close()


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    try:
        import uvloop

        return uvloop.run(_amain(args))
    except ImportError:
        return asyncio.run(_amain(args))
