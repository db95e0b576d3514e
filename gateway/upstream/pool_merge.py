"""One answer for the pool from its replicas' answers: statistics summed, server metadata agreed.

Pure functions over the replicas' JSON (the HTTP form of KServe v2 / Triton; a gRPC replica's
answer arrives as ``json_format.MessageToDict`` with proto field names, where 64-bit counts are
strings: both are read).

Statistics (``merge_statistics``), per (model name, version), in the order first seen:
- ``last_inference``: the latest (max) over the replicas;
- every other number (``inference_count``, ``execution_count``, each ``count`` / ``ns`` under
  ``inference_stats``, ``response_stats`` and any other nested object): the sum;
- ``batch_stats``: rows matched by ``batch_size``, summed like the rest;
- other lists (``memory_usage``): the first replica's, since memory is not additive across
  replicas of the same model in any useful way.

Server metadata (``merge_server_metadata``): the pool is "Triton" (or any other server) when at
least one replica answering is not a geogate replica. Then name and version are those of the
first such replica in URL order (deterministic across gateway workers), and the extensions are
those every answering replica lists (a request may land on any of them), in the first replica's
order, minus UNHONOURED_EXTENSIONS (APIs the gateway does not forward). Otherwise (geogate
replicas only, or no answer) None: the gateway answers for itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

# Extensions a replica may list that the gateway cannot honour: it answers these APIs
# UNIMPLEMENTED / 404 itself (shared memory is local to one server; the repository, trace and
# log settings are per replica and operators' business).
UNHONOURED_EXTENSIONS = frozenset({
    "model_repository", "model_repository(unload_dependents)", "system_shared_memory",
    "cuda_shared_memory", "trace", "logging",
})
GEOGATE_SERVER_NAMES = frozenset({"geogate", "geogate-replica"})
_MAX_KEPT = "last_inference"
_IDENTITY = ("name", "version")


def _number(value: Any) -> int | None:
    """An int from a JSON number or a protobuf-JSON 64-bit string; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _add(into: dict, other: dict) -> None:
    """Sum `other` into `into` (numbers added, objects recursed, batch_stats by batch size)."""
    for key, value in other.items():
        if key in _IDENTITY:
            continue
        mine = into.get(key)
        if key == _MAX_KEPT:
            a, b = _number(mine), _number(value)
            into[key] = max(x for x in (a, b, 0) if x is not None)
        elif key == "batch_stats" and isinstance(value, list):
            into[key] = _merge_batches(mine if isinstance(mine, list) else [], value)
        elif isinstance(value, dict):
            target = mine if isinstance(mine, dict) else {}
            _add(target, value)
            into[key] = target
        elif (n := _number(value)) is not None:
            into[key] = (_number(mine) or 0) + n
        elif key not in into:
            into[key] = value  # lists other than batch_stats, strings: the first replica's


def _normalized(stat: dict) -> dict:
    """A copy with every count as an int (a gRPC replica's strings converted)."""
    out: dict = {k: stat[k] for k in _IDENTITY if k in stat}
    _add(out, stat)
    return out


def _merge_batches(into: list, other: list) -> list:
    by_size = {_number(row.get("batch_size")): row for row in into if isinstance(row, dict)}
    for row in other:
        if not isinstance(row, dict):
            continue
        size = _number(row.get("batch_size"))
        if size in by_size:
            _add(by_size[size], {k: v for k, v in row.items() if k != "batch_size"})
        else:
            fresh = {"batch_size": size}
            _add(fresh, {k: v for k, v in row.items() if k != "batch_size"})
            by_size[size] = fresh
    return sorted(by_size.values(), key=lambda r: r.get("batch_size") or 0)


def merge_statistics(answers: Iterable[dict]) -> dict:
    """``{"model_stats": [...]}`` summed over the replicas' statistics answers (see module doc)."""
    merged: dict[tuple[str, str], dict] = {}
    for answer in answers:
        for stat in answer.get("model_stats") or ():
            if not isinstance(stat, dict):
                continue
            key = (str(stat.get("name", "")), str(stat.get("version", "")))
            if key in merged:
                _add(merged[key], stat)
            else:
                merged[key] = _normalized(stat)
    return {"model_stats": list(merged.values())}


def merge_server_metadata(answers: Sequence[tuple[str, dict]]) -> dict | None:
    """The pool's server metadata from ``(replica url, GET /v2 body)`` pairs; None when no
    replica other than a geogate one answered (see module doc)."""
    ordered = sorted(answers, key=lambda a: a[0])
    foreign = [body for _, body in ordered if str(body.get("name", "")) not in GEOGATE_SERVER_NAMES]
    if not foreign:
        return None
    first = foreign[0]
    common: list[str] = [str(e) for e in first.get("extensions") or () if str(e) not in UNHONOURED_EXTENSIONS]
    for _, body in ordered:
        theirs = {str(e) for e in body.get("extensions") or ()}
        common = [e for e in common if e in theirs]
    return {"name": str(first.get("name", "")), "version": str(first.get("version", "")), "extensions": common}
