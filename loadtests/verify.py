"""Answer checking: every response's outputs must equal what the version that claims to have
served it computes.

The load generator sends a small fixed set of inputs (request i carries input i % N). For each
version seen in a response (the `geogate-model-version` header / gRPC initial metadata, else
the body's `model_version`), the expected outputs of all N inputs are computed once with
`replicas.demo.onnx_model.reference_outputs` and cached, so checking a response is one `allclose`.
A wrong answer is a failure, never a success with a footnote.
"""

from __future__ import annotations

import numpy as np

from replicas.demo.onnx_model import INPUT_NAME, OUTPUT_NAME, SPECS, reference_outputs

INPUT_SET_SIZE = 8  # distinct inputs cycled through; enough to catch a mixed-up answer
INPUT_SEED = 20240611
# ORT and numpy sum in different orders: float32 noise, far below the 1.0 gap between versions.
RTOL = 1e-3
ATOL = 1e-3

REASON_WRONG_ANSWER = "wrong answer"
REASON_NO_VERSION = "no model version in response"
REASON_BAD_VERSION = "unknown model version"
REASON_BAD_OUTPUT = "malformed output"


def size_of_model(model: str) -> str:
    """The demo size ("tiny"/"heavy") whose model name is `model`; ValueError names the choices."""
    for size, spec in SPECS.items():
        if spec.model_name == model:
            return size
    names = ", ".join(sorted(s.model_name for s in SPECS.values()))
    raise ValueError(f"model {model!r} is not a demo model ({names}): the load generator can only "
                     f"check answers of demo models")


class Verifier:
    """Checks outputs of one demo model against the served version's reference outputs.

    `assume_version`: check against this version instead of the one the response names (for
    servers that name none, or to prove that a wrong answer is caught).
    """

    def __init__(self, model: str, *, assume_version: str | None = None,
                 input_set_size: int = INPUT_SET_SIZE):
        self.model = model
        self.size = size_of_model(model)
        spec = SPECS[self.size]
        self.input_width = spec.layer_widths[0]
        self.output_width = spec.layer_widths[-1]
        self.input_name = INPUT_NAME
        self.output_name = OUTPUT_NAME
        self.assume_version = assume_version
        rng = np.random.default_rng(INPUT_SEED)
        self.inputs: list[np.ndarray] = [
            rng.standard_normal((1, self.input_width)).astype(np.float32) for _ in range(input_set_size)]
        self._expected: dict[str, list[np.ndarray]] = {}

    def expected(self, version: str) -> list[np.ndarray] | None:
        """Reference outputs of every input for `version` (None: not a version number)."""
        cached = self._expected.get(version)
        if cached is None:
            try:
                v = int(version)
            except ValueError:
                return None
            if v < 1:
                return None
            # one batched call: the weights are generated once per version, not once per input
            batch = reference_outputs(self.size, v, np.concatenate(self.inputs))
            cached = [batch[i:i + 1] for i in range(len(self.inputs))]
            self._expected[version] = cached
        return cached

    def needs_compute(self, version: str) -> bool:
        """True when checking an answer of `version` would first compute its reference outputs
        (a client then does that in a thread: for demo-heavy it takes a good part of a second)."""
        version = self.assume_version or version
        return bool(version) and version not in self._expected

    def check(self, input_index: int, version: str, output: np.ndarray | None) -> str:
        """'' when `output` is what `version` computes for input `input_index`; else the reason."""
        version = self.assume_version or version
        if not version:
            return REASON_NO_VERSION
        expected = self.expected(version)
        if expected is None:
            return f"{REASON_BAD_VERSION} {version!r}"
        want = expected[input_index % len(expected)]
        if output is None or output.size != want.size:
            return REASON_BAD_OUTPUT
        if not np.allclose(output.reshape(want.shape), want, rtol=RTOL, atol=ATOL):
            return f"{REASON_WRONG_ANSWER} (not version {version})"
        return ""
