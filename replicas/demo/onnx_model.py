"""The bundled demo model, built with onnx.helper (no downloads).

Two sizes:
- ``tiny``  (model ``demo``):       INPUT0 FP32 [-1, 16] -> 16x32 Gemm, Relu -> 32x8 Gemm -> OUTPUT0 [-1, 8].
  Dominated by per-call overhead; for fast tests.
- ``heavy`` (model ``demo-heavy``): INPUT0 FP32 [-1, 1024] -> 4 x (Gemm to 1280, Relu) -> 1280x16 Gemm
  -> OUTPUT0 [-1, 16]. About 0.5-1 ms per batch-1 inference on one CPU core, so batching matters.

Weights are drawn from a generator seeded by (size, version), and the last bias is shifted by
the version number, so every version computes different outputs and a client can tell which
version answered: ``reference_outputs`` recomputes any version's answer in numpy.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OPSET = 17
INPUT_NAME = "INPUT0"
OUTPUT_NAME = "OUTPUT0"


@dataclass(frozen=True)
class DemoSpec:
    model_name: str
    layer_widths: tuple[int, ...]  # input width, hidden widths..., output width
    max_batch_size: int
    max_queue_delay_us: int


SPECS: dict[str, DemoSpec] = {
    "tiny": DemoSpec("demo", (16, 32, 8), max_batch_size=32, max_queue_delay_us=0),
    "heavy": DemoSpec("demo-heavy", (1024, 1280, 1280, 1280, 1280, 16), max_batch_size=64,
                      max_queue_delay_us=0),
}


def _seed(size: str, version: int) -> int:
    digest = hashlib.sha256(f"geogate-demo/{size}/{version}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def demo_weights(size: str, version: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (W, b) of every layer of a version: deterministic, different per version."""
    spec = SPECS[size]
    rng = np.random.default_rng(_seed(size, version))
    layers = []
    widths = spec.layer_widths
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        b = (rng.standard_normal(fan_out) * 0.1).astype(np.float32)
        if i == len(widths) - 2:
            b = b + np.float32(version)  # outputs of version N sit around N
        layers.append((w, b))
    return layers


def reference_outputs(size: str, version: int, x: np.ndarray) -> np.ndarray:
    """What version `version` of the demo model computes for `x`, in numpy (float32)."""
    h = x.astype(np.float32)
    layers = demo_weights(size, version)
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    return h.astype(np.float32)


def build_model(size: str, version: int):
    """The ONNX model of one demo version (opset 17, dynamic batch dimension)."""
    from onnx import TensorProto, helper, numpy_helper

    spec = SPECS[size]
    nodes, inits = [], []
    current = INPUT_NAME
    layers = demo_weights(size, version)
    for i, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"B{i}")]
        last = i == len(layers) - 1
        out = OUTPUT_NAME if last else f"gemm{i}"
        nodes.append(helper.make_node("Gemm", [current, f"W{i}", f"B{i}"], [out], name=f"gemm{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i}"], name=f"relu{i}"))
            current = f"relu{i}"
    graph = helper.make_graph(
        nodes,
        f"{spec.model_name}-v{version}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", spec.layer_widths[0]])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", spec.layer_widths[-1]])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="geogate-demo")
    model.ir_version = 9  # readable by every onnxruntime >= 1.16
    return model


def config_pbtxt(size: str, *, name: str | None = None, batching: bool = True,
                 instances: int = 1, max_batch_size: int | None = None) -> str:
    spec = SPECS[size]
    mbs = spec.max_batch_size if max_batch_size is None else max_batch_size
    text = [
        f'name: "{name or spec.model_name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {mbs}",
        f'input [{{ name: "{INPUT_NAME}" data_type: TYPE_FP32 dims: [ {spec.layer_widths[0]} ] }}]',
        f'output [{{ name: "{OUTPUT_NAME}" data_type: TYPE_FP32 dims: [ {spec.layer_widths[-1]} ] }}]',
        f"instance_group [{{ count: {instances} kind: KIND_AUTO }}]",
        "version_policy: { all: {} }",
    ]
    if batching and mbs > 0:
        text.append(f"dynamic_batching {{ max_queue_delay_microseconds: {spec.max_queue_delay_us} }}")
    return "\n".join(text) + "\n"


def write_repository_entry(outdir: str | os.PathLike[str], version: int, *, size: str = "tiny",
                           name: str | None = None, with_config: bool = True, batching: bool = True,
                           instances: int = 1, max_batch_size: int | None = None) -> Path:
    """Write OUTDIR/<name>/<version>/model.onnx (+ OUTDIR/<name>/config.pbtxt). Returns the model dir."""
    import onnx

    spec = SPECS[size]
    model_dir = Path(outdir) / (name or spec.model_name)
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    tmp = version_dir / "model.onnx.tmp"
    onnx.save(build_model(size, version), str(tmp))
    tmp.replace(version_dir / "model.onnx")
    if with_config:
        (model_dir / "config.pbtxt").write_text(
            config_pbtxt(size, name=name, batching=batching, instances=instances,
                         max_batch_size=max_batch_size))
    return model_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("outdir", help="model repository directory to write into")
    parser.add_argument("--version", type=int, action="append", default=None,
                        help="version number to write (repeatable; default 1)")
    parser.add_argument("--size", choices=sorted(SPECS), default="tiny",
                        help="tiny (model 'demo', fast tests) or heavy (model 'demo-heavy', ~0.5-1 ms/inference)")
    parser.add_argument("--name", default=None, help="model name (default: demo / demo-heavy)")
    parser.add_argument("--no-config", action="store_true",
                        help="write no config.pbtxt (the replica completes it from the ONNX graph)")
    parser.add_argument("--no-batching", action="store_true", help="config without dynamic_batching")
    parser.add_argument("--instances", type=int, default=1, help="instance_group count")
    parser.add_argument("--format", choices=("onnx", "python-backend"), default="onnx",
                        help="onnx (geogate replicas, Triton onnxruntime backend) or python-backend "
                             "(the same model for Triton's python backend)")


def run(args: argparse.Namespace) -> int:
    versions = args.version or [1]
    for v in versions:
        if v < 1:
            raise SystemExit(f"--version must be >= 1, got {v}")
        if args.format == "python-backend":
            from replicas.demo.python_backend import write_python_backend_entry

            path = write_python_backend_entry(args.outdir, v, size=args.size, name=args.name,
                                              with_config=not args.no_config)
            print(f"wrote {path / str(v) / 'model.py'}")
            continue
        path = write_repository_entry(args.outdir, v, size=args.size, name=args.name,
                                      with_config=not args.no_config, batching=not args.no_batching,
                                      instances=args.instances)
        print(f"wrote {path / str(v) / 'model.onnx'}")
    return 0
