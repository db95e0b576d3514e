"""API keys and keys files for the gateway.front.auth tests (unit and e2e)."""

import json

from gateway.front.api_keys import hash_field, new_key


def entry(name, kid, salt, digest, **kw):
    return {"name": name, "id": kid, "hash": hash_field(salt, digest), **kw}


def make_key(name, **kw):
    key, kid, salt, digest = new_key()
    return key, entry(name, kid, salt, digest, **kw)


def toml_file(path, entries, anonymous=None):
    lines = []
    if anonymous is not None:
        lines.append("[anonymous]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in anonymous.items()]
    for e in entries:
        lines.append("[[keys]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in e.items()]
    path.write_text("\n".join(lines) + "\n")
