"""Sequences (stateful models) through the gateway with 2 and 3 real Tritons running a
sequence-batcher accumulator (loadtests/sequence_models.py: uint64 and string
sequence ids): 8 concurrent sequence clients over HTTP and gRPC get the answers of a
single-server run; a Triton killed mid-sequence loses exactly its sequences (a clear 503 /
UNAVAILABLE), the others go on untouched, and a new START of a lost sequence succeeds."""

from __future__ import annotations

import json
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from gateway.routing.sequences import rank
from loadtests.sequence_models import INT_MODEL, STRING_MODEL, write_accumulators
from tests.e2e.test_triton_gateway import TritonGatewayProc, all_healthy, both_urls, wait_for
from tests.gateway_procs import FAST_HEALTH, RegionGatewayProc, get_json, http_call, one_region_toml
from tests.procs import GEOGATE, TritonProc, free_port

STEPS = 8
CLIENTS = 8


class SeqClient:
    """One sequence's client (tritonclient HTTP or gRPC) at one address."""

    def __init__(self, protocol: str, address: str, model: str, seq_id: int | str) -> None:
        self.protocol, self.model, self.seq_id = protocol, model, seq_id
        self.mod = httpclient if protocol == "http" else grpcclient
        self.client = self.mod.InferenceServerClient(address)

    def step(self, value: int, *, start: bool = False, end: bool = False) -> int:
        inp = self.mod.InferInput("INPUT", [1, 1], "INT32")
        inp.set_data_from_numpy(np.array([[value]], dtype=np.int32))
        inputs = [inp]
        if self.model == STRING_MODEL:
            key = self.mod.InferInput("KEY", [1, 1], "BYTES")
            key.set_data_from_numpy(np.array([[str(self.seq_id).encode()]], dtype=object))
            inputs.append(key)
        res = self.client.infer(self.model, inputs, sequence_id=self.seq_id, sequence_start=start,
                                sequence_end=end)
        return int(res.as_numpy("OUTPUT").reshape(-1)[0])

    def run(self, values: list[int], barrier: threading.Barrier | None = None) -> list[int]:
        out = []
        try:
            for i, v in enumerate(values):
                if barrier is not None:
                    barrier.wait(timeout=60)  # every client's step i before anyone's step i + 1
                out.append(self.step(v, start=i == 0, end=i == len(values) - 1))
        except BaseException:
            if barrier is not None:
                barrier.abort()  # the others stop waiting for this one
            raise
        return out

    def close(self) -> None:
        self.client.close()


def sequences() -> list[tuple[str, str, int | str]]:
    """CLIENTS sequences: both protocols, both id kinds (one uint64 id above 2**63 over HTTP;
    tritonclient's gRPC client sends ids as int64)."""
    out: list[tuple[str, str, int | str]] = []
    for i in range(CLIENTS // 4):
        out += [("http", INT_MODEL, 2**63 + 11 + i if i == 0 else 100 + i), ("grpc", INT_MODEL, 200 + i),
                ("http", STRING_MODEL, f"http-seq-{i}"), ("grpc", STRING_MODEL, f"grpc-seq-{i}")]
    return out


def metric_total(gw: TritonGatewayProc, name: str) -> float:
    with urllib.request.urlopen(f"http://{gw.admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def address(proto: str, gw: TritonGatewayProc) -> str:
    return gw.http if proto == "http" else gw.grpc


@pytest.fixture
def repo(tmp_path) -> Path:
    path = tmp_path / "repo"
    write_accumulators(path)
    return path


def start_world(procs: list, tmp_path: Path, repo: Path, n: int) -> tuple[list[TritonProc], TritonGatewayProc]:
    tritons = [TritonProc(str(repo), load=(INT_MODEL, STRING_MODEL)) for _ in range(n)]
    procs.extend(tritons)
    for t in tritons:
        t.wait_ready()
    gw = TritonGatewayProc(tmp_path, both_urls(tritons))
    procs.append(gw)
    gw.wait_ready()
    wait_for(lambda: all_healthy(gw, 2 * n), f"all {2 * n} Triton upstreams healthy", procs=[gw])
    return tritons, gw


def single_server_answers(triton: TritonProc, plan: list[tuple[str, str, int | str, list[int]]]) -> list[list[int]]:
    answers = []
    for proto, model, sid, values in plan:
        c = SeqClient(proto, triton.http_url if proto == "http" else triton.grpc_url, model, sid)
        try:
            answers.append(c.run(values))
        finally:
            c.close()
    return answers


@pytest.mark.parametrize("n", [2, 3])
def test_concurrent_sequences_match_a_single_server_run(procs, tmp_path, repo, n):
    tritons, gw = start_world(procs, tmp_path, repo, n)
    rng = np.random.default_rng(n)
    plan = [(p, m, sid, [int(v) for v in rng.integers(1, 100, STEPS)]) for p, m, sid in sequences()]
    expected = single_server_answers(tritons[-1], plan)
    assert expected == [list(np.cumsum(values)) for *_, values in plan]
    barrier = threading.Barrier(len(plan))
    clients = [SeqClient(p, address(p, gw), m, sid) for p, m, sid, _ in plan]
    try:
        with ThreadPoolExecutor(len(plan)) as pool:
            got = list(pool.map(lambda cv: cv[0].run(cv[1], barrier), zip(clients, [v for *_, v in plan], strict=True)))
    finally:
        for c in clients:
            c.close()
    assert got == expected
    assert metric_total(gw, "geogate_sequences_pinned_total") == len(plan)
    assert metric_total(gw, "geogate_sequences_lost_total") == 0
    assert_bad_parameters_refused(gw)


def assert_bad_parameters_refused(gw: TritonGatewayProc) -> None:
    """Malformed sequence parameters: 400 / INVALID_ARGUMENT from the gateway, with the reason."""
    tensor = {"name": "INPUT", "datatype": "INT32", "shape": [1, 1], "data": [1]}
    for params, word in (({"sequence_id": 5, "sequence_start": "yes"}, "sequence_start"),
                         ({"sequence_id": 1.5}, "sequence_id")):
        body = json.dumps({"inputs": [tensor], "parameters": params}).encode()
        status, _, answer = http_call(f"http://{gw.http}/v2/models/{INT_MODEL}/infer", body,
                                      {"Content-Type": "application/json"})
        assert status == 400 and word in json.loads(answer)["error"], answer
    req = service_pb2.ModelInferRequest(model_name=INT_MODEL)
    inp = req.inputs.add(name="INPUT", datatype="INT32", shape=[1, 1])
    inp.contents.int_contents.append(1)
    req.parameters["sequence_id"].int64_param = 5
    req.parameters["sequence_start"].int64_param = 1
    with grpc.insecure_channel(gw.grpc) as channel:
        with pytest.raises(grpc.RpcError) as info:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'sequence_start' must be a bool" in info.value.details()


class TritonWorkersGatewayProc(RegionGatewayProc):
    """`geogate gateway --workers N` over a ``kind = "triton"`` pool."""

    def __init__(self, tmp_path: Path, replicas: list[str], workers: int) -> None:
        self.http_port, self.grpc_port, self.admin_port = free_port(), free_port(), free_port()
        members = f"replicas = {json.dumps(replicas)}"
        self.config_path = tmp_path / f"gw-workers-{self.http_port}.toml"
        self.config_path.write_text(f"""[deployment]
name = "triton-workers"
{FAST_HEALTH}
{one_region_toml(self, pool="tri", kind="triton", members=members)}""")
        super().__init__([*GEOGATE, "gateway", "--config", str(self.config_path), "--region", "r1",
                          "--workers", str(workers)], name=f"gw-workers-{self.http_port}")


def test_two_gateway_workers_agree_on_every_sequence(procs, tmp_path, repo):
    """Each step on a fresh connection, so on either worker: the hash alone keeps every
    sequence on its Triton (the workers share no memory)."""
    tritons = [TritonProc(str(repo), load=(INT_MODEL, STRING_MODEL)) for _ in range(2)]
    procs.extend(tritons)
    for t in tritons:
        t.wait_ready()
    gw = TritonWorkersGatewayProc(tmp_path, both_urls(tritons), workers=2)
    procs.append(gw)
    gw.wait_ready()
    ready: set = set()  # workers seen answering with both Tritons healthy (each probes on its own)

    def every_worker_sees_both() -> bool:
        region = get_json(f"http://{gw.http}/geogate/v1/region")  # a new connection: either worker
        if region["replicas"]["healthy"] == 4:
            ready.add(region["worker"])
        return len(ready) == 2

    wait_for(every_worker_sees_both, "both workers answering, each with all 4 upstreams healthy", procs=[gw])
    plan = [(p, m, sid, [3, 1, 4, 1, 5, 9]) for p, m, sid in sequences()]

    def run(spec) -> list[int]:
        proto, model, sid, values = spec
        out = []
        for i, v in enumerate(values):
            c = SeqClient(proto, address(proto, gw), model, sid)  # a new connection per step
            try:
                out.append(c.step(v, start=i == 0, end=i == len(values) - 1))
            finally:
                c.close()
        return out

    with ThreadPoolExecutor(len(plan)) as pool:
        got = list(pool.map(run, plan))
    assert got == [[3, 4, 8, 9, 14, 23]] * len(plan)
    assert metric_total(gw, "geogate_sequences_pinned_total") == len(plan)


def holder(proto: str, model: str, sid: int | str, tritons: list[TritonProc]) -> TritonProc:
    """The Triton the gateway places the sequence on (the same rendezvous ranking it uses)."""
    urls = {f"http://{t.http_url}" if proto == "http" else f"grpc://{t.grpc_url}": t for t in tritons}
    members = [SimpleNamespace(url=u, state=SimpleNamespace(weight=1)) for u in urls]
    return urls[rank(model, sid, members)[0].url]


def lost_error(exc: InferenceServerException, proto: str) -> bool:
    text = str(exc)
    status = "503" if proto == "http" else "UNAVAILABLE"
    return status in str(exc.status()) and "lost: replica" in text and "restart the sequence" in text


def test_killed_replica_loses_only_its_sequences_and_a_new_start_succeeds(procs, tmp_path, repo):
    tritons, gw = start_world(procs, tmp_path, repo, 3)
    victim = tritons[0]
    # Per protocol and id kind: one sequence on the victim, one elsewhere.
    plan: list[tuple[str, str, int | str]] = []
    for proto in ("http", "grpc"):
        for model in (INT_MODEL, STRING_MODEL):
            # Correlation ids are per model, whatever the protocol: no id used twice.
            ids = ((i if proto == "http" else 1000 + i) if model == INT_MODEL else f"{proto}-k-{i}"
                   for i in range(1, 1000))
            on, off = None, None
            for sid in ids:
                on_victim = holder(proto, model, sid, tritons) is victim
                if on_victim and on is None:
                    on = sid
                elif not on_victim and off is None:
                    off = sid
                if on is not None and off is not None:
                    break
            plan += [(proto, model, on), (proto, model, off)]
    doomed = [holder(p, m, sid, tritons) is victim for p, m, sid in plan]
    # Every client lives in one thread (tritonclient's HTTP client is bound to its thread); the
    # barriers' actions run once all clients are there.
    killed = threading.Barrier(len(plan), action=victim.kill)  # SIGKILL mid-sequence
    noticed = threading.Barrier(len(plan), action=lambda: wait_for(
        lambda: all_healthy(gw, 4), "the dead Triton's upstreams marked unhealthy", procs=[gw]))

    def scenario(spec: tuple[str, str, int | str], dead: bool):
        proto, model, sid = spec
        c = SeqClient(proto, address(proto, gw), model, sid)
        try:
            before = [c.step(1, start=True), c.step(2), c.step(3)]
            killed.wait(timeout=60)
            try:
                after: int | InferenceServerException = c.step(4)
            except InferenceServerException as exc:
                after = exc
            end = None if dead else c.step(5, end=True)
            noticed.wait(timeout=60)
            # A lost sequence started again lands on a live Triton and runs to its end.
            again = [c.step(7, start=True), c.step(1), c.step(2, end=True)] if dead else None
            return before, after, end, again
        except BaseException:
            killed.abort()  # the other clients stop waiting: this one failed
            noticed.abort()
            raise
        finally:
            c.close()

    with ThreadPoolExecutor(len(plan)) as pool:
        results = list(pool.map(scenario, plan, doomed))
    for (proto, model, sid), dead, (before, after, end, again) in zip(plan, doomed, results, strict=True):
        assert before == [1, 3, 6]
        if dead:
            assert isinstance(after, InferenceServerException) and lost_error(after, proto), (proto, sid, after)
            assert f"sequence {sid} of model {model} lost" in str(after)
            assert again == [7, 8, 10]
        else:
            assert (after, end) == (10, 15), (proto, model, sid)  # untouched: 1 + 2 + 3 + 4 (+ 5)
    assert sum(doomed) == 4
    assert metric_total(gw, "geogate_sequences_lost_total") == sum(doomed)


def test_sequences_on_grpc_streams(procs, tmp_path, repo):
    """Sequences over ModelStreamInfer: 8 streams, each carrying one sequence's steps, through a
    gateway over 3 Tritons: answers equal a single-server run (every step reached the Triton
    holding its sequence). Then the Triton holding one sequence is killed: that sequence's next
    step gets the clear "lost" error on its stream, the stream goes on, and a new START works."""
    tritons, gw = start_world(procs, tmp_path, repo, 3)
    plan = [(m, sid, [int(v) for v in np.random.default_rng(k).integers(1, 50, STEPS)])
            for k, (_, m, sid) in enumerate(s for s in sequences() if s[0] == "grpc" or isinstance(s[2], str))]
    plan = [(m, sid if isinstance(sid, str) else 300 + k, values) for k, (m, sid, values) in enumerate(plan)][:CLIENTS]

    def step_inputs(model: str, sid, value: int) -> list:
        inp = grpcclient.InferInput("INPUT", [1, 1], "INT32")
        inp.set_data_from_numpy(np.array([[value]], dtype=np.int32))
        inputs = [inp]
        if model == STRING_MODEL:
            key = grpcclient.InferInput("KEY", [1, 1], "BYTES")
            key.set_data_from_numpy(np.array([[str(sid).encode()]], dtype=object))
            inputs.append(key)
        return inputs

    def run_stream(model: str, sid, values: list[int]) -> list:
        import queue

        client = grpcclient.InferenceServerClient(gw.grpc)
        got: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: got.put((result, error)))
        out = []
        try:
            for i, v in enumerate(values):  # one step at a time: a sequence's steps are ordered
                client.async_stream_infer(model, step_inputs(model, sid, v), sequence_id=sid,
                                          sequence_start=i == 0, sequence_end=i == len(values) - 1)
                result, error = got.get(timeout=30)
                out.append(str(error) if error is not None else int(result.as_numpy("OUTPUT").reshape(-1)[0]))
        finally:
            client.stop_stream()
            client.close()
        return out

    with ThreadPoolExecutor(len(plan)) as pool:
        got = list(pool.map(lambda p: run_stream(*p), plan))
    assert got == [list(np.cumsum(values)) for _, _, values in plan]

    # kill the Triton holding one sequence (by the gateway's own ranking) mid-way
    import queue

    members = [SimpleNamespace(url=f"grpc://{t.grpc_url}", state=SimpleNamespace(weight=1)) for t in tritons]
    sid = 777
    holder = rank(INT_MODEL, sid, members)[0].url
    victim = next(t for t in tritons if f"grpc://{t.grpc_url}" == holder)
    client = grpcclient.InferenceServerClient(gw.grpc)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer(INT_MODEL, step_inputs(INT_MODEL, sid, 5), sequence_id=sid, sequence_start=True)
        result, error = answers.get(timeout=30)
        assert error is None and int(result.as_numpy("OUTPUT").reshape(-1)[0]) == 5
        victim.kill()
        wait_for(lambda: get_json(f"http://{gw.admin}/geogate/v1/region")["replicas"]["healthy"] == 4,
                 "the killed Triton seen unhealthy", procs=[gw])
        client.async_stream_infer(INT_MODEL, step_inputs(INT_MODEL, sid, 6), sequence_id=sid)
        result, error = answers.get(timeout=30)
        assert error is not None and f"sequence {sid} of model {INT_MODEL} lost" in str(error), error
        assert "restart the sequence" in str(error)
        client.async_stream_infer(INT_MODEL, step_inputs(INT_MODEL, sid, 7), sequence_id=sid, sequence_start=True)
        result, error = answers.get(timeout=30)
        assert error is None and int(result.as_numpy("OUTPUT").reshape(-1)[0]) == 7, error
    finally:
        client.stop_stream()
        client.close()
