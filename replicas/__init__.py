"""geogate replicas: the ONNX Runtime replica server, model store and sync agent."""
