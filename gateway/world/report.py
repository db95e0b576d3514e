"""What the local world tells its users: the printed table and copy-paste commands, DIR/world.json
(the same facts for scripts, replaced atomically whenever they change) and DIR/client.py."""

from __future__ import annotations

import json
import os
import shlex
import sys
import urllib.parse
from pathlib import Path

from gateway.world.autoscale import views
from gateway.world.launch import AUTOSCALER, Launch
from gateway.world.ports import split_host_port
from gateway.world.store import DEMO_FEATURES, DEMO_INPUT, DEMO_OUTPUT, ModelInfo, main_model
from gateway.world.supervisor import Supervisor

COMMAND_TITLES = {
    "curl": "inference over HTTP with curl ({region}'s gateway)",
    "tritonclient": "inference over gRPC with tritonclient (add --http and an HTTP address for tritonclient.http)",
    "dig": "GeoDNS: the gateway address for a client in {cidr}",
    "autoscale": "autoscale: {n} replicas in {pool} whatever its gateway wants (operator override; "
                 "delete the file to follow the gateways again)",
    "status": "regions, replicas, versions and health at a glance",
}

def _geogate_command() -> str:
    """How to run `geogate` from anywhere: the console script next to this interpreter."""
    script = Path(sys.executable).parent / "geogate"
    return str(script) if script.exists() else f"{sys.executable} -m gateway"


def release_command(info: ModelInfo | None) -> tuple[str, str] | None:
    """(title, `geogate models ...` arguments) an operator can try next: promote the newest
    version when it is not stable yet, else roll back to the previous stable."""
    if info is None:
        return None
    newest = info.versions[-1] if info.versions else info.stable
    if newest != info.stable:
        return (f"promote v{newest}: sync agents load it in every region, then every gateway switches to it",
                f"promote {info.name} {newest}")
    if info.previous:
        return (f"roll back to v{info.previous[0]} (v{info.stable} is stable now)", f"rollback {info.name}")
    return None


def _override_count(launch: Launch) -> tuple[str, int] | None:
    """(pool key, count) the printed autoscale override asks for: one above the minimum."""
    pools = launch.autoscaled_pools()
    if not pools:
        return None
    p = pools[0]
    return p.key, min(p.max_replicas, p.min_replicas + 1)


def example_commands(launch: Launch, models: dict[str, ModelInfo]) -> dict[str, str]:
    first = launch.regions[0]
    model = main_model(models)
    data = ",".join(["0.5"] * DEMO_FEATURES)
    body = ('{"inputs":[{"name":"' + DEMO_INPUT + '","datatype":"FP32","shape":[1,' + str(DEMO_FEATURES)
            + '],"data":[' + data + "]}]}")
    host, port = split_host_port(launch.dns_listen)
    subnet = f" +subnet={first.client_cidrs[0]}" if first.client_cidrs else ""
    geogate = _geogate_command()
    cmds = {
        "curl": f"curl -s -i -X POST http://{first.http}/v2/models/{model}/infer -d '{body}'",
        "tritonclient": f"{sys.executable} {launch.directory / 'client.py'} {first.grpc}",
        "dig": f"dig @{host} -p {port} +short {launch.dns_service.rstrip('.')} A{subnet}",
    }
    release = release_command(models.get(model))
    if release:
        cmds["release"] = f"{geogate} models {release[1]} --config {launch.config_path}"
    if override := _override_count(launch):
        key, n = override
        cmds["autoscale"] = f"echo '{json.dumps({key: n})}' > {shlex.quote(str(launch.autoscale_override_path))}"
    cmds["status"] = f"{geogate} status --config {launch.config_path}"
    return cmds


def endpoints(launch: Launch, supervisor: Supervisor | None, models: dict[str, ModelInfo],
              autoscaled: dict[str, dict] | None = None) -> dict:
    """world.json's content. ``autoscaled``: the autoscaled pools' views (default: read now)."""
    pids = {c.name: c.pid for c in supervisor.children} if supervisor else {}
    restarts = {c.name: c.restarts for c in supervisor.children} if supervisor else {}
    autoscaled = views(launch) if autoscaled is None else autoscaled
    return {
        "config": str(launch.config_path),
        "directory": str(launch.directory),
        "logs": str(launch.logs),
        "store": launch.store_url,
        "models": {m.name: {"stable": m.stable, "versions": m.versions} for m in models.values()},
        "pid": os.getpid(),
        "dns": {"listen": launch.dns_listen, "service": launch.dns_service, "pid": pids.get("dns")},
        "autoscaler": {
            "pid": pids.get(AUTOSCALER), "restarts": restarts.get(AUTOSCALER, 0), "dns": launch.autoscale_dns,
            "status_file": str(launch.autoscaler_status_path), "override_file": str(launch.autoscale_override_path),
            "log": str(launch.logs / f"{AUTOSCALER}.log"), "replica_logs": str(launch.autoscaler_workdir),
        } if launch.autoscale else None,
        "regions": [
            {
                "name": r.name, "city": r.city, "location": r.location, "addresses": r.addresses,
                "http": r.http, "grpc": r.grpc, "admin": r.admin, "client_cidrs": r.client_cidrs,
                "status_page": f"http://{r.admin}/ui",
                "gateway_pid": pids.get(f"gateway-{r.name}"),
                "sync_pid": pids.get(f"sync-{r.name}"),
                "replicas": [
                    {"name": rep.name, "url": rep.url, "http": f"{rep.host}:{rep.http_port}",
                     "grpc": f"{rep.host}:{rep.grpc_port}", "metrics": f"{rep.host}:{rep.metrics_port}",
                     "pid": pids.get(rep.name), "restarts": restarts.get(rep.name, 0)}
                    for rep in r.replicas
                ],
                "autoscaled": [autoscaled[p.key] for p in r.autoscaled if p.key in autoscaled],
            }
            for r in launch.regions
        ],
        "not_started": launch.skipped,
        "commands": example_commands(launch, models),
    }


def write_endpoints(launch: Launch, supervisor: Supervisor | None, models: dict[str, ModelInfo],
                    autoscaled: dict[str, dict] | None = None) -> Path:
    """DIR/world.json, replaced atomically so scripts never read half a file."""
    path = launch.directory / "world.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(endpoints(launch, supervisor, models, autoscaled), indent=2) + "\n")
    tmp.replace(path)
    return path


CLIENT_SCRIPT = '''"""Written by `geogate up`: one inference through a geogate gateway with tritonclient.

    python client.py [HOST:PORT] [--http] [--model-version N]

Default: gRPC to {default} (the first region's gateway); --http uses tritonclient.http (give
the gateway's HTTP address then).
"""
import argparse

import numpy as np

parser = argparse.ArgumentParser(description="one inference through a geogate gateway")
parser.add_argument("url", nargs="?", default="{default}", help="gateway HOST:PORT")
parser.add_argument("--http", action="store_true", help="KServe v2 over HTTP instead of gRPC")
parser.add_argument("--model", default="{model}")
parser.add_argument("--model-version", default="", help="a specific version (default: the promoted one)")
args = parser.parse_args()

if args.http:
    import tritonclient.http as tc
else:
    import tritonclient.grpc as tc

client = tc.InferenceServerClient(args.url)
x = np.full((1, {features}), 0.5, dtype=np.float32)
inp = tc.InferInput("{input}", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
result = client.infer(args.model, [inp], model_version=args.model_version)
response = result.get_response()
version = response["model_version"] if args.http else response.model_version
out = result.as_numpy("{output}")[0]
print(f"{{args.url}}: {{args.model}} version {{version}} {output}=" + " ".join(f"{{v:.4f}}" for v in out))
'''


def write_client_script(launch: Launch, models: dict[str, ModelInfo]) -> None:
    (launch.directory / "client.py").write_text(CLIENT_SCRIPT.format(
        default=launch.regions[0].grpc, model=main_model(models), features=DEMO_FEATURES, input=DEMO_INPUT,
        output=DEMO_OUTPUT))


def _replicas_cell(launch: Launch, region_index: int, autoscaled: dict[str, dict]) -> str:
    r = launch.regions[region_index]
    lines = [rep.url for rep in r.replicas]
    for p in r.autoscaled:
        view = autoscaled.get(p.key) or {}
        desired = "?" if view.get("desired") is None else view["desired"]
        lines.append(f"{p.name}: autoscaled {p.min_replicas}..{p.max_replicas}, desired {desired}")
        lines += [f"{rep['url']} ({rep['state']})" for rep in view.get("replicas", [])]
    return "\n".join(lines) or "-"


def print_summary(launch: Launch, models: dict[str, ModelInfo], ready_s: float,
                  autoscaled: dict[str, dict] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    autoscaled = views(launch) if autoscaled is None else autoscaled
    # Not a terminal (a log, a pipe): wide enough that no address is cut.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    table = Table(title="geogate local world", title_justify="left")
    for col in ("region", "city", "DNS answer", "gateway HTTP", "gateway gRPC", "status page", "replicas"):
        table.add_column(col, overflow="fold")
    for i, r in enumerate(launch.regions):
        table.add_row(r.name, r.city, ", ".join(r.addresses) or "-", r.http, r.grpc, f"http://{r.admin}/ui",
                      _replicas_cell(launch, i, autoscaled))
    console.print(table)
    # Plain print from here on: copy-paste lines must never be wrapped.
    first = launch.regions[0]
    lines = [
        f"GeoDNS     {launch.dns_listen} (UDP+TCP) answers {launch.dns_service} with the nearest healthy "
        "region's address",
        f"store      {launch.store_url}   models: {'; '.join(m.describe() for m in models.values()) or '-'}",
        f"config     {launch.config_path}",
        f"endpoints  {launch.directory / 'world.json'}",
        f"logs       {launch.logs}/",
    ]
    if launch.autoscale:
        lines += [
            f"autoscaler follows each gateway's desired replica count (GET http://<admin>/geogate/v1/capacity); "
            f"SRV records on {launch.autoscale_dns} (UDP+TCP)",
            f"           status {launch.autoscaler_status_path}; override {launch.autoscale_override_path}; "
            f"replica logs {launch.autoscaler_workdir}/",
        ]
    if launch.admin_token:
        # The admin listeners want credentials: this link logs a browser in (a session cookie;
        # the token leaves the address bar at once).
        lines.append(f"status     http://{first.admin}/ui?token={urllib.parse.quote(launch.admin_token, safe='')}  "
                     "(admin credentials: the link logs you in; `geogate status` reads the same token)")
    lines += [f"not started: {s}" for s in launch.skipped]
    lines += ["", "Try it (copy-paste):"]
    release = release_command(models.get(main_model(models)))
    override = _override_count(launch)
    for key, cmd in example_commands(launch, models).items():
        title = release[0] if key == "release" and release else COMMAND_TITLES[key]
        title = title.format(region=first.name, cidr=(first.client_cidrs or ["?"])[0],
                             pool=override[0] if override else "", n=override[1] if override else 0)
        lines += [f"# {title}", cmd]
    lines += ["", f"[geogate up] ready in {ready_s:.1f}s. Ctrl-C stops everything."]
    print("\n".join(lines), flush=True)
