"""What the gateway's request checks need to know of a model: its inputs (name, datatype,
shape) and output names, from the model metadata a replica answers (gateway.upstream.catalog
caches them; gateway.front.request_checks checks requests against them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelSpecs:
    """What request checks need from a model's metadata."""

    name: str
    inputs: dict[str, TensorSpec]
    outputs: frozenset[str]

    @classmethod
    def from_metadata(cls, meta: dict) -> ModelSpecs:
        inputs = {t["name"]: TensorSpec(t["name"], t["datatype"], tuple(int(d) for d in t["shape"]))
                  for t in meta.get("inputs", [])}
        return cls(meta.get("name", ""), inputs, frozenset(t["name"] for t in meta.get("outputs", [])))
