"""Answers shared by both protocols: server metadata and the statistics extension."""

from __future__ import annotations

from importlib import metadata
from typing import Any

from tritonclient.grpc import service_pb2

from replicas.server.infer_errors import InferError
from replicas.server.repository import ModelRepository

SERVER_NAME = "geogate-replica"
# What perf_analyzer and tritonclient look for; `statistics` makes perf_analyzer ask for stats.
EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "statistics"]


def server_version() -> str:
    try:
        return metadata.version("geogate")
    except metadata.PackageNotFoundError:
        return "0"


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": server_version(), "extensions": EXTENSIONS}


def statistics_response(repository: ModelRepository, model: str = "", version: str = ""
                        ) -> service_pb2.ModelStatisticsResponse:
    """Statistics of every loaded version, of one model's versions, or of one version."""
    response = service_pb2.ModelStatisticsResponse()
    if not model:
        handles = repository.handles()
    elif version:
        handles = [repository.get(model, version)]
    else:
        handles = repository.model_handles(model)
        if not handles:
            repository.get(model)  # raises the right not-found error
            raise InferError(404, f"Request for unknown model: '{model}' is not found")
    for h in handles:
        response.model_stats.append(h.stats.to_proto(h.model, h.version_str))
    return response
