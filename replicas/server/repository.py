"""The model repository: Triton layout on disk, which versions are loaded, load/unload/index.

Layout (Triton's): ROOT/<model>/config.pbtxt (optional) and ROOT/<model>/<version>/model.onnx,
versions being positive integers. The version policy (config or load override) picks versions:
`latest { num_versions: n }` (Triton's default, n = 1), `all`, or `specific { versions: [...] }`.

Loading never interrupts serving: new sessions are created off the event loop while the
current ones keep answering, then swapped in; versions that leave the policy stop receiving
requests at once and are closed when their in-flight requests are done. A version whose files
and config did not change is kept as it is. A load that fails (bad config, a selected version
that does not load, nothing selected) changes nothing that serves, as in Triton.

Confinement: the repository load API lets a caller choose a config, so a config can never name
a file outside the model's version directory: `default_model_filename` must be a plain file name
(no path separator, `..`, NUL or control character; refused before the filesystem is touched),
and a model file that is a symlink leading out of its version directory counts as absent. Either
way the answer does not depend on what exists outside the repository, and error texts name
paths relative to the repository only.

Control credentials (`ControlToken`): with `geogate replica --control-token-file`, the
repository API (index, load, unload; HTTP and gRPC) needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from core.names import model_name_problem
from replicas.server import model_config as mcfg
from replicas.server.infer_errors import invalid, not_found
from replicas.server.metrics import ReplicaMetrics
from replicas.server.onnx_runner import OrtRunner
from replicas.server.version_handle import VersionHandle

log = logging.getLogger("geogate.replica.repository")

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"
REASON_UNLOADED = "unloaded"
DEFAULT_DRAIN_TIMEOUT_S = 30.0
MAX_VERSION_CHARS = 18
MAX_CONFIG_JSON_BYTES = 1 << 20  # a load override's config; Triton configs are a few KB
CONTROL_TOKEN_ENV = "GEOGATE_REPLICA_CONTROL_TOKEN"
MIN_CONTROL_TOKEN_CHARS = 16


class LoadError(Exception):
    """A load request that failed; the message is what the index and the API answer."""


class ControlTokenError(ValueError):
    """A control token file or variable that cannot be used; the message says why."""


class ControlToken:
    """The shared secret of the replica's control endpoints, compared in constant time."""

    def __init__(self, token: str):
        problem = self.problem(token)
        if problem:
            raise ControlTokenError(problem)
        self._token = token.encode("ascii")

    @property
    def text(self) -> str:
        """The token itself, for a client that presents it (the sync agent)."""
        return self._token.decode("ascii")

    @staticmethod
    def problem(token: str) -> str:
        if len(token) < MIN_CONTROL_TOKEN_CHARS:
            return f"the control token must have at least {MIN_CONTROL_TOKEN_CHARS} characters, got {len(token)}"
        if not all("!" <= c <= "~" for c in token):
            return "the control token must be printable ASCII without spaces (it travels in a header)"
        return ""

    @classmethod
    def from_file(cls, path: str) -> ControlToken:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(64 * 1024)
        except (OSError, UnicodeDecodeError) as exc:
            raise ControlTokenError(f"cannot read the control token file {path}: {exc}") from None
        try:
            return cls(text.strip())
        except ControlTokenError as exc:
            raise ControlTokenError(f"{path}: {exc}") from None

    @classmethod
    def configured(cls, path: str) -> ControlToken | None:
        """From `path` if given, else from $GEOGATE_REPLICA_CONTROL_TOKEN; None when neither is set."""
        if path:
            return cls.from_file(path)
        value = os.environ.get(CONTROL_TOKEN_ENV, "").strip()
        if not value:
            return None
        try:
            return cls(value)
        except ControlTokenError as exc:
            raise ControlTokenError(f"${CONTROL_TOKEN_ENV}: {exc}") from None

    def refusal(self, authorization: str | bytes | None) -> str:
        """"" when `authorization` (the header / metadata value) carries the token, else why not."""
        if not authorization:
            return ("this replica's repository API needs its control token: send 'Authorization: Bearer "
                    "<token>' (geogate replica --control-token-file)")
        if isinstance(authorization, str):
            authorization = authorization.encode("utf-8", "surrogateescape")
        scheme, _, presented = authorization.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(presented.strip(), self._token):
            return "the control token presented is not valid for this replica"
        return ""


def model_file(version_dir: Path, filename: str) -> Path | None:
    """The version's model file, or None when it is absent or a symlink leading out of the
    version directory (both answer the same: nothing outside the repository can be probed)."""
    try:
        real_dir = os.path.realpath(version_dir)
        real = os.path.realpath(version_dir / filename)
        if os.path.dirname(real) != real_dir or not os.path.isfile(real):
            return None
    except (OSError, ValueError):
        return None
    return Path(real)


@dataclass
class ModelEntry:
    name: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    serving: dict[int, VersionHandle] = field(default_factory=dict)
    latest: VersionHandle | None = None
    states: dict[int, tuple[str, str]] = field(default_factory=dict)
    desired: bool = False
    error: str = ""  # model-level failure (bad config, no versions), shown in the index

    def set_serving(self, serving: dict[int, VersionHandle]) -> None:
        self.serving = serving
        self.latest = serving[max(serving)] if serving else None


def _fingerprint(cfg: mc.ModelConfig) -> bytes:
    """What decides whether a loaded version can be kept: the config without the version policy
    and without what we add ourselves (execution provider)."""
    c = mc.ModelConfig()
    c.CopyFrom(cfg)
    c.ClearField("version_policy")
    c.parameters.pop(mcfg.EXECUTION_PROVIDER_PARAMETER, None)
    return c.SerializeToString(deterministic=True)


def select_versions(policy: mc.ModelVersionPolicy, available: list[int]) -> list[int]:
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return sorted(available)
    if which == "specific":
        wanted = set(policy.specific.versions)
        return sorted(v for v in available if v in wanted)
    n = policy.latest.num_versions if which == "latest" else 1
    return sorted(available)[-max(1, n):] if available else []


class ModelRepository:
    def __init__(self, root: Path, *, metrics: ReplicaMetrics, intra_op_threads: int = 1,
                 drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S):
        self.root = root
        self.metrics = metrics
        self.intra_op_threads = intra_op_threads
        self.drain_timeout_s = drain_timeout_s
        self._models: dict[str, ModelEntry] = {}
        # Loads run one at a time off the event loop (they are CPU- and memory-heavy).
        self._load_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")
        self.started = False
        self.draining = False

    # ------------------------------------------------------------------ lookups (hot path)

    def get(self, name: str, version: str = "") -> VersionHandle:
        entry = self._models.get(name)
        if entry is None or entry.latest is None:
            if entry is not None and entry.desired and entry.states:
                raise not_found(f"Request for unknown model: '{name}' has no available versions")
            raise not_found(f"Request for unknown model: '{name}' is not found")
        if not version:
            return entry.latest
        if not (version.isascii() and version.isdigit()) or len(version) > MAX_VERSION_CHARS:
            raise invalid(f"model version must be a positive integer, got {version[:40]!r}")
        v = int(version)
        handle = entry.serving.get(v)
        if handle is None:
            raise not_found(f"Request for unknown model: '{name}' version {v} is not found")
        return handle

    def ready_versions(self, name: str) -> list[str]:
        entry = self._models.get(name)
        return [str(v) for v in sorted(entry.serving)] if entry else []

    def handles(self) -> list[VersionHandle]:
        return [h for e in self._models.values() for _, h in sorted(e.serving.items())]

    def model_handles(self, name: str) -> list[VersionHandle]:
        entry = self._models.get(name)
        return [h for _, h in sorted(entry.serving.items())] if entry else []

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason): ready only when every model that should be loaded has a serving version."""
        if self.draining:
            return False, "shutting down"
        if not self.started:
            return False, "loading the model repository"
        for entry in self._models.values():
            if entry.desired and entry.latest is None:
                loading = any(s == LOADING for s, _ in entry.states.values())
                why = "loading" if loading else (entry.error or "no version could be loaded")
                return False, f"model '{entry.name}' is not ready: {why}"
        return True, "ready"

    # ------------------------------------------------------------------ repository layout

    def model_names(self) -> list[str]:
        on_disk = {p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")} \
            if self.root.is_dir() else set()
        return sorted(on_disk | set(self._models))

    @staticmethod
    def available_versions(model_dir: Path, filename: str) -> list[int]:
        out = []
        if not model_dir.is_dir():
            return out
        for p in model_dir.iterdir():
            if (p.is_dir() and p.name.isascii() and p.name.isdigit() and int(p.name) > 0
                    and model_file(p, filename) is not None):
                out.append(int(p.name))
        return sorted(out)

    def index(self, *, ready_only: bool = False) -> list[dict[str, str]]:
        rows = []
        for name in self.model_names():
            entry = self._models.get(name)
            if entry is None or (not entry.states and not entry.error):
                if not ready_only:
                    rows.append({"name": name, "version": "", "state": "", "reason": ""})
                continue
            if not entry.states:
                if not ready_only:
                    rows.append({"name": name, "version": "", "state": UNAVAILABLE, "reason": entry.error})
                continue
            for v in sorted(entry.states):
                state, reason = entry.states[v]
                if ready_only and state != READY:
                    continue
                rows.append({"name": name, "version": str(v), "state": state, "reason": reason})
        return rows

    # ------------------------------------------------------------------ load / unload

    def _entry(self, name: str) -> ModelEntry:
        entry = self._models.get(name)
        if entry is None:
            entry = self._models[name] = ModelEntry(name)
        return entry

    async def load_all(self) -> None:
        """Startup: load every model of the repository; failures are logged and indexed."""
        for name in self.model_names():
            try:
                await self.load(name)
            except LoadError as exc:
                log.error("model failed to load", extra={"fields": {"model": name, "reason": str(exc)}})
        self.started = True

    def _build(self, name: str, version: int, path: Path, base: mc.ModelConfig, from_file: bool, mbs_given: bool,
               fingerprint: bytes) -> tuple[OrtRunner, mc.ModelConfig, frozenset]:
        """Blocking: create the sessions of one version and complete its config from the graph."""
        count = mcfg.instance_count(base) if len(base.instance_group) else 1
        runner = OrtRunner(path, count=count, want_gpu=mcfg.wants_gpu(base),
                           intra_op_threads=self.intra_op_threads, label=f"{name}/{version}")
        try:
            cfg = mcfg.autocomplete(base, model_name=name, from_file=from_file, inputs=runner.inputs,
                                    outputs=runner.outputs, max_batch_size_given=mbs_given,
                                    on_gpu=runner.provider == "CUDAExecutionProvider")
        except Exception:
            runner.close()
            raise
        mcfg.set_execution_provider(cfg, runner.provider)
        return runner, cfg, frozenset({fingerprint, _fingerprint(cfg)})

    def _relative(self, text: str) -> str:
        """An error text with the repository's location left out (paths relative to it)."""
        for root in {str(self.root), os.path.realpath(self.root)}:
            text = text.replace(root.rstrip("/") + "/", "")
        return text

    def _failed(self, entry: ModelEntry, reason: str) -> LoadError:
        """Count a failed load; the reason shows in the index while nothing of the model serves."""
        self.metrics.load_failures.labels(entry.name).inc()
        if not entry.serving:
            entry.error = reason
            return LoadError(reason)
        return LoadError(f"{reason}; the versions loaded before keep serving")

    async def load(self, name: str, config_json: str | None = None) -> None:
        """Load (or reload) a model: the versions its policy selects. Raises LoadError; a load that
        fails leaves what served before serving (nothing is retired, no new version is added)."""
        problem = model_name_problem(name)
        if problem:
            raise LoadError(f"failed to load: {problem}")
        if config_json is not None and len(config_json) > MAX_CONFIG_JSON_BYTES:
            raise LoadError(f"failed to load '{name}': the config is {len(config_json)} characters long "
                            f"(at most {MAX_CONFIG_JSON_BYTES})")
        model_dir = self.root / name
        if name not in self._models and not model_dir.is_dir():
            raise LoadError(f"failed to load '{name}': no model directory '{name}' in the repository")
        entry = self._entry(name)
        async with entry.lock:
            entry.desired = True
            try:
                base, from_file = mcfg.base_config(model_dir, config_json)
                mbs_given = mcfg.max_batch_size_given(model_dir, config_json)
                mcfg.check_file_names(base)
            except (mcfg.ConfigError, OSError) as exc:
                raise self._failed(entry, self._relative(f"failed to load '{name}': {exc}")) from None
            filename = base.default_model_filename or mcfg.DEFAULT_MODEL_FILENAME
            available = self.available_versions(model_dir, filename)
            selected = select_versions(base.version_policy, available)
            if not selected:
                raise self._failed(entry, (
                    f"failed to load '{name}': no version matches the version policy "
                    f"({base.version_policy.WhichOneof('policy_choice') or 'latest'}); versions in the "
                    f"repository with {filename!r}: {available}"))
            fingerprint = _fingerprint(base)
            old = dict(entry.serving)
            keep: dict[int, VersionHandle] = {}
            to_load: list[tuple[int, Path, tuple[int, int]]] = []
            failures: list[str] = []
            for v in selected:
                path = model_file(model_dir / str(v), filename)
                try:
                    if path is None:
                        raise FileNotFoundError(f"{filename!r} is gone")
                    st = path.stat()
                except OSError:
                    failures.append(f"failed to load '{name}' version {v}: {filename!r} is missing")
                    continue
                stamp = (st.st_mtime_ns, st.st_size)
                h = old.get(v)
                if h is not None and fingerprint in h.fingerprints and h.file_stamp == stamp:
                    keep[v] = h
                else:
                    to_load.append((v, path, stamp))
                    if h is None:
                        entry.states[v] = (LOADING, "")
            loop = asyncio.get_running_loop()
            fresh: dict[int, VersionHandle] = {}
            for v, path, stamp in to_load:
                try:
                    runner, cfg, fps = await loop.run_in_executor(
                        self._load_executor, self._build, name, v, path, base, from_file, mbs_given, fingerprint)
                    fresh[v] = VersionHandle(model=name, version=v, config=cfg, runner=runner,
                                             metrics=self.metrics, fingerprints=fps, file_stamp=stamp)
                except Exception as exc:
                    reason = self._relative(f"failed to load '{name}' version {v}: {exc}")
                    failures.append(reason)
                    log.error("version failed to load", extra={"fields": {"model": name, "version": v,
                                                                          "reason": reason}})
                    entry.states[v] = (READY, reason) if v in old else (UNAVAILABLE, reason)
            if failures and old:
                # Triton's rule: a reload that fails changes nothing that serves. The versions that
                # did load are dropped again; the old ones keep serving with their old config.
                for v in fresh:
                    entry.states[v] = (READY, "") if v in old else (UNAVAILABLE, "; ".join(failures))
                await asyncio.gather(*(h.drain_and_close(0, forget_metrics=v not in old) for v, h in fresh.items()))
                raise self._failed(entry, "; ".join(failures))
            entry.error = ""
            entry.set_serving({**keep, **fresh})
            for v, h in fresh.items():
                entry.states[v] = (READY, "")
                self.metrics.version_loaded(name, h.version_str, h.provider)
                log.info("version ready", extra={"fields": {
                    "model": name, "version": v, "execution_provider": h.provider,
                    "max_batch_size": h.config.max_batch_size,
                    "dynamic_batching": h.config.HasField("dynamic_batching"),
                    "instances": h.runner.count}})
            await self._retire(entry, {id(h) for h in entry.serving.values()}, old)
            if failures:  # a first load: the versions that loaded serve, the others are indexed
                self.metrics.load_failures.labels(name).inc()
                reason = "; ".join(failures)
                if not entry.serving:
                    entry.error = reason
                raise LoadError(reason)

    async def _retire(self, entry: ModelEntry, still_serving: set[int],
                      old: dict[int, VersionHandle] | None = None) -> None:
        """Drain and close handles that no longer serve (must hold entry.lock)."""
        old = dict(entry.serving) if old is None else old
        if not still_serving:
            entry.set_serving({})
        retired = [h for h in old.values() if id(h) not in still_serving]
        for h in retired:
            if h.version not in entry.serving:
                entry.states[h.version] = (UNLOADING, "")
        await asyncio.gather(*(h.drain_and_close(self.drain_timeout_s,
                                                 forget_metrics=h.version not in entry.serving)
                               for h in retired))
        for h in retired:
            if h.version not in entry.serving:
                entry.states[h.version] = (UNAVAILABLE, REASON_UNLOADED)
                log.info("version unloaded", extra={"fields": {"model": entry.name, "version": h.version}})

    async def unload(self, name: str) -> None:
        problem = model_name_problem(name)
        if problem:
            raise LoadError(f"failed to unload: {problem}")
        entry = self._models.get(name)
        if entry is None:
            if not (self.root / name).is_dir():
                raise LoadError(f"failed to unload '{name}': no such model")
            return
        async with entry.lock:
            entry.desired = False
            await self._retire(entry, set())

    async def close(self) -> None:
        """Shutdown: drain and close every loaded version."""
        for entry in self._models.values():
            async with entry.lock:
                await self._retire(entry, set())
        self._load_executor.shutdown(wait=False)

