"""The site's status as the sync agent publishes it (``sites/{site}/status.json``: ready /
loading / failed with reason / serving, replicas' health, the store's health) and the store's
health itself: when it last answered, and what to say when it does not."""

from __future__ import annotations

import asyncio
import logging
import time

from replicas.releases.site_status import ModelStatus, SiteStatus, publish
from replicas.store import ObjectStore, StoreMissing, StoreTimeout, StoreUnavailable
from replicas.sync.metrics import SyncMetrics
from replicas.sync.state import ModelState, sorted_versions

log = logging.getLogger("geogate.sync")


class StatusReporter:
    """Builds and publishes the site status; tracks and reports whether the store answers."""

    def __init__(self, store: ObjectStore, site: str, metrics: SyncMetrics) -> None:
        self.store = store
        self.site = site
        self.metrics = metrics
        self.store_ok = True
        self.store_error = ""
        self.store_last_error = ""  # kept after recovery, so the status can say what happened
        self.store_last_error_s = 0.0
        self._store_answered_mono = time.monotonic()  # the last round/publication the store answered
        self._publish_lock = asyncio.Lock()
        metrics.store_unanswered.set_function(lambda: 0.0 if self.store_ok else self.store_unanswered_s())

    def store_unanswered_s(self) -> float:
        return time.monotonic() - self._store_answered_mono

    def store_answered(self, *, round_ok: bool = False) -> None:
        """The store just answered; `round_ok`: a whole round's reads did (the store is healthy)."""
        self._store_answered_mono = time.monotonic()
        if round_ok:
            self.store_ok, self.store_error = True, ""

    def store_failed(self, exc: StoreUnavailable, *, retry_in_s: float | None) -> None:
        """A round failed on the store: keep serving what is installed, and say so: which store,
        how long it has not answered, why (a hang, a missing store, an error)."""
        kind = "timeout" if isinstance(exc, StoreTimeout) else "missing" if isinstance(exc, StoreMissing) \
            else "unavailable"
        silent_s = self.store_unanswered_s()
        self.store_ok, self.store_error = False, str(exc)
        self.store_last_error, self.store_last_error_s = str(exc), time.time()
        self.metrics.store_up.set(0)
        self.metrics.store_failures.labels(self.site, kind).inc()
        what = "hangs" if kind == "timeout" else "is missing" if kind == "missing" else "fails"
        retry = f", retry in {retry_in_s:.0f} s" if retry_in_s is not None else ""
        log.warning(f"store unreachable: {self.store.url} {what} and has not answered for {silent_s:.0f} s; "
                    f"keeping installed versions serving{retry}",
                    extra={"fields": {"site": self.site, "store": self.store.url, "kind": kind,
                                      "unanswered_s": round(silent_s, 1), "error": str(exc),
                                      **({"retry_in_s": round(retry_in_s, 1)} if retry_in_s is not None else {})}})

    def snapshot(self, models: dict[str, ModelState], replica_health: dict[str, dict]) -> SiteStatus:
        out = {}
        for name, st in models.items():
            rec = st.record
            out[name] = ModelStatus(
                generation=rec.generation if rec else 0, stable=rec.stable if rec else None,
                canary=rec.canary_version if rec else None, ready=list(st.ready),
                loading=sorted_versions(st.loading), failed={v: f.reason for v, f in st.failed.items()},
                serving=list(st.serving))
        return SiteStatus(site=self.site, heartbeat_s=time.time(), store_ok=self.store_ok,
                          store_error=self.store_error, store_last_error=self.store_last_error,
                          store_last_error_s=self.store_last_error_s, replicas=dict(replica_health), models=out)

    async def publish(self, models: dict[str, ModelState], replica_health: dict[str, dict]) -> None:
        """Write the status to the store (StoreError when it does not take it)."""
        async with self._publish_lock:
            status = self.snapshot(models, replica_health)
            self.metrics.observe(status)
            await publish(self.store, status)
            self.store_answered()
