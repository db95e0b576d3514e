"""The bundled demo models, built with onnx.helper (and a Triton python-backend variant)."""
