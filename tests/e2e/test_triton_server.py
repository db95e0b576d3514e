"""The real Triton server from `make triton-env` serves geogate's python-backend demo model
with the same answers as the ONNX demo, and its repository API loads versions on demand."""

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from replicas.demo.onnx_model import reference_outputs
from replicas.demo.python_backend import write_python_backend_entry
from tests.procs import TritonProc


def test_triton_serves_demo_versions_with_reference_outputs(tmp_path, procs):
    for v in (1, 2):
        write_python_backend_entry(tmp_path, v)
    triton = TritonProc(str(tmp_path), load=("demo",))
    procs.append(triton)
    triton.wait_ready()
    x = np.random.default_rng(0).random((3, 16), dtype=np.float32)
    http = httpclient.InferenceServerClient(triton.http_url)
    grpc = grpcclient.InferenceServerClient(triton.grpc_url)
    for version in (1, 2):
        hin = httpclient.InferInput("INPUT0", [3, 16], "FP32")
        hin.set_data_from_numpy(x, binary_data=True)
        r = http.infer("demo", [hin], model_version=str(version))
        np.testing.assert_allclose(r.as_numpy("OUTPUT0"), reference_outputs("tiny", version, x), rtol=1e-5)
        gin = grpcclient.InferInput("INPUT0", [3, 16], "FP32")
        gin.set_data_from_numpy(x)
        g = grpc.infer("demo", [gin], model_version=str(version))
        assert g.get_response().model_version == str(version)
        np.testing.assert_allclose(g.as_numpy("OUTPUT0"), reference_outputs("tiny", version, x), rtol=1e-5)
    index = {(m["name"], m["version"]): m["state"] for m in http.get_model_repository_index()}
    assert index == {("demo", "1"): "READY", ("demo", "2"): "READY"}
    http.unload_model("demo")
    assert not http.is_model_ready("demo")
    http.close()
    grpc.close()
    triton.kill()  # nothing to drain or save: skip Triton's exit timeout
