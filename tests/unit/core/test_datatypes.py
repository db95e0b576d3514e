"""core.datatypes: the v2 <-> numpy <-> Triton-config table, and core staying light."""

import ast
from pathlib import Path

import numpy as np

from core.datatypes import CONFIG_TO_V2, ELEMENT_SIZE, NUMPY_TO_V2, V2_TO_CONFIG, V2_TO_NUMPY
from replicas.server.model_config import ORT_TYPE_TO_V2

CORE = Path(__file__).resolve().parents[3] / "core"
HEAVY = {"onnx", "onnxruntime", "torch", "tritonclient"}
IN_PROJECT = {"gateway", "replicas", "health", "geo", "loadtests", "tests"}


def test_tables_agree():
    assert V2_TO_NUMPY["FP32"] == np.dtype(np.float32)
    assert NUMPY_TO_V2[np.dtype(np.int64)] == "INT64"
    assert ELEMENT_SIZE["FP16"] == 2 and "BYTES" not in ELEMENT_SIZE
    assert V2_TO_CONFIG["BYTES"] == "TYPE_STRING"
    for v2, config in V2_TO_CONFIG.items():
        assert CONFIG_TO_V2[config] == v2


def test_every_ort_type_the_replica_loads_has_a_numpy_dtype():
    for ort_type, v2 in ORT_TYPE_TO_V2.items():
        assert v2 in V2_TO_NUMPY, ort_type


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_core_imports_no_onnx_and_nothing_in_project():
    files = sorted(CORE.glob("*.py"))
    assert files
    for path in files:
        imported = _top_level_imports(path)
        assert not imported & HEAVY, (path.name, imported & HEAVY)
        assert not imported & IN_PROJECT, (path.name, imported & IN_PROJECT)
