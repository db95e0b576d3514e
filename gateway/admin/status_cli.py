"""`geogate status`: regions, replicas, model versions and recent events at a glance.

Reads ``GET /geogate/v1/world`` (gateway/admin/status_page.py) from a gateway's admin listener:
``--url`` if given, else each region's admin address from ``--config`` in turn (the first
that answers: a region being down must not blind the operator), else ``.geogate/world.toml``
(what ``geogate up`` writes). Prints rich tables; ``--watch`` keeps them live; ``--json``
prints the world JSON as the gateway sent it.

Admin credentials (when the gateways have ``[admin]`` credentials): ``Authorization: Bearer``
with the token from ``--token-env`` (an environment variable's name), else the config's
``[admin] token`` / ``token_env`` (default ``GEOGATE_ADMIN_TOKEN``); an operator key
(``gk_...``) works as well as the shared token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from core.config import ConfigError, load_config

WORLD_PATH = "/geogate/v1/world"
FETCH_TIMEOUT_S = 5.0
DEFAULT_WATCH_INTERVAL_S = 2.0
DEFAULT_CONFIG = ".geogate/world.toml"  # written by `geogate up`
DEFAULT_TOKEN_ENV = "GEOGATE_ADMIN_TOKEN"
MAX_EVENTS_SHOWN = 10
SITE_STALE_AFTER_S = 15.0  # a sync agent publishes every few seconds; older is worth a look

HEALTH_STYLE = {"healthy": "bold green", "degraded": "bold yellow", "down": "bold red"}
STATE_STYLE = {"healthy": "green", "unhealthy": "red", "ejected": "red", "draining": "yellow"}


class StatusError(Exception):
    """No gateway answered; the message names every address tried and why."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="", help=f"deployment config (default: {DEFAULT_CONFIG} if present)")
    parser.add_argument("--url", default="", help="a gateway's admin listener, e.g. http://127.0.0.1:18002")
    parser.add_argument("--watch", action="store_true", help="refresh continuously (Ctrl-C to stop)")
    parser.add_argument("--interval-s", type=float, default=DEFAULT_WATCH_INTERVAL_S,
                        help="refresh interval with --watch (seconds)")
    parser.add_argument("--json", action="store_true", help="print the world JSON instead of tables")
    parser.add_argument("--token-env", default="",
                        help=f"environment variable holding the admin token (default: the config's [admin] token / "
                             f"token_env, else {DEFAULT_TOKEN_ENV})")


def _config_path(args: argparse.Namespace) -> str:
    return args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else "")


def candidate_urls(args: argparse.Namespace) -> list[str]:
    if args.url:
        url = args.url.rstrip("/")
        return [url if "://" in url else f"http://{url}"]
    path = _config_path(args)
    if not path:
        raise StatusError(f"give --url http://ADMIN_HOST:PORT or --config FILE (no {DEFAULT_CONFIG} here)")
    config = load_config(path)
    if not config.regions:
        raise StatusError(f"{path}: no [[regions]] to ask")
    return [f"http://{r.admin}" for r in config.regions]


def admin_token(args: argparse.Namespace) -> tuple[str, str]:
    """(token, where it came from) for the gateways' admin credentials; ("", ...) for none."""
    env = getattr(args, "token_env", "")
    if env:
        return os.environ.get(env, ""), f"${env}"
    path = _config_path(args)
    if path:
        config = load_config(path)
        return config.admin_token(), f"{path} [admin] token / ${config.admin.token_env}"
    return os.environ.get(DEFAULT_TOKEN_ENV, ""), f"${DEFAULT_TOKEN_ENV}"


def fetch_world(urls: list[str], token: str = "", token_from: str = "") -> dict:
    errors = []
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for base in urls:
        try:
            req = urllib.request.Request(base + WORLD_PATH, headers=headers)
            with urllib.request.urlopen(req, timeout=FETCH_TIMEOUT_S) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            text = f"{base}: HTTP {exc.code} {exc.read()[:200].decode(errors='replace')}"
            if exc.code in (401, 403):
                text += (f" (admin token {'from ' + token_from + ' refused' if token else 'not set: ' + token_from})"
                         if token_from else "")
            errors.append(text)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            errors.append(f"{base}: {reason}")
    raise StatusError("no gateway answered " + WORLD_PATH + ": " + "; ".join(errors))


# ---------------------------------------------------------------- rendering


def _num(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{float(v):.{digits}f}"


def replica_state(rep: dict) -> tuple[str, str]:
    """(state, why) for a ReplicaState.snapshot() dict; same rules as the page."""
    if rep.get("draining"):
        return "draining", "removed from discovery; finishing in-flight requests"
    if rep.get("ejected"):
        why = rep.get("eject_reason") or "outlier detection"
        back_s = _num(rep.get("ejected_for_s"))
        return "ejected", f"{why} (back in {back_s} s, ejection #{rep.get('ejection_count', 0)})"
    if not rep.get("healthy", False):
        return "unhealthy", (rep.get("health_reason") or rep.get("last_probe_error") or rep.get("reason")
                             or "no successful probe yet")
    if rep.get("routable") is False:
        return rep.get("reason") or "not routable", ""
    return "healthy", ""


def regions_table(world: dict) -> Table:
    t = Table(title="Regions", box=box.SIMPLE_HEAD, title_justify="left", expand=False)
    for col, kw in (("region", {}), ("health", {}), ("replicas", {"justify": "right"}), ("req/s", {"justify": "right"}),
                    ("p50 ms", {"justify": "right"}), ("p99 ms", {"justify": "right"}),
                    ("in flight", {"justify": "right"}), ("reason", {"overflow": "fold"})):
        t.add_column(col, **kw)
    for r in world.get("regions", []):
        s = r.get("summary") or {}
        reps = s.get("replicas")
        load = s.get("load") or {}
        name = Text(r["name"] + (" *" if r.get("local") else ""), style="bold")
        health = "unreachable" if not r.get("reachable") else r["health"]
        t.add_row(name, Text(health, style=HEALTH_STYLE.get(r["health"], "")),
                  f"{reps['healthy']}/{reps['total']}" if reps else "-",
                  _num(load.get("requests_per_s")), _num(load.get("p50_ms"), 2), _num(load.get("p99_ms"), 2),
                  str(load.get("in_flight", "-")), r.get("reason", ""))
    t.caption = f"* this gateway ({world.get('served_by', '?')})"
    t.caption_justify = "left"
    return t


def replicas_table(world: dict) -> Table:
    t = Table(title="Replicas", box=box.SIMPLE_HEAD, title_justify="left")
    for col, kw in (("region", {}), ("pool", {}), ("replica", {"no_wrap": True}), ("state", {}),
                    ("ejected", {}), ("outstanding", {"justify": "right"}), ("rtt ms", {"justify": "right"}),
                    ("reason", {"overflow": "fold"})):
        t.add_column(col, **kw)
    for r in world.get("regions", []):
        s = r.get("summary")
        if not s:
            t.add_row(r["name"], "", "", Text("unreachable", style="red"), "", "", "", r.get("reason", ""))
            continue
        for pool in s.get("pools", []):
            pool_name = pool.get("name", "") + (" [red](panic)[/red]" if pool.get("panic") else "")
            for rep in pool.get("replicas", []):
                state, why = replica_state(rep)
                outstanding = rep.get("outstanding", rep.get("in_flight"))
                t.add_row(r["name"], Text.from_markup(pool_name), rep.get("url", "?"),
                          Text(state, style=STATE_STYLE.get(state, "yellow")),
                          "yes" if rep.get("ejected") else "no",
                          "-" if outstanding is None else str(outstanding),
                          _num(rep.get("probe_rtt_ms"), 2), why)
    return t


def _versions(values: list[str], style: str) -> Text:
    return Text(",".join(values), style=style)


def models_table(world: dict) -> Table:
    t = Table(title="Model versions per site", box=box.SIMPLE_HEAD, title_justify="left")
    t.add_column("model")
    t.add_column("stable")
    t.add_column("canary")
    models = world.get("models", {})
    sites = [r["name"] for r in world.get("regions", [])]
    for info in models.values():
        sites += [s for s in info.get("sites", {}) if s not in sites]
    for site in sites:
        t.add_column(site)
    reachable = {r["name"]: r.get("reachable") for r in world.get("regions", [])}
    for name in sorted(models):
        info = models[name]
        canary = info.get("canary") or {}
        weight = canary.get("weight")
        pct = "" if weight is None else f" @ {weight * 100 if weight <= 1 else weight:g}%"
        cells = []
        for site in sites:
            st = info.get("sites", {}).get(site)
            if not st:
                cells.append(Text("unreachable" if reachable.get(site) is False else "none ready", style="dim red"))
                continue
            cell = Text()
            for label, key, style in (("ready", "ready", "green"), ("loading", "loading", "yellow"),
                                      ("failed", "failed", "red")):
                if st.get(key):
                    if cell:
                        cell.append("  ")
                    cell.append(f"{label} ", style="dim")
                    cell.append_text(_versions(st[key], style))
            if (st.get("heartbeat_age_s") or 0) > SITE_STALE_AFTER_S:
                cell.append(f"  sync stale {st['heartbeat_age_s']:.0f} s", style="red")
            cells.append(cell if cell else Text("none ready", style="dim red"))
        stable = info.get("stable") or "-"
        if info.get("effective") and info.get("stable") and info["effective"] != info["stable"]:
            stable = f"{stable} (serving {info['effective']} until ready everywhere)"
        t.add_row(name, stable, f"{canary['version']}{pct}" if canary.get("version") else "-",
                  *cells)
    return t


def events_table(world: dict) -> Table:
    t = Table(title="Recent events", box=box.SIMPLE_HEAD, title_justify="left")
    t.add_column("time")
    t.add_column("region")
    t.add_column("kind")
    t.add_column("message", overflow="fold")
    events = world.get("events", [])[:MAX_EVENTS_SHOWN]
    for e in events:
        kind_style = {"failover": "red", "ejection": "red", "unhealthy": "red", "promotion": "magenta",
                      "canary": "magenta", "recovery": "green", "failback": "green"}.get(e.get("kind"), "")
        t.add_row(time.strftime("%H:%M:%S", time.localtime(e.get("time", 0))), e.get("region", ""),
                  Text(e.get("kind", ""), style=kind_style), e.get("message", ""))
    if not events:
        t.add_row("", "", "", Text("none recently", style="dim"))
    return t


def render(world: dict) -> Group:
    stamp = time.strftime("%H:%M:%S", time.localtime(world.get("generated_at", time.time())))
    header = Text.assemble(("geogate ", "bold"), (world.get("deployment", ""), "bold cyan"),
                           f"  served by {world.get('served_by', '?')} at {stamp}")
    return Group(header, regions_table(world), replicas_table(world), models_table(world), events_table(world))


# ---------------------------------------------------------------- entry point


def run(args: argparse.Namespace) -> int:
    console = Console()
    err = Console(stderr=True)
    try:
        urls = candidate_urls(args)
        token, token_from = admin_token(args)
        if not args.watch:
            world = fetch_world(urls, token, token_from)
            if args.json:
                sys.stdout.write(json.dumps(world, indent=2) + "\n")
            else:
                console.print(render(world))
            return 0
        try:
            return _watch(args, urls, console, token, token_from)
        except KeyboardInterrupt:
            return 0  # Ctrl-C is how one leaves --watch
    except (StatusError, ConfigError) as exc:
        err.print(f"[red]geogate status:[/red] {exc}", highlight=False)
        return 1


def _watch(args: argparse.Namespace, urls: list[str], console: Console, token: str = "", token_from: str = "") -> int:
    from rich.live import Live  # only --watch needs it

    interval_s = max(0.2, args.interval_s)
    if args.json:  # one JSON document per line, for piping
        while True:
            try:
                sys.stdout.write(json.dumps(fetch_world(urls, token, token_from)) + "\n")
            except StatusError as exc:
                sys.stdout.write(json.dumps({"error": str(exc)}) + "\n")
            sys.stdout.flush()
            time.sleep(interval_s)
    with Live(Text("connecting…"), console=console, refresh_per_second=4, screen=False) as live:
        while True:
            try:
                live.update(render(fetch_world(urls, token, token_from)))
            except StatusError as exc:
                live.update(Text(f"{time.strftime('%H:%M:%S')} {exc}", style="red"))
            time.sleep(interval_s)
