"""Per model version statistics, as Triton's statistics extension reports them.

Counts and cumulative nanoseconds (success, fail, queue, compute); one protobuf
(`ModelStatistics`) serves both gRPC and the HTTP JSON (int64 rendered as numbers).
"""

from __future__ import annotations

import time

from tritonclient.grpc import service_pb2


class VersionStats:
    __slots__ = (
        "batches",
        "execution_count",
        "fail_count",
        "fail_ns",
        "infer_ns",
        "inference_count",
        "input_ns",
        "last_inference_ms",
        "output_ns",
        "queue_ns",
        "success_count",
        "success_ns",
    )

    def __init__(self) -> None:
        self.success_count = 0
        self.success_ns = 0
        self.fail_count = 0
        self.fail_ns = 0
        self.queue_ns = 0
        self.infer_ns = 0
        self.input_ns = 0
        self.output_ns = 0
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        # batch size -> [count, compute ns]
        self.batches: dict[int, list[int]] = {}

    def record_success(self, *, rows: int, total_ns: int, queue_ns: int, compute_ns: int) -> None:
        self.success_count += 1
        self.success_ns += total_ns
        self.queue_ns += queue_ns
        self.infer_ns += compute_ns
        self.inference_count += rows
        self.last_inference_ms = int(time.time() * 1000)

    def record_failure(self, total_ns: int) -> None:
        self.fail_count += 1
        self.fail_ns += total_ns
        self.last_inference_ms = int(time.time() * 1000)

    def record_batch(self, rows: int, compute_ns: int) -> None:
        self.execution_count += 1
        entry = self.batches.get(rows)
        if entry is None:
            self.batches[rows] = [1, compute_ns]
        else:
            entry[0] += 1
            entry[1] += compute_ns

    def to_proto(self, model: str, version: str) -> service_pb2.ModelStatistics:
        s = service_pb2.ModelStatistics(name=model, version=version, last_inference=self.last_inference_ms,
                                        inference_count=self.inference_count,
                                        execution_count=self.execution_count)
        st = s.inference_stats
        st.success.count, st.success.ns = self.success_count, self.success_ns
        st.fail.count, st.fail.ns = self.fail_count, self.fail_ns
        st.queue.count, st.queue.ns = self.success_count, self.queue_ns
        st.compute_input.count, st.compute_input.ns = self.success_count, self.input_ns
        st.compute_infer.count, st.compute_infer.ns = self.success_count, self.infer_ns
        st.compute_output.count, st.compute_output.ns = self.success_count, self.output_ns
        st.cache_hit.SetInParent()  # no response cache; present (zero) as Triton reports it
        st.cache_miss.SetInParent()
        for rows in sorted(self.batches):
            count, ns = self.batches[rows]
            b = s.batch_stats.add(batch_size=rows)
            b.compute_infer.count, b.compute_infer.ns = count, ns
            b.compute_input.count = count
            b.compute_output.count = count
        return s
