"""gateway.admin.guard in-process: admin session cookies are signed, bounded in time, and end with
the credential that made them. The admin listener over real processes is in
tests/e2e/test_hardening_admin.py."""

from __future__ import annotations

from gateway.front.admin_auth import AdminCheck, AdminCredentials
from gateway.front.api_keys import hash_field, new_key
from gateway.front.auth import Authenticator


def test_admin_sessions_are_signed_bounded_and_end_with_their_credential():
    now = [1000.0]
    key, kid, salt, digest = new_key()
    ops = Authenticator(table={"keys": [{"name": "ann", "id": kid, "hash": hash_field(salt, digest)}]})
    creds = AdminCredentials("tok", ops, session_ttl_s=60, clock=lambda: now[0])
    shared = creds.session_cookie(creds.check_token("tok"))
    assert creds.check_session(shared).ok
    op = creds.check_token(key)
    assert op.ok and op.who == "ann" and op.key_id == kid
    op_cookie = creds.session_cookie(op)
    assert creds.check_session(op_cookie) == AdminCheck(True, who="ann", key_id=kid)
    # the same cookie is valid on another worker or gateway with the same credentials
    assert AdminCredentials("tok", ops, clock=lambda: now[0]).check_session(shared).ok
    flipped = shared[:-1] + ("0" if shared[-1] != "0" else "1")
    for bad in ("", "v1", "v1.-.x.y", "v2" + shared[2:], shared.replace(".-.", f".{kid}."), flipped,
                "v1.-.١٢٣.ab", "v1.-.99999999999." + "é" * 64):
        assert creds.check_session(bad).status == 401, bad
    assert not AdminCredentials("rotated", ops, clock=lambda: now[0]).check_session(shared).ok
    now[0] += 61
    assert "expired" in creds.check_session(shared).message
    assert not AdminCredentials("tok", Authenticator(table={"keys": []}), clock=lambda: now[0] - 61) \
        .check_session(op_cookie).ok  # the operator key revoked
    for token in ("t\u00f6k", "tok\udcff", "x" * 300, "tok\n"):
        assert creds.check_token(token).status == 401
    assert creds.check_token("nope").status == 403
    assert AdminCredentials().check_token("any").status == 403 and not AdminCredentials().configured
