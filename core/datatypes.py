"""KServe v2 tensor datatypes and their numpy and Triton-config counterparts.

One table, so the replica, the gateway's request validation and the tests agree. Kept free of
onnx (core is imported by every process): the ONNX Runtime type names live with their one user,
replicas/server/model_config.py. BYTES (variable-length strings) is listed for names only:
geogate's ONNX replicas serve numeric tensors; a BYTES input is rejected as a datatype mismatch.
"""

from __future__ import annotations

import numpy as np

# v2 name -> (numpy dtype, Triton config data_type)
_TABLE: dict[str, tuple[np.dtype | None, str]] = {
    "BOOL": (np.dtype(np.bool_), "TYPE_BOOL"),
    "UINT8": (np.dtype(np.uint8), "TYPE_UINT8"),
    "UINT16": (np.dtype(np.uint16), "TYPE_UINT16"),
    "UINT32": (np.dtype(np.uint32), "TYPE_UINT32"),
    "UINT64": (np.dtype(np.uint64), "TYPE_UINT64"),
    "INT8": (np.dtype(np.int8), "TYPE_INT8"),
    "INT16": (np.dtype(np.int16), "TYPE_INT16"),
    "INT32": (np.dtype(np.int32), "TYPE_INT32"),
    "INT64": (np.dtype(np.int64), "TYPE_INT64"),
    "FP16": (np.dtype(np.float16), "TYPE_FP16"),
    "FP32": (np.dtype(np.float32), "TYPE_FP32"),
    "FP64": (np.dtype(np.float64), "TYPE_FP64"),
    "BYTES": (None, "TYPE_STRING"),
}

V2_TO_NUMPY: dict[str, np.dtype] = {k: v[0] for k, v in _TABLE.items() if v[0] is not None}
NUMPY_TO_V2: dict[np.dtype, str] = {v: k for k, v in V2_TO_NUMPY.items()}
V2_TO_CONFIG: dict[str, str] = {k: v[1] for k, v in _TABLE.items()}
CONFIG_TO_V2: dict[str, str] = {v: k for k, v in V2_TO_CONFIG.items()}
# Byte size of one element; BYTES has none (variable length).
ELEMENT_SIZE: dict[str, int] = {k: dt.itemsize for k, dt in V2_TO_NUMPY.items()}
