"""gateway.upstream.pool_merge: the pool's statistics and server metadata from its replicas'."""

from __future__ import annotations

from gateway.upstream.pool_merge import merge_server_metadata, merge_statistics


def _d(count: int, ns: int) -> dict:
    return {"count": count, "ns": ns}


def _triton_stat(name: str, version: str, n: int, last: int, batches: dict[int, int]) -> dict:
    """A Triton HTTP statistics row with `n` successful single inferences."""
    return {
        "name": name, "version": version, "last_inference": last, "inference_count": n, "execution_count": n,
        "inference_stats": {"success": _d(n, 100 * n), "fail": _d(1, 7), "queue": _d(n, 10 * n),
                            "compute_input": _d(n, 2 * n), "compute_infer": _d(n, 50 * n),
                            "compute_output": _d(n, 3 * n), "cache_hit": _d(0, 0), "cache_miss": _d(0, 0)},
        "response_stats": {}, "memory_usage": [{"type": "CPU", "id": 0, "byte_size": 64}],
        "batch_stats": [{"batch_size": size, "compute_input": _d(c, c), "compute_infer": _d(c, 10 * c),
                         "compute_output": _d(c, 2 * c)} for size, c in batches.items()],
    }


def test_counts_and_durations_are_summed_last_inference_is_the_latest():
    a = {"model_stats": [_triton_stat("demo", "1", 3, 1000, {1: 3})]}
    b = {"model_stats": [_triton_stat("demo", "1", 5, 2500, {1: 4, 4: 1})]}
    merged = merge_statistics([a, b])
    [row] = merged["model_stats"]
    assert (row["name"], row["version"]) == ("demo", "1")
    assert row["last_inference"] == 2500
    assert row["inference_count"] == 8 and row["execution_count"] == 8
    stats = row["inference_stats"]
    assert stats["success"] == _d(8, 800) and stats["fail"] == _d(2, 14) and stats["queue"] == _d(8, 80)
    assert stats["compute_input"] == _d(8, 16) and stats["compute_infer"] == _d(8, 400)
    assert stats["compute_output"] == _d(8, 24) and stats["cache_hit"] == _d(0, 0)
    assert row["batch_stats"] == [
        {"batch_size": 1, "compute_input": _d(7, 7), "compute_infer": _d(7, 70), "compute_output": _d(7, 14)},
        {"batch_size": 4, "compute_input": _d(1, 1), "compute_infer": _d(1, 10), "compute_output": _d(1, 2)},
    ]
    assert row["memory_usage"] == [{"type": "CPU", "id": 0, "byte_size": 64}]  # the first replica's


def test_grpc_answers_with_string_counts_and_missing_zero_fields_merge_with_http_ones():
    http = {"model_stats": [_triton_stat("demo", "1", 2, 10, {1: 2})]}
    # json_format.MessageToDict: 64-bit counts are strings, zero fields left out
    grpc = {"model_stats": [{"name": "demo", "version": "1", "last_inference": "20", "inference_count": "3",
                             "execution_count": "3", "inference_stats": {"success": {"count": "3", "ns": "300"}},
                             "batch_stats": [{"batch_size": "1", "compute_infer": {"count": "3", "ns": "30"}}]}]}
    [row] = merge_statistics([grpc, http])["model_stats"]
    assert row["last_inference"] == 20 and row["inference_count"] == 5
    assert row["inference_stats"]["success"] == _d(5, 500)
    assert row["inference_stats"]["fail"] == _d(1, 7)  # only the HTTP replica had failures
    assert row["batch_stats"][0]["batch_size"] == 1
    assert row["batch_stats"][0]["compute_infer"] == _d(5, 50)


def test_models_and_versions_stay_apart_in_first_seen_order():
    a = {"model_stats": [_triton_stat("m", "2", 1, 1, {}), _triton_stat("m", "1", 1, 1, {})]}
    b = {"model_stats": [_triton_stat("other", "1", 4, 9, {}), _triton_stat("m", "2", 2, 5, {})]}
    rows = merge_statistics([a, b])["model_stats"]
    assert [(r["name"], r["version"], r["inference_count"]) for r in rows] == [
        ("m", "2", 3), ("m", "1", 1), ("other", "1", 4)]


def test_no_answers_no_rows_and_junk_is_ignored():
    assert merge_statistics([]) == {"model_stats": []}
    assert merge_statistics([{"model_stats": ["junk", None]}, {}]) == {"model_stats": []}


def test_merging_does_not_change_the_replicas_answers():
    a = {"model_stats": [_triton_stat("demo", "1", 3, 1, {1: 3})]}
    before = repr(a)
    merge_statistics([a, a])
    assert repr(a) == before


TRITON_EXTENSIONS = ["classification", "sequence", "model_repository", "model_repository(unload_dependents)",
                     "schedule_policy", "model_configuration", "system_shared_memory", "cuda_shared_memory",
                     "binary_tensor_data", "parameters", "statistics", "trace", "logging"]


def test_triton_pool_answers_tritons_name_version_and_the_extensions_the_gateway_honours():
    answers = [("http://b:8000", {"name": "triton", "version": "2.51.0", "extensions": TRITON_EXTENSIONS}),
               ("http://a:8000", {"name": "triton", "version": "2.51.0", "extensions": TRITON_EXTENSIONS})]
    assert merge_server_metadata(answers) == {
        "name": "triton", "version": "2.51.0",
        "extensions": ["classification", "sequence", "schedule_policy", "model_configuration", "binary_tensor_data",
                       "parameters", "statistics"]}


def test_mixed_pool_first_foreign_replica_by_url_and_the_common_extensions():
    answers = [("grpc://z:1", {"name": "triton", "version": "2.50.0", "extensions": ["sequence", "statistics"]}),
               ("http://a:1", {"name": "geogate-replica", "version": "0.1.0",
                               "extensions": ["binary_tensor_data", "model_repository", "statistics"]}),
               ("http://m:1", {"name": "triton", "version": "2.51.0",
                               "extensions": ["binary_tensor_data", "sequence", "statistics"]})]
    assert merge_server_metadata(answers) == {"name": "triton", "version": "2.50.0", "extensions": ["statistics"]}


def test_geogate_replicas_only_or_nobody_means_the_gateway_answers_for_itself():
    assert merge_server_metadata([]) is None
    assert merge_server_metadata([("http://a:1", {"name": "geogate-replica", "version": "1",
                                                  "extensions": ["statistics"]})]) is None
