"""Triton model configuration: parse `config.pbtxt`, complete it from the ONNX graph, render JSON.

The config is Triton's own protobuf (`tritonclient.grpc.model_config_pb2.ModelConfig`), so a
repository that geogate serves can be served by a real Triton too, and the JSON we answer on
`/v2/models/{m}/config` has Triton's field names and shapes (perf_analyzer reads it).

Auto-complete follows Triton's ONNX Runtime backend when no config file exists (or a field is
left out): inputs/outputs and dims come from the graph; if every input and output has a dynamic
first dimension the model can batch, so `max_batch_size` defaults to 4 and dynamic batching
is switched on; `version_policy` defaults to `latest { num_versions: 1 }`; one CPU instance.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import descriptor as _descriptor
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from core.datatypes import V2_TO_CONFIG

CONFIG_FILENAME = "config.pbtxt"
DEFAULT_MODEL_FILENAME = "model.onnx"
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
# Triton's --backend-config=default-max-batch-size (4) for models that can batch.
DEFAULT_MAX_BATCH_SIZE = 4
EXECUTION_PROVIDER_PARAMETER = "execution_provider"
MAX_FILE_NAME_BYTES = 255  # NAME_MAX

# ORT's type strings (session.get_inputs()[i].type) -> KServe v2 datatype.
ORT_TYPE_TO_V2: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    # tensor(string) (BYTES) is deliberately absent: geogate replicas serve numeric tensors only,
    # so such a model fails to load with a reason instead of failing every request.
}


class ConfigError(ValueError):
    """A model configuration that cannot be used; the message names the file or field."""


@dataclass(frozen=True)
class GraphTensor:
    """One graph input or output as ONNX Runtime reports it."""

    name: str
    datatype: str  # KServe v2 name, e.g. FP32
    shape: tuple[int, ...]  # -1 for dynamic dimensions


def graph_tensors(ort_args: list[Any]) -> list[GraphTensor]:
    """Convert `session.get_inputs()` / `get_outputs()` to GraphTensors."""
    out = []
    for arg in ort_args:
        datatype = ORT_TYPE_TO_V2.get(arg.type)
        if datatype is None:
            raise ConfigError(f"tensor {arg.name!r} has type {arg.type}, which geogate cannot serve")
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
        out.append(GraphTensor(arg.name, datatype, shape))
    return out


def read_config_file(model_dir: Path) -> mc.ModelConfig | None:
    """Parse MODEL_DIR/config.pbtxt, or None when the model has no config file."""
    path = model_dir / CONFIG_FILENAME
    if not path.is_file():
        return None
    try:
        return text_format.Parse(path.read_text(), mc.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def config_from_json(text: str) -> mc.ModelConfig:
    """Parse a JSON model config (the repository load API's `parameters.config`)."""
    try:
        return json_format.Parse(text, mc.ModelConfig())
    except json_format.ParseError as exc:
        raise ConfigError(f"invalid model config JSON: {_brief(str(exc))}") from None
    except RecursionError:  # json.loads of deeply nested arrays/objects
        raise ConfigError("invalid model config JSON: nested too deeply") from None


def _brief(text: str, max_chars: int = 300) -> str:
    return text if len(text) <= max_chars else text[:max_chars] + "..."


def file_name_problem(value: str, field: str) -> str:
    """Why `value` cannot name a file in a model's version directory ("" when it can): a config
    (possibly from the load API) must not reach outside it. Decided on the text alone, before any
    filesystem access, so the answer never depends on what exists."""
    if not value:
        return ""
    if (len(value.encode("utf-8", "surrogatepass")) > MAX_FILE_NAME_BYTES or value in (".", "..")
            or any(c in "/\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in value)):
        return (f"{field} must be a plain file name inside the version directory (no '/', '\\', '..', NUL "
                f"or control characters, at most {MAX_FILE_NAME_BYTES} bytes)")
    return ""


def check_file_names(cfg: mc.ModelConfig) -> None:
    """ConfigError when a config names a file outside the model's version directory. Geogate
    replicas read only `default_model_filename`; the other file-naming fields of Triton's config
    (per-GPU model files, custom op library, label files, warm-up data) are never opened here,
    and are held to the same rule so that no accepted config points anywhere else."""
    names = [("default_model_filename", cfg.default_model_filename)]
    names += [("model_operations.op_library_filename", v) for v in cfg.model_operations.op_library_filename]
    names += [(f"cc_model_filenames[{k!r}]", v) for k, v in cfg.cc_model_filenames.items()]
    names += [(f"output {o.name!r} label_filename", o.label_filename) for o in cfg.output]
    names += [(f"model_warmup {w.name!r} input {k!r} input_data_file", d.input_data_file)
              for w in cfg.model_warmup for k, d in w.inputs.items()]
    for field, value in names:
        problem = file_name_problem(value, field)
        if problem:
            raise ConfigError(_brief(problem))


def base_config(model_dir: Path, override_json: str | None = None) -> tuple[mc.ModelConfig, bool]:
    """The config before auto-complete and whether it came from a file/override (vs. nothing)."""
    if override_json is not None:
        return config_from_json(override_json), True
    cfg = read_config_file(model_dir)
    if cfg is None:
        return mc.ModelConfig(), False
    return cfg, True


def _batchable(inputs: list[GraphTensor], outputs: list[GraphTensor]) -> bool:
    return all(len(t.shape) >= 1 and t.shape[0] == -1 for t in [*inputs, *outputs])


def _fill_tensors(configured, graph: list[GraphTensor], max_batch_size: int, kind: str,
                  model_name: str) -> None:
    """Add missing tensors from the graph, fill missing data_type/dims, check what was given."""
    by_name = {t.name: t for t in graph}
    if len(configured) == 0:
        for t in graph:
            entry = configured.add()
            entry.name = t.name
            entry.data_type = getattr(mc, V2_TO_CONFIG[t.datatype])
            dims = t.shape[1:] if max_batch_size > 0 else t.shape
            entry.dims.extend(dims)
        return
    for entry in configured:
        t = by_name.get(entry.name)
        if t is None:
            raise ConfigError(f"model {model_name!r}: configured {kind} {entry.name!r} is not in the ONNX graph "
                              f"(graph has {sorted(by_name)})")
        expected_type = getattr(mc, V2_TO_CONFIG[t.datatype])
        if entry.data_type == mc.TYPE_INVALID:
            entry.data_type = expected_type
        elif entry.data_type != expected_type:
            raise ConfigError(f"model {model_name!r}: {kind} {entry.name!r} is configured as "
                              f"{mc.DataType.Name(entry.data_type)} but the graph has {V2_TO_CONFIG[t.datatype]}")
        if len(entry.dims) == 0 and not entry.HasField("reshape"):
            entry.dims.extend(t.shape[1:] if max_batch_size > 0 else t.shape)


def autocomplete(cfg: mc.ModelConfig, *, model_name: str, from_file: bool,
                 inputs: list[GraphTensor], outputs: list[GraphTensor],
                 max_batch_size_given: bool, on_gpu: bool = False) -> mc.ModelConfig:
    """Complete `cfg` from the graph as Triton's ONNX Runtime backend does; returns a new config."""
    cfg = copy.deepcopy(cfg)
    if cfg.name and cfg.name != model_name:
        raise ConfigError(f"model directory {model_name!r} has a config named {cfg.name!r}; they must match")
    cfg.name = model_name
    if cfg.platform and cfg.platform != PLATFORM:
        raise ConfigError(f"model {model_name!r}: platform {cfg.platform!r} is not served here "
                          f"(only {PLATFORM!r})")
    if cfg.backend and cfg.backend != BACKEND:
        raise ConfigError(f"model {model_name!r}: backend {cfg.backend!r} is not served here (only {BACKEND!r})")
    cfg.platform = PLATFORM
    cfg.backend = BACKEND
    batchable = _batchable(inputs, outputs)
    if not from_file or not max_batch_size_given:
        if batchable and cfg.max_batch_size == 0:
            cfg.max_batch_size = DEFAULT_MAX_BATCH_SIZE
            if not cfg.HasField("dynamic_batching") and not cfg.HasField("sequence_batching"):
                cfg.dynamic_batching.SetInParent()
    if cfg.max_batch_size < 0:
        raise ConfigError(f"model {model_name!r}: max_batch_size must be >= 0, got {cfg.max_batch_size}")
    if cfg.max_batch_size > 0 and not batchable:
        raise ConfigError(f"model {model_name!r}: max_batch_size {cfg.max_batch_size} needs a dynamic first "
                          "dimension on every input and output of the graph")
    if cfg.HasField("sequence_batching") or cfg.HasField("ensemble_scheduling"):
        raise ConfigError(f"model {model_name!r}: sequence batching and ensembles are not supported")
    _fill_tensors(cfg.input, inputs, cfg.max_batch_size, "input", model_name)
    _fill_tensors(cfg.output, outputs, cfg.max_batch_size, "output", model_name)
    graph_inputs = {t.name for t in inputs}
    missing = [n for n in graph_inputs if n not in {e.name for e in cfg.input}]
    if missing:
        raise ConfigError(f"model {model_name!r}: graph inputs {sorted(missing)} are not in the config")
    if not cfg.HasField("version_policy"):
        cfg.version_policy.latest.num_versions = 1
    if len(cfg.instance_group) == 0:
        group = cfg.instance_group.add()
        group.count = 1
        group.kind = mc.ModelInstanceGroup.KIND_AUTO
    for i, group in enumerate(cfg.instance_group):
        if not group.name:
            group.name = f"{model_name}_{i}"
        if group.count <= 0:
            group.count = 1
        if group.kind == mc.ModelInstanceGroup.KIND_AUTO:
            group.kind = mc.ModelInstanceGroup.KIND_GPU if on_gpu else mc.ModelInstanceGroup.KIND_CPU
    if not cfg.default_model_filename:
        cfg.default_model_filename = DEFAULT_MODEL_FILENAME
    return cfg


def max_batch_size_given(model_dir: Path, override_json: str | None) -> bool:
    """Whether the config text states max_batch_size (proto3 cannot tell 0 from absent)."""
    if override_json is not None:
        return "max_batch_size" in override_json or "maxBatchSize" in override_json
    path = model_dir / CONFIG_FILENAME
    return path.is_file() and "max_batch_size" in path.read_text(errors="replace")


def instance_count(cfg: mc.ModelConfig) -> int:
    return max(1, sum(max(1, g.count) for g in cfg.instance_group))


def wants_gpu(cfg: mc.ModelConfig) -> bool:
    """False when every instance group insists on the CPU (no groups, KIND_AUTO or KIND_GPU: try it)."""
    return not cfg.instance_group or any(g.kind != mc.ModelInstanceGroup.KIND_CPU for g in cfg.instance_group)


def _int64_to_numbers(message_descriptor: _descriptor.Descriptor, value: Any) -> Any:
    """json_format writes 64-bit integers as strings (proto3 JSON); Triton writes numbers."""
    if not isinstance(value, dict):
        return value
    fields = message_descriptor.fields_by_name
    out = {}
    for key, item in value.items():
        field = fields.get(key)
        if field is None:
            out[key] = item
            continue
        if field.type == _descriptor.FieldDescriptor.TYPE_MESSAGE:
            sub = field.message_type
            if sub.GetOptions().map_entry:
                value_field = sub.fields_by_name["value"]
                if value_field.type == _descriptor.FieldDescriptor.TYPE_MESSAGE:
                    out[key] = {k: _int64_to_numbers(value_field.message_type, v) for k, v in item.items()}
                else:
                    out[key] = item
            elif isinstance(item, list):
                out[key] = [_int64_to_numbers(sub, v) for v in item]
            else:
                out[key] = _int64_to_numbers(sub, item)
        elif field.cpp_type in (_descriptor.FieldDescriptor.CPPTYPE_INT64,
                                _descriptor.FieldDescriptor.CPPTYPE_UINT64):
            out[key] = [int(v) for v in item] if isinstance(item, list) else int(item)
        else:
            out[key] = item
    return out


def message_to_json_dict(message) -> dict[str, Any]:
    """Any protobuf message as Triton renders it: proto field names, defaults shown, int64 as numbers."""
    raw = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True)
    return _int64_to_numbers(message.DESCRIPTOR, raw)


def config_to_json(cfg: mc.ModelConfig) -> dict[str, Any]:
    """The config as Triton's `/v2/models/{m}/config` JSON."""
    return message_to_json_dict(cfg)


def set_execution_provider(cfg: mc.ModelConfig, provider: str) -> None:
    cfg.parameters[EXECUTION_PROVIDER_PARAMETER].string_value = provider
