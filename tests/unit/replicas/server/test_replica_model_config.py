"""Model config parsing, auto-complete from the ONNX graph, version policies, and Triton's JSON shape
(in-process, on real ONNX Runtime sessions of models built here)."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from replicas.demo.onnx_model import write_repository_entry
from replicas.server import model_config as mcfg
from replicas.server.onnx_runner import OrtRunner
from replicas.server.repository import select_versions


def _runner(path) -> OrtRunner:
    return OrtRunner(path, count=1, want_gpu=True, intra_op_threads=1, label="t")


def test_autocomplete_batchable_model_without_config(tmp_path):
    model_dir = write_repository_entry(tmp_path, 1, with_config=False)
    runner = _runner(model_dir / "1" / "model.onnx")
    base, from_file = mcfg.base_config(model_dir)
    assert not from_file
    cfg = mcfg.autocomplete(base, model_name="demo", from_file=False, inputs=runner.inputs,
                            outputs=runner.outputs, max_batch_size_given=False)
    assert cfg.max_batch_size == mcfg.DEFAULT_MAX_BATCH_SIZE
    assert cfg.HasField("dynamic_batching")
    assert cfg.version_policy.WhichOneof("policy_choice") == "latest"
    assert list(cfg.input[0].dims) == [16] and list(cfg.output[0].dims) == [8]
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    # the provider really used is what we report
    assert runner.provider == "CPUExecutionProvider"
    mcfg.set_execution_provider(cfg, runner.provider)
    js = mcfg.config_to_json(cfg)
    assert js["parameters"] == {"execution_provider": {"string_value": "CPUExecutionProvider"}}
    assert js["input"][0]["dims"] == [16]  # int64 as JSON numbers, not strings
    assert js["max_batch_size"] == 4
    runner.close()


def test_autocomplete_fixed_batch_model_does_not_batch(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["X"], ["Y"])], "fixed",
                              [helper.make_tensor_value_info("X", TensorProto.INT32, [3, 4])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [3, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    (tmp_path / "fixed" / "1").mkdir(parents=True)
    path = tmp_path / "fixed" / "1" / "model.onnx"
    onnx.save(model, str(path))
    runner = _runner(path)
    cfg = mcfg.autocomplete(mc.ModelConfig(), model_name="fixed", from_file=False, inputs=runner.inputs,
                            outputs=runner.outputs, max_batch_size_given=False)
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert list(cfg.input[0].dims) == [3, 4] and cfg.input[0].data_type == mc.TYPE_INT32
    runner.close()


def test_config_errors_name_the_problem(tmp_path):
    model_dir = write_repository_entry(tmp_path, 1)
    runner = _runner(model_dir / "1" / "model.onnx")
    base, _ = mcfg.base_config(model_dir)
    with pytest.raises(mcfg.ConfigError, match="must match"):
        mcfg.autocomplete(base, model_name="other", from_file=True, inputs=runner.inputs,
                          outputs=runner.outputs, max_batch_size_given=True)
    bad = mc.ModelConfig()
    bad.CopyFrom(base)
    bad.input[0].data_type = mc.TYPE_INT64
    with pytest.raises(mcfg.ConfigError, match="TYPE_INT64"):
        mcfg.autocomplete(bad, model_name="demo", from_file=True, inputs=runner.inputs,
                          outputs=runner.outputs, max_batch_size_given=True)
    (model_dir / "config.pbtxt").write_text("max_batch_size: [")
    with pytest.raises(mcfg.ConfigError, match=r"config\.pbtxt"):
        mcfg.base_config(model_dir)
    with pytest.raises(mcfg.ConfigError, match="JSON"):
        mcfg.config_from_json("{")
    runner.close()


@pytest.mark.parametrize(("policy", "expected"), [
    ("", [5]),
    ("latest { num_versions: 2 }", [3, 5]),
    ("all {}", [1, 3, 5]),
    ("specific { versions: [1, 4, 5] }", [1, 5]),
])
def test_version_policies(policy, expected):
    from google.protobuf import text_format

    p = text_format.Parse(policy, mc.ModelVersionPolicy())
    assert select_versions(p, [1, 3, 5]) == expected
