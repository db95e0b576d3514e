"""gateway.front.auth: hashed API keys, model globs, per-key limits, reload without restart, the CLI."""

import json
import os
import time

import grpc
import pytest

from gateway.front.api_keys import KeysFileError, hash_secret, new_key, parse_key_table, split_key, token_from_headers
from gateway.front.auth import AuthDecision, Authenticator
from tests.auth_keys import make_key, toml_file


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t








def test_key_shape_and_hash_at_rest():
    key, kid, salt, digest = new_key()
    assert key.startswith("gk_") and split_key(key) == (kid, key[len("gk_") + 13:])
    assert len(kid) == 12 and len(salt) == 16
    assert hash_secret(salt, split_key(key)[1]) == digest
    _, _, salt2, _ = new_key()
    assert salt != salt2  # per-key salt
    assert split_key("gk_short_x") is None and split_key("Bearer abc") is None


def test_valid_key_allowed_with_its_name_and_priority():
    key, e = make_key("team-a", models=["demo*"], priority="critical")
    auth = Authenticator(table={"keys": [e]})
    d = auth.authorize(key, "demo-heavy")
    assert d.allowed and d.key_name == "team-a" and d.priority == "critical"
    assert d.http_status == 200 and d.grpc_code == grpc.StatusCode.OK
    d.release()
    assert auth.authorize(key, None).allowed  # server-level endpoint: only the key is checked


@pytest.mark.parametrize(("token", "words"), [
    (None, "missing API key"),
    ("", "missing API key"),
    ("not-a-key", "malformed API key"),
    ("gk_0123456789ab", "malformed"),
    ("gk_ffffffffffff_secret", "unknown API key id 'ffffffffffff'"),
    ("x" * 5000, "characters long"),
])
def test_unauthenticated_reasons(token, words):
    _, e = make_key("team-a")
    d = Authenticator(table={"keys": [e]}).authorize(token, "demo")
    assert not d.allowed and d.http_status == 401 and d.grpc_code == grpc.StatusCode.UNAUTHENTICATED
    assert words in d.message
    assert d.http_headers()["WWW-Authenticate"].startswith("Bearer")


def test_wrong_secret_is_refused_and_never_cached():
    key, e = make_key("team-a")
    auth = Authenticator(table={"keys": [e]})
    kid, secret = split_key(key)
    bad = f"gk_{kid}_{secret[:-1]}{'A' if secret[-1] != 'A' else 'B'}"
    d = auth.authorize(bad, "demo")
    assert d.http_status == 401 and "secret does not match" in d.message and kid in d.message
    assert auth.authorize(bad, "demo").http_status == 401
    assert auth.authorize(key, "demo").allowed


def test_model_not_allowed_is_403_with_reason():
    key, e = make_key("team-a", models=["demo*", "resnet"])
    d = Authenticator(table={"keys": [e]}).authorize(key, "secret")
    assert not d.allowed and d.http_status == 403 and d.grpc_code == grpc.StatusCode.PERMISSION_DENIED
    assert d.message == "key 'team-a' may not call model 'secret' (allowed: demo*, resnet)"


def test_glob_is_case_sensitive_and_anchored():
    key, e = make_key("k", models=["demo"])
    auth = Authenticator(table={"keys": [e]})
    assert auth.authorize(key, "demo").allowed
    for m in ("Demo", "demo2", "xdemo"):
        assert auth.authorize(key, m).http_status == 403


def test_headers_bearer_and_api_key():
    assert token_from_headers({"Authorization": "Bearer gk_abc"}) == "gk_abc"
    assert token_from_headers({"authorization": "bearer   gk_abc "}) == "gk_abc"  # gRPC metadata is lower case
    assert token_from_headers({"x-api-key": "gk_def"}) == "gk_def"
    assert token_from_headers({}) is None
    key, e = make_key("k")
    auth = Authenticator(table={"keys": [e]})
    assert auth.authorize_headers({"authorization": f"Bearer {key}"}, "demo").allowed
    assert auth.authorize_headers({"x-api-key": key}, "demo").allowed


def test_rate_limit_429_with_retry_after():
    clock = FakeClock()
    key, e = make_key("team-a", rate_per_s=50.0, burst=2)
    auth = Authenticator(table={"keys": [e]}, clock=clock)
    assert auth.authorize(key, "demo").allowed and auth.authorize(key, "demo").allowed
    d = auth.authorize(key, "demo")
    assert not d.allowed and d.http_status == 429 and d.grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert d.retry_after_s == pytest.approx(0.02)
    assert d.message == "rate limit of 50/s (burst 2) for key 'team-a' exceeded; retry after 0.02 s"
    assert d.http_headers() == {"Retry-After": "1"}
    assert d.grpc_trailers() == (("retry-after", "1"),)
    clock.t += 0.02
    assert auth.authorize(key, "demo").allowed


def test_concurrency_limit_and_release():
    key, e = make_key("team-b", max_concurrent=2)
    auth = Authenticator(table={"keys": [e]})
    a, b = auth.authorize(key, "demo"), auth.authorize(key, "demo")
    assert a.allowed and b.allowed
    c = auth.authorize(key, "demo")
    assert c.http_status == 429 and "concurrency limit of 2" in c.message and "team-b" in c.message
    a.release()
    a.release()  # twice is harmless: frees one slot only
    d = auth.authorize(key, "demo")
    assert d.allowed
    assert auth.authorize(key, "demo").http_status == 429


def test_rate_refusal_does_not_leak_a_concurrency_slot():
    clock = FakeClock()
    key, e = make_key("k", rate_per_s=1.0, burst=1, max_concurrent=1)
    auth = Authenticator(table={"keys": [e]}, clock=clock)
    d = auth.authorize(key, "demo")
    d.release()
    assert "rate limit" in auth.authorize(key, "demo").message  # slot was given back on refusal
    clock.t += 1.0
    assert auth.authorize(key, "demo").allowed


def test_keys_are_independent():
    clock = FakeClock()
    ka, ea = make_key("a", rate_per_s=1.0, burst=1)
    kb, eb = make_key("b", rate_per_s=1.0, burst=1)
    auth = Authenticator(table={"keys": [ea, eb]}, clock=clock)
    assert auth.authorize(ka, "m").allowed
    assert not auth.authorize(ka, "m").allowed
    assert auth.authorize(kb, "m").allowed


def test_anonymous_only_when_configured_with_its_own_limits():
    clock = FakeClock()
    key, e = make_key("k")
    off = Authenticator(table={"keys": [e], "anonymous": {"enabled": False, "models": ["*"]}})
    assert off.authorize(None, "demo").http_status == 401
    on = Authenticator(table={"keys": [e], "anonymous": {"enabled": True, "models": ["demo"], "rate_per_s": 1.0,
                                                         "burst": 1, "priority": "sheddable"}}, clock=clock)
    d = on.authorize(None, "demo")
    assert d.allowed and d.key_name == "anonymous" and d.priority == "sheddable"
    assert on.authorize(None, "demo").http_status == 429
    assert on.authorize(None, "other").message.startswith("key 'anonymous' may not call model 'other'")
    assert on.authorize(key, "demo").allowed  # keyed clients are not held by anonymous limits


@pytest.mark.parametrize(("doc", "words"), [
    ([], "must be a table"),
    ({"keyz": []}, "keyz: unknown key"),
    ({"keys": [{"name": "a", "id": "XYZ", "hash": "x"}]}, "keys[0].id"),
    ({"keys": [{"name": "", "id": "0123456789ab", "hash": "x"}]}, "keys[0].name"),
    ({"keys": [{"name": "a", "id": "0123456789ab", "hash": "md5:00:11"}]}, "keys[0].hash"),
    ({"keys": [{"name": "a", "id": "0123456789ab", "hash": "sha256:zz:11"}]}, "hex"),
    ({"keys": [{"name": "a", "id": "0123456789ab", "hash": "sha256:00:" + "11" * 32, "priority": "vip"}]},
     "keys[0].priority"),
    ({"keys": [{"name": "a", "id": "0123456789ab", "hash": "sha256:00:" + "11" * 32, "rate_per_s": -1}]},
     "keys[0].rate_per_s"),
    ({"keys": [{"name": "a", "id": "0123456789ab", "hash": "sha256:00:" + "11" * 32, "max_concurrent": 1.5}]},
     "keys[0].max_concurrent"),
    ({"keys": [{"name": "a", "id": "0123456789ab", "hash": "sha256:00:" + "11" * 32, "models": "demo"}]},
     "keys[0].models"),
    ({"keys": [{"name": "a", "id": "0123456789ab", "hash": "sha256:00:" + "11" * 32, "colour": 1}]},
     "keys[0].colour: unknown key"),
    ({"keys": [{"name": "a", "id": "0123456789ab", "hash": "sha256:00:" + "11" * 32},
               {"name": "b", "id": "0123456789ab", "hash": "sha256:00:" + "11" * 32}]}, "duplicate key id"),
    ({"anonymous": {"enabled": "yes"}}, "anonymous.enabled"),
])
def test_bad_key_tables_name_the_key(doc, words):
    with pytest.raises(KeysFileError) as exc:
        parse_key_table(doc, "keys.toml")
    assert words in str(exc.value)


def test_keys_file_toml_and_json(tmp_path):
    key, e = make_key("team-a", models=["demo"])
    p = tmp_path / "keys.toml"
    toml_file(p, [e])
    assert Authenticator(str(p)).authorize(key, "demo").allowed
    j = tmp_path / "keys.json"
    j.write_text(json.dumps({"keys": [e]}))
    assert Authenticator(str(j)).authorize(key, "demo").allowed
    bad = tmp_path / "bad.toml"
    bad.write_text("[[keys]\n")
    with pytest.raises(KeysFileError, match="not valid TOML"):
        Authenticator(str(bad))
    with pytest.raises(KeysFileError, match="cannot read keys file"):
        Authenticator(str(tmp_path / "missing.toml"))


def _bump_mtime(p):
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_reload_on_change_adds_and_revokes_keys(tmp_path):
    clock = FakeClock()
    ka, ea = make_key("a")
    kb, eb = make_key("b")
    p = tmp_path / "keys.toml"
    toml_file(p, [ea])
    auth = Authenticator(str(p), reload_interval_s=1.0, clock=clock)
    assert auth.authorize(ka, "m").allowed  # now cached as verified
    assert auth.authorize(kb, "m").http_status == 401
    toml_file(p, [eb])  # revoke a, add b
    _bump_mtime(p)
    assert auth.authorize(ka, "m").allowed  # not checked yet: the file is looked at once a second
    clock.t += 1.0
    d = auth.authorize(ka, "m")
    assert d.http_status == 401 and "unknown API key id" in d.message  # the verified cache was dropped
    assert auth.authorize(kb, "m").allowed
    assert auth.reloads == 1


def test_broken_reload_keeps_previous_keys(tmp_path, caplog):
    clock = FakeClock()
    ka, ea = make_key("a")
    p = tmp_path / "keys.toml"
    toml_file(p, [ea])
    auth = Authenticator(str(p), clock=clock)
    p.write_text("[[keys]]\nname = \n")
    _bump_mtime(p)
    clock.t += 5
    assert auth.authorize(ka, "m").allowed
    assert "not valid TOML" in auth.last_error
    assert "previous keys stay in force" in caplog.text
    toml_file(p, [ea])
    _bump_mtime(p)
    clock.t += 5
    auth.authorize(ka, "m")
    assert auth.last_error == "" and auth.reloads == 1


def test_reload_keeps_limiter_state_of_unchanged_keys(tmp_path):
    clock = FakeClock()
    ka, ea = make_key("a", rate_per_s=1.0, burst=1)
    _kb, eb = make_key("b")
    p = tmp_path / "keys.toml"
    toml_file(p, [ea])
    auth = Authenticator(str(p), clock=clock)
    assert auth.authorize(ka, "m").allowed
    toml_file(p, [ea, eb])
    _bump_mtime(p)
    assert auth.reload_if_changed()
    assert auth.authorize(ka, "m").http_status == 429  # a reload is no way around a rate limit
    ea2 = {**ea, "rate_per_s": 100.0, "burst": 10}
    toml_file(p, [ea2, eb])
    _bump_mtime(p)
    assert auth.reload_if_changed()
    assert auth.authorize(ka, "m").allowed  # new limits: a new bucket


def test_sighup_forces_reload(tmp_path):
    import asyncio
    import signal

    _ka, ea = make_key("a")
    kb, eb = make_key("b")
    p = tmp_path / "keys.toml"
    toml_file(p, [ea])

    async def main():
        auth = Authenticator(str(p), reload_interval_s=3600)
        auth.install_sighup(asyncio.get_running_loop())
        try:
            toml_file(p, [ea, eb])
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(100):
                await asyncio.sleep(0.01)
                if auth.reloads:
                    break
            return auth.authorize(kb, "m")
        finally:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    assert asyncio.run(main()).allowed


def test_verified_tokens_are_cached_not_rehashed(monkeypatch):
    import gateway.front.auth as auth_mod

    key, e = make_key("a")
    auth = Authenticator(table={"keys": [e]})
    calls = []
    real = auth_mod.hash_secret
    monkeypatch.setattr(auth_mod, "hash_secret", lambda s, x: calls.append(1) or real(s, x))
    for _ in range(100):
        assert auth.authorize(key, "m").allowed
    assert len(calls) == 1


def test_decision_defaults():
    d = AuthDecision(True)
    d.release()
    assert d.http_headers() == {} and d.grpc_trailers() == ()




def test_per_request_cost_is_small():
    """Not a speed assertion: prints the cost so regressions show in the log."""
    key, e = make_key("a", rate_per_s=1e9, burst=1e9, max_concurrent=10)
    auth = Authenticator(table={"keys": [e]})
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        auth.authorize(key, "demo").release()
    per_us = (time.perf_counter() - t0) / n * 1e6
    print(f"authorize+release: {per_us:.2f} us per request")
    assert auth.authorize(key, "demo").allowed


# ---------------------------------------------------------------------------- real fronts




# ---------------------------------------------------------------------------- as the gateway uses it


def test_identity_only_check_spends_no_tokens():
    """Metadata requests may be checked for identity and model only (limits=False)."""
    key, e = make_key("a", models=["demo"], rate_per_s=0.001, burst=1, max_concurrent=1)
    auth = Authenticator(table={"keys": [e]})
    for _ in range(5):
        d = auth.authorize(key, "demo", limits=False)
        assert d.allowed and d.key_name == "a"
    assert auth.authorize(key, "other", limits=False).http_status == 403
    assert auth.authorize(None, "demo", limits=False).http_status == 401
    held = auth.authorize(key, "demo")  # the one token and the one slot are still there
    assert held.allowed
    assert auth.authorize(key, "demo").http_status == 429
    held.release()


async def test_watch_reloads_off_the_request_path(tmp_path):
    """The gateway's mode: check_on_request=False, and `watch()` re-reads the file in a thread."""
    import asyncio

    ka, ea = make_key("a")
    kb, eb = make_key("b")
    p = tmp_path / "keys.toml"
    toml_file(p, [ea])
    clock = FakeClock()
    auth = Authenticator(str(p), reload_interval_s=0.05, clock=clock, check_on_request=False)
    toml_file(p, [eb])
    _bump_mtime(p)
    clock.t += 10  # the request path would have reloaded by now; it must not
    assert auth.authorize(ka, "m").allowed and auth.reloads == 0
    task = asyncio.get_running_loop().create_task(auth.watch())
    try:
        for _ in range(200):
            await asyncio.sleep(0.01)
            if auth.reloads:
                break
        assert auth.reloads == 1
        assert auth.authorize(ka, "m").http_status == 401 and auth.authorize(kb, "m").allowed
        p.write_text("{ broken")
        _bump_mtime(p)
        assert not await auth.reload_async()
        assert "not valid TOML" in auth.last_error and auth.authorize(kb, "m").allowed
    finally:
        task.cancel()


