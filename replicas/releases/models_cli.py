"""`geogate models ...`: operators' commands for model versions across sites.

    geogate models push NAME PATH [--version N]      upload a version (immutable; refuses to overwrite)
    geogate models list                              release records and versions in the store
    geogate models promote NAME VERSION              make VERSION the stable version
    geogate models canary NAME VERSION --weight W    send fraction W (0..1) of traffic to VERSION (0 clears)
    geogate models rollback NAME                     clear the canary; with none, back to the previous stable
    geogate models status [NAME]                     what every site has ready / loading / failed

Every command takes ``--config FILE`` (the store is the config's ``[store] url``) or
``--store URL`` (``file://DIR`` or ``s3://bucket/prefix``), and ``--who`` (default: $USER).
For an S3 store without a config: ``--s3-endpoint URL`` (default $AWS_ENDPOINT_URL, else AWS
itself) and ``--s3-region`` (default $AWS_DEFAULT_REGION, else us-east-1); credentials from
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. S3 requests time out after ``[store]
connect_timeout_s`` / ``read_timeout_s`` (3 s / 10 s without a config): a store that does not
answer makes the command fail with that said, it does not hang.

Only ``push`` creates a file store (its directory); every other command reads or updates an
existing store and fails, creating nothing, when the directory (or bucket) is not there.
``promote`` and ``canary`` first check every file of the version in the store against its
MANIFEST.json (size and sha256, streamed): a corrupt version is refused and the release left
as it was (``--no-verify`` skips the check).

PATH for push (Triton repository layout):
- a model directory ``./repo/demo`` holding version directories (``./repo/demo/2/model.onnx``) and
  optionally ``./repo/demo/config.pbtxt``: uploads ``./repo/demo/<N>/*`` as version N's files
  and ``./repo/demo/config.pbtxt`` as its model config; N is ``--version`` or the highest there;
- or a single version directory ``./repo/demo/2``: uploads its files (N = ``--version`` or the
  directory's name) and the parent's ``config.pbtxt`` when the directory has none of its own.
In the store: ``models/NAME/N/<files>``, ``models/NAME/N/config.pbtxt``, then MANIFEST.json last.
``--sign-key FILE`` (or the config's ``[signing] private_key_file``) signs the manifest with an
Ed25519 private key; sites with ``[signing] public_key_file`` install only signed versions.

Exit status: 0 done, 1 refused or failed (the message says why), 2 usage, 3 conflict (someone
else changed the release record meanwhile: nothing was applied; re-read and retry).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from replicas.releases.manifest import (
    MANIFEST_NAME,
    build_manifest,
    check_model_name,
    check_version,
    list_stored_versions,
    load_private_key,
    manifest_key,
    read_manifest,
    sign_manifest,
    version_prefix,
)
from replicas.releases.records import ConflictError, ReleaseError, Releases
from replicas.releases.site_status import read_all_sites
from replicas.store import ObjectStore, PreconditionFailed, StoreError, StoreMissing, open_store
from replicas.store.base import ProgressCallback

CONFIG_NAME = "config.pbtxt"
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFLICT = 3
SITE_STALE_AFTER_S = 10.0  # only for display: mark old heartbeats


class PushError(Exception):
    """A push refused; the message says why."""


def default_who() -> str:
    try:
        return os.environ.get("USER") or getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


# ---------------------------------------------------------------- push


def collect_push_files(path: str | Path, version: str | None) -> tuple[str, dict[str, Path]]:
    """(version, {relative path in the version: local file}) for a model or version directory."""
    p = Path(path)
    if not p.is_dir():
        raise PushError(f"{path}: not a directory (give a model directory or a version directory)")
    numeric = sorted((d for d in p.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))
    if numeric:  # a model directory
        if version is None:
            version = numeric[-1].name
        vdir = p / str(int(version))
        if not vdir.is_dir():
            raise PushError(f"{path}: no version directory {vdir.name}/ (found: {', '.join(d.name for d in numeric)})")
        config = p / CONFIG_NAME
    else:  # a version directory
        if version is None:
            if not p.resolve().name.isdigit():
                raise PushError(f"{path}: give --version N (the directory name is not a version number)")
            version = p.resolve().name
        vdir = p
        config = p.resolve().parent / CONFIG_NAME
    version = check_version(version)
    files: dict[str, Path] = {}
    for f in sorted(vdir.rglob("*")):
        if f.is_file():
            rel = f.relative_to(vdir).as_posix()
            if rel == MANIFEST_NAME:
                continue  # a stale manifest is never uploaded: a fresh one is computed
            files[rel] = f
    if CONFIG_NAME not in files and config.is_file():
        files[CONFIG_NAME] = config
    if not files:
        raise PushError(f"{vdir}: no files to push")
    return version, files


async def push_version(store: ObjectStore, name: str, path: str | Path, *, version: str | None = None,
                       who: str, progress: ProgressCallback | None = None,
                       on_total=None, signing_key=None) -> tuple[str, Any]:
    """Upload a version: files first, MANIFEST.json last (create-only). Returns (version, manifest).
    `signing_key` (an Ed25519 private key): the manifest is signed with it."""
    check_model_name(name)
    version, files = collect_push_files(path, version)
    existing = await read_manifest(store, name, version)
    if existing is not None:
        raise PushError(f"version {version} of {name!r} already exists in {store.url} (pushed by {existing.who}"
                        f" at {existing.when}); versions are immutable: push a new version number")
    manifest = await build_manifest(name, version, files, who=who)
    if signing_key is not None:
        manifest = sign_manifest(manifest, signing_key)
    if on_total:
        on_total(manifest.total_bytes)
    prefix = version_prefix(name, version)
    for rel, local in files.items():
        await store.upload_file(prefix + rel, str(local), progress=progress)
    try:
        await store.put(manifest_key(name, version), manifest.to_bytes(), if_none_match="*")
    except PreconditionFailed:
        raise PushError(f"version {version} of {name!r} was pushed by someone else at the same time;"
                        " theirs stands: push a new version number") from None
    return version, manifest


# ---------------------------------------------------------------- output helpers


def _console():
    from rich.console import Console

    return Console()


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


# ---------------------------------------------------------------- commands


async def cmd_push(store: ObjectStore, args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    key_file = getattr(args, "sign_key", None) or getattr(args, "config_sign_key", "")
    signing_key = load_private_key(key_file) if key_file else None
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), transient=False, disable=args.quiet) as bar:
        task = bar.add_task(f"push {args.name}", total=None)
        version, manifest = await push_version(
            store, args.name, args.path, version=args.version, who=args.who,
            progress=lambda n: bar.advance(task, n), on_total=lambda t: bar.update(task, total=t),
            signing_key=signing_key)
    signed = f", signed by key {manifest.signature['key_id']}" if manifest.signature else ""
    print(f"pushed {args.name} version {version}: {len(manifest.files)} files, "
          f"{_fmt_bytes(manifest.total_bytes)} to {store.url}{signed}")
    return 0


async def _listing(store: ObjectStore) -> dict[str, Any]:
    releases = await Releases(store).all()
    stored = await list_stored_versions(store)
    out: dict[str, Any] = {}
    for name in sorted(set(releases) | set(stored)):
        rec = releases.get(name)
        out[name] = {
            "release": rec.to_dict() if rec else None,
            "versions": [{"version": v.version, "complete": v.complete, "files": v.files,
                          "bytes": v.total_bytes} for v in stored.get(name, [])],
        }
    return out


async def cmd_list(store: ObjectStore, args: argparse.Namespace) -> int:
    listing = await _listing(store)
    if args.json:
        _print_json(listing)
        return 0
    from rich.table import Table

    table = Table(title=f"models in {store.url}")
    for col in ("model", "stable", "canary", "previous", "gen", "versions in store", "last change"):
        table.add_column(col)
    for name, item in listing.items():
        rec = item["release"] or {}
        canary = rec.get("canary")
        versions = ", ".join(v["version"] + ("" if v["complete"] else " (incomplete)") for v in item["versions"])
        last = (rec.get("history") or [{}])[-1]
        last_txt = f"{last.get('action', '')} {last.get('version', '')} by {last.get('who', '')} {last.get('when', '')}"
        table.add_row(name, rec.get("stable") or "-",
                      f"{canary['version']} ({canary['weight']:.0%})" if canary else "-",
                      ", ".join(rec.get("previous", [])) or "-", str(rec.get("generation", 0)),
                      versions or "-", last_txt.strip() or "-")
    _console().print(table)
    return 0


async def cmd_promote(store: ObjectStore, args: argparse.Namespace) -> int:
    rec = await Releases(store).promote(args.name, args.version, who=args.who,
                                        expected_generation=args.if_generation, verify=not args.no_verify)
    prev = rec.history[-1].get("from")
    print(f"promoted {args.name} version {rec.stable} (was {prev or 'none'}); generation {rec.generation}")
    return 0


async def cmd_canary(store: ObjectStore, args: argparse.Namespace) -> int:
    rec = await Releases(store).set_canary(args.name, args.version, args.weight, who=args.who,
                                           expected_generation=args.if_generation, verify=not args.no_verify)
    if rec.canary:
        print(f"canary of {args.name}: version {rec.canary_version} takes {rec.canary_weight:.1%} of traffic"
              f" (stable {rec.stable}); generation {rec.generation}")
    else:
        print(f"canary of {args.name} cleared (stable {rec.stable}); generation {rec.generation}")
    return 0


async def cmd_rollback(store: ObjectStore, args: argparse.Namespace) -> int:
    rec = await Releases(store).rollback(args.name, who=args.who, expected_generation=args.if_generation)
    last = rec.history[-1]
    if last["action"] == "rollback-canary":
        print(f"rolled back the canary of {args.name} (version {last['version']} removed); stable stays "
              f"{rec.stable}; generation {rec.generation}")
    else:
        print(f"rolled back {args.name}: stable {last.get('from')} -> {rec.stable}; generation {rec.generation}")
    return 0


async def cmd_status(store: ObjectStore, args: argparse.Namespace) -> int:
    sites = await read_all_sites(store)
    now = time.time()
    if args.json:
        _print_json({name: {"age_s": round(st.age_s(now), 1), "store_ok": st.store_ok,
                            "store_error": st.store_error, "replicas": st.replicas,
                            "models": {m: ms.to_dict() for m, ms in st.models.items()
                                       if not args.name or m == args.name}}
                     for name, st in sites.items()})
        return 0
    from rich.table import Table

    table = Table(title=f"sites in {store.url}")
    for col in ("site", "heartbeat", "model", "stable", "ready", "loading", "failed", "serving"):
        table.add_column(col)
    for site, st in sorted(sites.items()):
        age = st.age_s(now)
        beat = f"{age:.0f}s ago" + (" [red](stale)[/red]" if age > SITE_STALE_AFTER_S else "")
        if not st.store_ok:
            beat += f" [yellow]store: {st.store_error}[/yellow]"
        models = {m: ms for m, ms in st.models.items() if not args.name or m == args.name} or {"-": None}
        for model, ms in models.items():
            if ms is None:
                table.add_row(site, beat, "-", "", "", "", "", "")
                continue
            failed = "; ".join(f"{v}: {r}" for v, r in ms.failed.items())
            table.add_row(site, beat, model, ms.stable or "-", ", ".join(ms.ready) or "-",
                          ", ".join(ms.loading) or "-", f"[red]{failed}[/red]" if failed else "-",
                          ", ".join(ms.serving) or "-")
    _console().print(table)
    return 0


COMMANDS = {"push": cmd_push, "list": cmd_list, "promote": cmd_promote, "canary": cmd_canary,
            "rollback": cmd_rollback, "status": cmd_status}


# ---------------------------------------------------------------- argparse


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    d = {"default": argparse.SUPPRESS} if suppress else {}
    parser.add_argument("--config", metavar="FILE", help="deployment config (its [store] is used)",
                        **({"default": None} if not suppress else d))
    parser.add_argument("--store", metavar="URL", help="store URL (file://DIR or s3://bucket/prefix); "
                        "overrides the config's", **({"default": None} if not suppress else d))
    parser.add_argument("--who", help="who to record in manifests and history (default: $USER)",
                        **({"default": None} if not suppress else d))
    parser.add_argument("--s3-endpoint", metavar="URL",
                        help="S3 endpoint for an s3:// store (default: the config's [store] endpoint_url, "
                             "$AWS_ENDPOINT_URL, else AWS)", **({"default": None} if not suppress else d))
    parser.add_argument("--s3-region", metavar="REGION",
                        help="S3 region (default: the config's [store] region, $AWS_DEFAULT_REGION, else us-east-1)",
                        **({"default": None} if not suppress else d))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.epilog = "See `geogate models COMMAND --help`."
    _common(parser, suppress=False)
    sub = parser.add_subparsers(dest="models_command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("push", help="upload a model version (refuses to overwrite an existing version)",
                       description="PATH for push" + __doc__.split("PATH for push")[1].split("Exit status")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name")
    p.add_argument("path", help="model directory (NAME/<N>/..., NAME/config.pbtxt) or a version directory")
    p.add_argument("--version", help="version number (default: highest in the model dir / the dir's name)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--sign-key", metavar="FILE", default=None,
                   help="sign the manifest with this Ed25519 private key (PEM; default: the config's "
                        "[signing] private_key_file)")
    p = sub.add_parser("list", help="release records and versions in the store")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    for name, helptext in (("promote", "make VERSION the stable version"),
                           ("canary", "send a fraction of unversioned traffic to VERSION")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("name")
        p.add_argument("version")
        if name == "canary":
            p.add_argument("--weight", type=float, required=True,
                           help="fraction of unversioned traffic, 0..1 (0 clears the canary)")
        p.add_argument("--no-verify", action="store_true",
                       help="do not check the version's files in the store against its MANIFEST.json first "
                            "(by default a corrupt version is refused and the release left unchanged)")
    p = sub.add_parser("rollback", help="clear the canary; with none, go back to the previous stable")
    p.add_argument("name")
    p = sub.add_parser("status", help="per site: versions ready / loading / failed, heartbeat")
    p.add_argument("name", nargs="?", help="only this model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    for action in ("promote", "canary", "rollback"):
        sub.choices[action].add_argument(
            "--if-generation", type=int, default=None, metavar="N",
            help="apply only if the release record is still at generation N (what you looked at)")
    for sp in sub.choices.values():
        _common(sp, suppress=True)


def _open(args: argparse.Namespace) -> ObjectStore:
    # Only a push may make a file store's directory: a read (or a release change, which needs
    # pushed versions anyway) on a missing store fails instead of leaving an empty one behind
    # for sync agents to write into.
    create = args.models_command == "push"
    s3 = {"endpoint_url": args.s3_endpoint or "", "region": args.s3_region or ""}
    if args.config:
        from core.config import load_config
        from replicas.store import open_store_from_config

        cfg = load_config(args.config)
        if cfg.signing.private_key_file:
            args.config_sign_key = cfg.resolve_path(cfg.signing.private_key_file)
        return open_store_from_config(cfg, args.store or "", create=create, **s3)
    if args.store:
        return open_store(args.store, create=create, **s3)
    raise PushError("give --config FILE or --store URL")


def _missing_hint(args: argparse.Namespace) -> str:
    if args.models_command == "push":
        return "create the bucket first (or run `geogate up --create-bucket` against it)"
    return ("nothing was created; check --store / --config (a file store is created by the first "
            "`geogate models push`, a bucket by its owner or `geogate up --create-bucket`)")


async def _main(args: argparse.Namespace) -> int:
    store = _open(args)
    try:
        return await COMMANDS[args.models_command](store, args)
    finally:
        await store.close()


def run(args: argparse.Namespace) -> int:
    args.who = args.who or default_who()
    for attr in ("quiet", "json", "no_verify", "s3_endpoint", "s3_region"):
        if not hasattr(args, attr):
            setattr(args, attr, None if attr.startswith("s3_") else False)
    try:
        return asyncio.run(_main(args))
    except ConflictError as exc:
        print(f"geogate models: conflict: {exc}", file=sys.stderr)
        return EXIT_CONFLICT
    except StoreMissing as exc:
        print(f"geogate models {args.models_command}: {exc}: {_missing_hint(args)}", file=sys.stderr)
        return EXIT_FAILED
    except (ReleaseError, PushError, StoreError, ValueError) as exc:  # ValueError: ConfigError too
        print(f"geogate models {args.models_command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
