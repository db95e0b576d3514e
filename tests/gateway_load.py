"""A steady stream of real tritonclient requests through a gateway from a few threads, recording
every request's result and the replica that served it (geogate-replica)."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

X = np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(1, 16)


@dataclass
class Results:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    replicas: Counter = field(default_factory=Counter)
    attempts: Counter = field(default_factory=Counter)
    regions: Counter = field(default_factory=Counter)  # geogate-region of each success
    timeline: list = field(default_factory=list)  # (monotonic time, region) of each success
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ok: bool, replica: str, attempts: str, error: str = "", region: str = "") -> None:
        with self.lock:
            if ok:
                self.ok += 1
                self.replicas[replica] += 1
                self.attempts[attempts] += 1
                self.regions[region] += 1
                self.timeline.append((time.monotonic(), region))
            else:
                self.failures.append(error)

    @property
    def total(self) -> int:
        return self.ok + len(self.failures)


def _http_body() -> tuple[bytes, str]:
    header = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                                     "parameters": {"binary_data_size": X.nbytes}}],
                         "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]}).encode()
    return header + X.tobytes(), str(len(header))


def _http_worker(address: str, stop: threading.Event, res: Results, pause_s: float) -> None:
    """Keep-alive HTTP/1.1 (http.client: it exposes the response headers, tritonclient does not)."""
    host, port = address.split(":")
    body, header_len = _http_body()
    headers = {"Inference-Header-Content-Length": header_len, "Content-Type": "application/octet-stream"}
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    while not stop.is_set():
        try:
            conn.request("POST", "/v2/models/demo/infer", body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            if resp.status == 200:
                res.add(True, resp.getheader("geogate-replica", "?"), resp.getheader("geogate-attempts", "?"),
                        region=resp.getheader("geogate-region", "?"))
            else:
                res.add(False, "", "", f"http {resp.status}: {data[:300]!r}")
        except (OSError, http.client.HTTPException) as exc:
            res.add(False, "", "", f"http: {type(exc).__name__}: {exc}")
            conn.close()
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
        if pause_s:
            time.sleep(pause_s)
    conn.close()


def _grpc_worker(address: str, stop: threading.Event, res: Results, pause_s: float) -> None:
    channel = grpc.insecure_channel(address)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    req = service_pb2.ModelInferRequest(model_name="demo")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    req.raw_input_contents.append(X.tobytes())
    while not stop.is_set():
        try:
            _, call = stub.ModelInfer.with_call(req, timeout=30)
            md = dict(call.initial_metadata())
            res.add(True, md.get("geogate-replica", "?"), md.get("geogate-attempts", "?"),
                    region=md.get("geogate-region", "?"))
        except grpc.RpcError as exc:
            res.add(False, "", "", f"grpc: {exc.code()} {exc.details()}")
        if pause_s:
            time.sleep(pause_s)
    channel.close()


class Stream:
    """`http_threads` tritonclient HTTP threads and `grpc_threads` gRPC threads, until stop()."""

    def __init__(self, gw, *, http_threads: int = 3, grpc_threads: int = 1, pause_s: float = 0.0) -> None:
        self.results = Results()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=_http_worker, args=(gw.http, self._stop, self.results, pause_s),
                                          daemon=True) for _ in range(http_threads)]
        self._threads += [threading.Thread(target=_grpc_worker, args=(gw.grpc, self._stop, self.results, pause_s),
                                           daemon=True) for _ in range(grpc_threads)]

    def __enter__(self) -> Stream:
        for t in self._threads:
            t.start()
        return self

    def wait_for(self, total: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.results.total < total and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.results.total >= total, f"only {self.results.total} requests in {timeout_s}s"

    def stop(self) -> Results:
        self._stop.set()
        for t in self._threads:
            t.join(40)
        return self.results

    def __exit__(self, *exc) -> None:
        self.stop()
