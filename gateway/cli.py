"""The `geogate` console script.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``.  Only the chosen subcommand's module is imported, so `geogate --help`
and light commands start fast and never pay for onnxruntime or grpc imports they don't use.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Order is the order `geogate --help` lists them.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "up": ("gateway.world.cli", "run the embedded local world (what `make run` runs)"),
    "gateway": ("gateway.server.main", "run a region's gateway (KServe v2 over HTTP and gRPC)"),
    "replica": ("replicas.server.main", "run an ONNX Runtime replica serving a Triton-layout repository"),
    "demo-model": ("replicas.demo.onnx_model", "write the bundled demo model into a model repository"),
    "sync": ("replicas.sync.cli", "run a site's sync agent (object store -> model repository)"),
    "dns": ("geo.dns_server", "run the health-aware GeoDNS responder"),
    "models": ("replicas.releases.models_cli", "operate model versions: push, list, promote, canary, rollback"),
    "status": ("gateway.admin.status_cli", "regions, replicas, versions and health at a glance"),
    "bench": ("loadtests.cli", "load generator and benchmark scenarios"),
}


def _chosen_subcommand(argv: list[str]) -> str | None:
    for token in argv:
        if token in SUBCOMMANDS:
            return token
        if not token.startswith("-"):
            return None
    return None


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geogate",
        description="geogate: global inference gateway and multi-datacenter failover router.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen_subcommand(argv)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name != module_name:
                    raise
                parser.error(f"subcommand {name!r} is not available in this build ({module_name} missing)")
            module.add_arguments(sp)
            sp.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
