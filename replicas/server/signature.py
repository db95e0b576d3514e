"""What a model version accepts and returns, from its completed config; checks one request's tensors.

Both protocol codecs decode tensors through `InputSpec.check_header` / `check_elements`, so a bad
input gets the same message over HTTP and gRPC (worded like Triton's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from core.datatypes import CONFIG_TO_V2, ELEMENT_SIZE, V2_TO_NUMPY
from replicas.server.infer_errors import invalid


def _fmt_shape(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


@dataclass(frozen=True, slots=True)
class InputSpec:
    name: str
    datatype: str
    dtype: np.dtype | None
    full_shape: tuple[int, ...]  # batch dimension (-1) included when the model batches
    model: str
    max_batch_size: int

    def check_header(self, datatype: Any, shape: Any) -> tuple[int, ...]:
        """Datatype and shape as the request states them; returns the shape as a tuple."""
        if datatype != self.datatype:
            raise invalid(f"inference input '{self.name}' data-type is '{datatype}', but model "
                          f"'{self.model}' expects '{self.datatype}'")
        if not isinstance(shape, (list, tuple)) or not all(type(d) is int and d >= 0 for d in shape):
            raise invalid(f"inference input '{self.name}' has an invalid shape {shape!r}: "
                          "expected a list of non-negative integers")
        shape = tuple(shape)
        expected = self.full_shape
        ok = len(shape) == len(expected) and all(e == -1 or e == d for e, d in zip(expected, shape, strict=True))
        if not ok:
            hint = (" NOTE: Setting a non-zero max_batch_size in the model config requires a batch dimension "
                    "to be prepended to each input shape." if self.max_batch_size > 0 else "")
            raise invalid(f"unexpected shape for input '{self.name}' for model '{self.model}'. "
                          f"Expected {_fmt_shape(expected)}, got {_fmt_shape(shape)}.{hint}")
        if self.max_batch_size > 0:
            if shape[0] < 1:
                raise invalid(f"inference input '{self.name}' for model '{self.model}' has batch size 0")
            if shape[0] > self.max_batch_size:
                raise invalid(f"inference request batch-size must be <= {self.max_batch_size} for "
                              f"'{self.model}', got {shape[0]}")
        return shape

    def byte_size(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape) * ELEMENT_SIZE[self.datatype]

    def check_byte_size(self, shape: tuple[int, ...], got: int) -> None:
        expected = self.byte_size(shape)
        if got != expected:
            raise invalid(f"input byte size mismatch for input '{self.name}' for model '{self.model}'. "
                          f"Expected {expected}, got {got}")


@dataclass(frozen=True, slots=True)
class OutputSpec:
    name: str
    datatype: str
    full_shape: tuple[int, ...]


class ModelSignature:
    """Inputs, outputs and batching of one loaded model version."""

    def __init__(self, cfg: mc.ModelConfig, version: int):
        self.model = cfg.name
        self.version = version
        self.version_str = str(version)
        self.max_batch_size = cfg.max_batch_size
        batch = (-1,) if cfg.max_batch_size > 0 else ()
        self.inputs: dict[str, InputSpec] = {}
        for t in cfg.input:
            v2 = CONFIG_TO_V2[mc.DataType.Name(t.data_type)]
            self.inputs[t.name] = InputSpec(t.name, v2, V2_TO_NUMPY.get(v2), batch + tuple(t.dims), cfg.name,
                                            cfg.max_batch_size)
        self.outputs: dict[str, OutputSpec] = {}
        for t in cfg.output:
            v2 = CONFIG_TO_V2[mc.DataType.Name(t.data_type)]
            self.outputs[t.name] = OutputSpec(t.name, v2, batch + tuple(t.dims))
        self.required = [n for n, t in zip(self.inputs, cfg.input, strict=True) if not t.optional]

    def input_spec(self, name: Any) -> InputSpec:
        spec = self.inputs.get(name)
        if spec is None:
            raise invalid(f"unexpected inference input '{name}' for model '{self.model}'")
        return spec

    def check_output_name(self, name: Any) -> None:
        if name not in self.outputs:
            raise invalid(f"unexpected inference output '{name}' for model '{self.model}'")

    def check_complete(self, given: dict[str, Any]) -> None:
        missing = [n for n in self.required if n not in given]
        if missing:
            raise invalid(f"expected {len(self.inputs)} inputs but got {len(given)} inputs for model "
                          f"'{self.model}'. Got input(s) {sorted(given)}, but missing required input(s) "
                          f"{missing}. Please provide all required input(s).")

    def batch_rows_and_key(self, shapes: dict[str, tuple[int, ...]]) -> tuple[int, tuple]:
        """Rows this request adds to a batch, and the key that requests must share to be merged."""
        if self.max_batch_size <= 0:
            return 1, ()
        rows = -1
        for name, shape in shapes.items():
            if rows == -1:
                rows = shape[0]
            elif shape[0] != rows:
                raise invalid(f"inputs of model '{self.model}' disagree on the batch size "
                              f"({name!r} has {shape[0]}, expected {rows})")
        return rows, tuple((name, shape[1:]) for name, shape in sorted(shapes.items()))

    def metadata(self, versions: list[str]) -> dict[str, Any]:
        """`GET /v2/models/{m}` body."""
        return {
            "name": self.model,
            "versions": versions,
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.full_shape)}
                       for s in self.inputs.values()],
            "outputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.full_shape)}
                        for s in self.outputs.values()],
        }
