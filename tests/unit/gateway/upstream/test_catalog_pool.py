"""gateway.upstream.catalog: statistics and server metadata asked of the whole pool (fake replicas)."""

from __future__ import annotations

import asyncio

from gateway.upstream.catalog import ModelCatalog


class FakeState:
    def __init__(self, routable: bool, models: set[str]):
        self._routable = routable
        self.models = models

    def routable(self, now_s: float) -> tuple[bool, str]:
        return self._routable, "" if self._routable else "unhealthy"

    def has_model(self, model: str, version: str | None = None) -> bool:
        return model in self.models


class FakeClient:
    def __init__(self, answers: dict[str, tuple[int, dict]]):
        self.answers = answers
        self.asked: list[str] = []

    async def get_json(self, path: str, timeout_s: float) -> tuple[int, dict | None]:
        self.asked.append(path)
        return self.answers.get(path, (0, None))


class FakeUpstream:
    def __init__(self, url: str, client: FakeClient, *, routable: bool = True, models=("demo",)):
        self.url = url
        self.client = client
        self.state = FakeState(routable, set(models))


class FakePools:
    def __init__(self, ups):
        self.ups = ups

    def upstreams(self):
        return self.ups


def _stats(n: int) -> dict:
    return {"model_stats": [{"name": "demo", "version": "1", "last_inference": n, "inference_count": n,
                             "inference_stats": {"success": {"count": n, "ns": n}}}]}


def test_statistics_sum_the_routable_replicas_that_answer():
    path = "/v2/models/demo/stats"
    a, b = FakeClient({path: (200, _stats(2))}), FakeClient({path: (200, _stats(5))})
    silent, sick = FakeClient({}), FakeClient({path: (200, _stats(100))})
    other = FakeClient({path: (200, _stats(1000))})
    catalog = ModelCatalog(FakePools([FakeUpstream("http://a", a), FakeUpstream("http://b", b),
                                      FakeUpstream("http://c", silent), FakeUpstream("http://d", sick, routable=False),
                                      FakeUpstream("http://e", other, models=("else",))]))
    got = asyncio.run(catalog.pool_statistics("demo", None))
    assert (got.status, got.replicas, got.asked) == (200, 2, 3)
    [row] = got.body["model_stats"]
    assert row["inference_count"] == 7 and row["last_inference"] == 5
    assert sick.asked == [] and other.asked == []  # not routable / no such model: not asked


def test_all_models_statistics_ask_every_routable_replica():
    a = FakeClient({"/v2/models/stats": (200, _stats(1))})
    b = FakeClient({"/v2/models/stats": (200, _stats(3))})
    catalog = ModelCatalog(FakePools([FakeUpstream("http://a", a), FakeUpstream("http://b", b, models=())]))
    got = asyncio.run(catalog.pool_statistics(None, None))
    assert got.replicas == 2 and got.body["model_stats"][0]["inference_count"] == 4


def test_statistics_refused_by_every_replica_pass_the_refusal_on():
    path = "/v2/models/demo/versions/9/stats"
    a = FakeClient({path: (404, {"error": "Request for unknown model: 'demo' version 9 is not found"})})
    got = asyncio.run(ModelCatalog(FakePools([FakeUpstream("http://a", a)])).pool_statistics("demo", "9"))
    assert got.status == 404 and "unknown model" in got.body["error"] and got.replicas == 0


def test_server_metadata_from_a_triton_pool_is_cached():
    meta = {"name": "triton", "version": "2.51.0", "extensions": ["sequence", "model_repository", "statistics"]}
    a = FakeClient({"/v2": (200, meta)})
    catalog = ModelCatalog(FakePools([FakeUpstream("http://a", a)]))

    async def twice():
        return await catalog.server_metadata(), await catalog.server_metadata()

    first, second = asyncio.run(twice())
    assert first == second == {"name": "triton", "version": "2.51.0", "extensions": ["sequence", "statistics"]}
    assert a.asked == ["/v2"]


def test_server_metadata_none_for_geogate_replicas_and_not_cached_without_answers():
    silent = FakeClient({})
    catalog = ModelCatalog(FakePools([FakeUpstream("http://a", silent)]))
    assert asyncio.run(catalog.server_metadata()) is None
    assert asyncio.run(catalog.server_metadata()) is None
    assert silent.asked == ["/v2", "/v2"]
    own = FakeClient({"/v2": (200, {"name": "geogate-replica", "version": "1", "extensions": []})})
    assert asyncio.run(ModelCatalog(FakePools([FakeUpstream("http://a", own)])).server_metadata()) is None
