"""`geogate up`: the embedded local world on one machine (command line entry).

Default shape: three regions at real locations (eu-west Dublin, us-east Virginia, ap-south
Mumbai), each with two ONNX Runtime replicas, a gateway and a sync agent; a local-directory
object store seeded with the demo model (v1 promoted, v2 pushed but not promoted); and the
GeoDNS responder. With --autoscale each region's pool belongs to a local autoscaler instead:
it follows the gateways' desired replica counts, starts replicas and registers them through
DNS SRV (the discovery the gateway uses), and drains one before stopping it.

The parts, one module each:
  gateway.world.ports      can this machine listen here, which port is free
  gateway.world.plan       the default world's shape, port block and world.toml
  gateway.world.launch     the processes a config describes (also for --config FILE)
  gateway.world.store      seeding the demo model
  gateway.world.ready      when the world counts as ready
  gateway.world.autoscale  the autoscaler's pools, from its status file
  gateway.world.report     the printed summary, world.json, client.py
  gateway.world.run        the lifecycle: start, wait, report, stop
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gateway.world.launch import Launch, check_binds, launch_from_config, prepare_directories
from gateway.world.plan import (
    DEFAULT_BASE_PORT,
    DEFAULT_DIR,
    DEFAULT_REGIONS,
    DEFAULT_REPLICAS,
    MAX_REPLICAS,
    PORT_SHIFT_STEP,
    REGION_PRESETS,
    WorldError,
    plan_world,
    render_config,
)
from gateway.world.run import READY_TIMEOUT_S, run_world

EPILOG = """\
Shape options (--regions, --replicas, --autoscale, --base-port, --store, --s3-endpoint) describe
the default world; --config runs a written config instead and cannot be combined with them.

examples:
  geogate up                                   3 regions x 2 replicas, ports from 18000
  geogate up --regions eu-west,us-east --replicas 1 --base-port 24000
  geogate up --autoscale --replicas 1          replicas follow each gateway's desired count (1..6)
  AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \\
    geogate up --store s3://bucket/geogate --s3-endpoint http://127.0.0.1:9000 --create-bucket
  geogate up --config .geogate/world.toml      run a written config (e.g. an edited world.toml)

An s3:// store's bucket must exist (geogate up refuses to start otherwise, naming the bucket);
--create-bucket creates it when missing. A missing file:// store directory is created.

Port block (base B): each region's gateway HTTP B, gRPC B+1, admin/status page B+2 on its own
loopback address 127.0.1.N (or B+10N.. on 127.0.0.1 where 127.0.1.N do not exist); GeoDNS
B+53 (UDP+TCP); with --autoscale the autoscaler's SRV DNS B+54 (UDP+TCP) and replicas on free
ports; else replicas from B+100 (20 ports per region: HTTP, gRPC, metrics per replica).
Writes DIR/world.toml (config), DIR/world.json (endpoints, pids, commands, autoscaled replicas;
removed on exit), DIR/client.py, DIR/logs/, for the default world DIR/store/ and
DIR/<region>/models/, and with --autoscale DIR/autoscaler.json (the autoscaler's status) and
DIR/autoscaler/ (its DNS server and replica logs); DIR/autoscale-override.json, when an
operator writes it ({"REGION/POOL": N}), overrides the gateways' desired counts.
Ctrl-C or SIGTERM stops every process (a second Ctrl-C kills them at once); a crashed process
is reported and restarted.
"""

SHAPE_OPTIONS = ("regions", "replicas", "autoscale", "base_port", "store", "s3_endpoint")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--regions", default=None, metavar="A,B,...",
                        help=f"regions to run (default {DEFAULT_REGIONS}); known: {', '.join(REGION_PRESETS)}")
    parser.add_argument("--replicas", type=int, default=None, metavar="N",
                        help=f"ONNX Runtime replicas per region, 1..{MAX_REPLICAS} (default {DEFAULT_REPLICAS}); "
                             "with --autoscale the minimum per region")
    parser.add_argument("--autoscale", action="store_true", default=None,
                        help=f"a local autoscaler runs each region's replicas: between --replicas and "
                             f"{MAX_REPLICAS}, following the gateway's desired count; registered through DNS SRV, "
                             "drained before they stop")
    parser.add_argument("--base-port", type=int, default=None, metavar="PORT",
                        help=f"first port of the world's port block (default {DEFAULT_BASE_PORT}); moved up by "
                             f"{PORT_SHIFT_STEP} while any port in the block is busy")
    parser.add_argument("--store", default=None, metavar="URL",
                        help="object store: file://DIR or s3://BUCKET/PREFIX (default file://DIR/store); "
                             "S3 credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    parser.add_argument("--s3-endpoint", default=None, metavar="URL",
                        help="S3 endpoint for --store s3://... (default: AWS, or $AWS_ENDPOINT_URL)")
    parser.add_argument("--create-bucket", action="store_true",
                        help="create the s3:// store's bucket when it does not exist (without it a missing "
                             "bucket is an error); also with --config")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="run the processes this deployment config describes instead of the default world: "
                             "its geogate replicas on local addresses, a sync agent and gateway per region, GeoDNS, "
                             "and the autoscaler when pools discover through [capacity] autoscale_dns")
    parser.add_argument("--dir", default=DEFAULT_DIR, metavar="DIR",
                        help=f"where config, endpoints, logs, store and repositories live (default {DEFAULT_DIR})")
    parser.add_argument("--no-seed", action="store_true",
                        help="do not put the demo model into the store (by default: v1 promoted, v2 pushed; "
                             "with --config only when the store holds no model)")
    parser.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S, metavar="SECONDS",
                        help=f"how long to wait for every region to serve (default {READY_TIMEOUT_S:.0f})")


def _launch_config_file(args: argparse.Namespace, directory: Path) -> tuple[Launch, Any]:
    from core.config import ConfigError, load_config

    shape = [f"--{n.replace('_', '-')}" for n in SHAPE_OPTIONS if getattr(args, n) is not None]
    if shape:
        raise WorldError(f"--config runs the config as written; drop {', '.join(shape)}")
    path = Path(args.config).resolve()
    try:
        cfg = load_config(path)
    except (OSError, ConfigError) as exc:
        raise WorldError(f"--config {args.config}: {exc}") from exc
    launch = launch_from_config(cfg, path, directory)
    check_binds(launch)
    return launch, cfg


def build_launch(args: argparse.Namespace) -> tuple[Launch, Any]:
    """The processes to start and the config they read: written for the default world's
    shape options, or the --config file as it is."""
    from core.config import load_config

    directory = Path(args.dir).resolve()
    if args.config:
        return _launch_config_file(args, directory)
    if args.s3_endpoint and not (args.store or "").startswith("s3://"):
        raise WorldError("--s3-endpoint needs --store s3://BUCKET/PREFIX")
    regions = [r.strip() for r in (args.regions or DEFAULT_REGIONS).split(",") if r.strip()]
    base_port = DEFAULT_BASE_PORT if args.base_port is None else args.base_port
    replicas = DEFAULT_REPLICAS if args.replicas is None else args.replicas
    plan = plan_world(base_port=base_port, directory=directory, regions=regions, replicas=replicas,
                      store_url=args.store, store_endpoint=args.s3_endpoint or "", autoscale=bool(args.autoscale))
    directory.mkdir(parents=True, exist_ok=True)
    plan.config_path.write_text(render_config(plan))
    cfg = load_config(plan.config_path)  # the file every child reads: it must load here too
    return launch_from_config(cfg, plan.config_path, directory, plan.replica_ports_by_url()), cfg


def run(args: argparse.Namespace) -> int:
    import uvloop

    try:
        launch, cfg = build_launch(args)
        if args.create_bucket and not cfg.store.url.startswith("s3://"):
            raise WorldError(f"--create-bucket is for an s3:// store, and this world's is {cfg.store.url} "
                             "(a file:// store's directory is made without it)")
        prepare_directories(launch)
        return uvloop.run(run_world(launch, cfg, seed=not args.no_seed, only_if_empty=bool(args.config),
                                    ready_timeout_s=args.ready_timeout, create_bucket=args.create_bucket))
    except WorldError as exc:
        print(f"geogate up: {exc}", file=sys.stderr)
        return 1
