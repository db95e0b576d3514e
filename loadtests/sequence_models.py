"""A stateful model for Triton's sequence batcher (python backend): it adds each request's INPUT
to a running sum kept per sequence in the server process and answers the sum so far. START
resets the sum, END forgets it; a request of an unknown sequence without START is refused by
Triton itself ("must specify the START flag"). Two flavours: uint64 correlation ids (``acc_int``,
keyed by the CORRID control input) and string ids (``acc_str``, keyed by the KEY input the client
sends along, see KEY_INPUT). A sequence whose steps land on two servers gives wrong sums.
``write_accumulators(repo)`` writes both into a model repository."""

from __future__ import annotations

from pathlib import Path

INT_MODEL = "acc_int"
STRING_MODEL = "acc_str"
IDLE_US = 60_000_000  # sequences live this long without a request

MODEL_PY = '''"""Sequence accumulator (geogate tests): running sum of INPUT per sequence."""
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.sums = {}  # sequence -> sum, in this process only

    def execute(self, requests):
        responses = []
        for request in requests:
            def scalar(name):
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                return None if tensor is None else tensor.as_numpy().reshape(-1)[0]
            corrid = scalar("CORRID")
            key = int(corrid) if corrid is not None else scalar("KEY").decode()
            if scalar("START"):
                self.sums[key] = 0
            total = self.sums.get(key, 0) + int(scalar("INPUT"))
            self.sums[key] = total
            if scalar("END"):
                self.sums.pop(key, None)
            out = pb_utils.Tensor("OUTPUT", np.array([[total]], dtype=np.int32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
'''

CONTROLS = ",\n".join(
    f'    {{ name: "{n}" control [ {{ kind: {k} int32_false_true: [ 0, 1 ] }} ] }}'
    for n, k in (("START", "CONTROL_SEQUENCE_START"), ("READY", "CONTROL_SEQUENCE_READY"),
                 ("END", "CONTROL_SEQUENCE_END")))
# uint64 ids: the model sees them (CORRID) and keys its sums by them.
CORRID_CONTROL = '{ name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }'
# String ids: Triton 2.51 refuses a TYPE_STRING CORRID control input on every request ("unexpected
# number of string elements 2 for inference input 'CORRID', expecting 1") and its python backend
# does not keep implicit state, so the client sends the id again as the KEY input; Triton's sequence
# batcher still tracks the string sequence (START required, END ends it).
KEY_INPUT = '{ name: "KEY" data_type: TYPE_STRING dims: [ 1 ] }'


def config_pbtxt(name: str, string_ids: bool) -> str:
    controls = CONTROLS if string_ids else f"{CONTROLS},\n    {CORRID_CONTROL}"
    inputs = '{ name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] }' + (f", {KEY_INPUT}" if string_ids else "")
    return f'''name: "{name}"
backend: "python"
max_batch_size: 8
sequence_batching {{
  max_sequence_idle_microseconds: {IDLE_US}
  control_input [
{controls}
  ]
}}
input [ {inputs} ]
output [ {{ name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
'''


def write_accumulators(repo: Path) -> tuple[str, str]:
    """Both models (uint64 and string correlation ids) into `repo`; their names."""
    for name, string_ids in ((INT_MODEL, False), (STRING_MODEL, True)):
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        (repo / name / "config.pbtxt").write_text(config_pbtxt(name, string_ids))
        (repo / name / "1" / "model.py").write_text(MODEL_PY)
    return INT_MODEL, STRING_MODEL
