"""A decoupled Triton python-backend model for the generate / generate_stream tests.

``text_input`` (BYTES, one string) -> one response per whitespace-separated word, each
``text_output`` = "<index>:<word>", ``delay_ms`` (model config parameter) apart, then a final
empty response with the FINAL flag. The model appends one line per request to
``<log_dir>/<pid>.log`` when it ends: ``<request text's first word> sent=<n> cancelled=<0|1>``,
so a test can see that a request stopped early (Triton's request cancellation: the response
sender reports ``is_cancelled()`` once the client went away).
"""

from __future__ import annotations

from pathlib import Path

MODEL_NAME = "tokens"

MODEL_PY = '''
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        import json
        params = json.loads(args["model_config"]).get("parameters", {})
        self.delay_s = float(params["delay_ms"]["string_value"]) / 1000.0
        self.log_path = os.path.join(params["log_dir"]["string_value"], f"{os.getpid()}.log")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
            words = (text.decode() if isinstance(text, bytes) else str(text)).split()
            sent, cancelled = 0, False
            for i, word in enumerate(words):
                if sender.is_cancelled():
                    cancelled = True
                    break
                if i:
                    time.sleep(self.delay_s)
                out = pb_utils.Tensor("text_output", np.array([f"{i}:{word}".encode()], dtype=np.object_))
                sender.send(pb_utils.InferenceResponse(output_tensors=[out]))
                sent += 1
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            with open(self.log_path, "a") as f:
                f.write(f"{words[0] if words else '-'} sent={sent} cancelled={int(cancelled)}\\n")
        return None
'''

CONFIG = '''name: "{name}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [ {{ name: "text_input" data_type: TYPE_STRING dims: [ 1 ] }} ]
output [ {{ name: "text_output" data_type: TYPE_STRING dims: [ 1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 2 }} ]
parameters {{ key: "delay_ms" value: {{ string_value: "{delay_ms}" }} }}
parameters {{ key: "log_dir" value: {{ string_value: "{log_dir}" }} }}
'''


def write_token_model(repository: Path, log_dir: Path, *, delay_ms: int = 20, name: str = MODEL_NAME) -> Path:
    """Write REPOSITORY/<name>/{config.pbtxt, 1/model.py}; the model logs into LOG_DIR."""
    model_dir = repository / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "1" / "model.py").write_text(MODEL_PY)
    log_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(CONFIG.format(name=name, delay_ms=delay_ms, log_dir=log_dir))
    return model_dir


def model_log(log_dir: Path) -> list[str]:
    """Every line the model's instances wrote (one per finished request)."""
    return [line for p in sorted(log_dir.glob("*.log")) for line in p.read_text().splitlines()]
