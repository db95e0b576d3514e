"""Triton python-backend models for the streaming tests, written by our own code.

``repeat`` (decoupled): for a request with COUNT and BASE (INT32 [1]) it sends COUNT responses,
OUT = BASE, BASE+1, ..., each ``DELAY_S`` after the previous, then the final flag; it stops early
when Triton says the request was cancelled, and records how many responses it sent per request
id in ``<outdir>/<id>.sent`` (so a test can see that a cancel reached it).
"""

from __future__ import annotations

from pathlib import Path

REPEAT_MODEL = '''
import json
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils

DELAY_S = 0.005


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        self.outdir = cfg["parameters"]["outdir"]["string_value"]

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            count = int(pb_utils.get_input_tensor_by_name(request, "COUNT").as_numpy().reshape(-1)[0])
            base = int(pb_utils.get_input_tensor_by_name(request, "BASE").as_numpy().reshape(-1)[0])
            sent = 0
            for i in range(count):
                if request.is_cancelled():
                    break
                out = pb_utils.Tensor("OUT", np.array([base + i], dtype=np.int32))
                sender.send(pb_utils.InferenceResponse(output_tensors=[out]))
                sent += 1
                time.sleep(DELAY_S)
            rid = request.request_id() or "none"
            with open(os.path.join(self.outdir, rid + ".sent"), "w") as f:
                f.write(str(sent))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''

REPEAT_CONFIG = '''
name: "repeat"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [
  {{ name: "COUNT" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "BASE" data_type: TYPE_INT32 dims: [ 1 ] }}
]
output [ {{ name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 4 }} ]
parameters {{ key: "outdir" value: {{ string_value: "{outdir}" }} }}
'''


def write_repeat_model(repository: str | Path, outdir: str | Path) -> None:
    entry = Path(repository) / "repeat"
    (entry / "1").mkdir(parents=True, exist_ok=True)
    (entry / "1" / "model.py").write_text(REPEAT_MODEL)
    (entry / "config.pbtxt").write_text(REPEAT_CONFIG.format(outdir=outdir))
    Path(outdir).mkdir(parents=True, exist_ok=True)
