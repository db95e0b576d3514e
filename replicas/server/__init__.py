"""`geogate replica`: the ONNX Runtime replica server (KServe v2 over HTTP and gRPC)."""
