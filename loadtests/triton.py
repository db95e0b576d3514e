"""A real NVIDIA Triton server for the benchmarks (built by `make triton-env`), explicit model
control, listening on loopback only."""

from __future__ import annotations

from pathlib import Path

from loadtests.procs import Proc, free_port, http_ok

TRITON_WRAPPER = Path(__file__).resolve().parent.parent / ".venv-triton" / "bin" / "tritonserver-geogate"
READY_TIMEOUT_S = 90.0


def triton_available() -> bool:
    return TRITON_WRAPPER.exists()


class TritonProc(Proc):
    def __init__(self, repository: str | Path, *, load: tuple[str, ...], log_dir: str | Path, name: str = "triton"
                 ) -> None:
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        args = [str(TRITON_WRAPPER), "--model-repository", str(repository), "--model-control-mode", "explicit",
                "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
                "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port),
                "--metrics-address", "127.0.0.1", "--metrics-port", str(self.metrics_port),
                "--log-verbose", "0", "--exit-timeout-secs", "5"]
        for model in load:
            args += ["--load-model", model]
        super().__init__(args, name=name, log_dir=log_dir, ports=[self.http_port, self.grpc_port, self.metrics_port])

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def wait_ready(self) -> TritonProc:
        self.wait_until(lambda: http_ok(f"http://{self.http}/v2/health/ready"), READY_TIMEOUT_S)
        return self
