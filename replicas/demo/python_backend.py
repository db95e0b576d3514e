"""The demo model for NVIDIA Triton's python backend (Triton replicas here run without ONNX
Runtime: the pytriton wheel's server ships only the python backend).

Same model, same weights, same outputs as the ONNX demo (``replicas.demo.onnx_model``), so a client
or the load generator checks answers from geogate and Triton replicas alike with
``reference_outputs``.  Layout: ``OUTDIR/<name>/config.pbtxt`` (backend "python") and
``OUTDIR/<name>/<version>/{model.py, weights.npz}``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from replicas.demo.onnx_model import INPUT_NAME, OUTPUT_NAME, SPECS, demo_weights

DELAY_FILE = "execute_delay_s"  # optional, next to the weights: seconds each execute sleeps (tests)

MODEL_PY = '''"""geogate demo model (python backend): an MLP whose weights live next to this file."""
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        here = os.path.join(args["model_repository"], args["model_version"])
        with np.load(os.path.join(here, "weights.npz")) as w:
            count = len(w.files) // 2
            self.layers = [(w[f"W{i}"], w[f"B{i}"]) for i in range(count)]
        delay = os.path.join(here, "execute_delay_s")
        self.delay_s = float(open(delay).read()) if os.path.exists(delay) else 0.0

    def execute(self, requests):
        if self.delay_s:
            time.sleep(self.delay_s)
        responses = []
        for request in requests:
            h = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy().astype(np.float32)
            for i, (w, b) in enumerate(self.layers):
                h = h @ w + b
                if i < len(self.layers) - 1:
                    h = np.maximum(h, 0)
            out = pb_utils.Tensor("OUTPUT0", h.astype(np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
'''


def python_backend_config(size: str, *, name: str | None = None, max_batch_size: int | None = None) -> str:
    spec = SPECS[size]
    mbs = spec.max_batch_size if max_batch_size is None else max_batch_size
    return "\n".join([
        f'name: "{name or spec.model_name}"',
        'backend: "python"',
        f"max_batch_size: {mbs}",
        f'input [{{ name: "{INPUT_NAME}" data_type: TYPE_FP32 dims: [ {spec.layer_widths[0]} ] }}]',
        f'output [{{ name: "{OUTPUT_NAME}" data_type: TYPE_FP32 dims: [ {spec.layer_widths[-1]} ] }}]',
        "instance_group [{ count: 1 kind: KIND_CPU }]",
        "dynamic_batching { }",
        "version_policy: { all: {} }",
    ]) + "\n"


def write_python_backend_entry(outdir: str | os.PathLike[str], version: int, *, size: str = "tiny",
                               name: str | None = None, with_config: bool = True, execute_delay_s: float = 0.0,
                               max_batch_size: int | None = None) -> Path:
    """Write OUTDIR/<name>/<version>/{model.py, weights.npz} (+ config.pbtxt). Returns the model dir.
    `execute_delay_s`: each execute sleeps that long first (a slow model, so requests queue)."""
    spec = SPECS[size]
    model_dir = Path(outdir) / (name or spec.model_name)
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for i, (w, b) in enumerate(demo_weights(size, version)):
        arrays[f"W{i}"], arrays[f"B{i}"] = w, b
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (version_dir / "weights.npz").write_bytes(buf.getvalue())
    (version_dir / "model.py").write_text(MODEL_PY)
    if execute_delay_s:
        (version_dir / DELAY_FILE).write_text(repr(float(execute_delay_s)))
    if with_config:
        (model_dir / "config.pbtxt").write_text(python_backend_config(size, name=name, max_batch_size=max_batch_size))
    return model_dir
