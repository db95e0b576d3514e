"""The TOML config loader: DESIGN.md's example stays valid; every error names the key."""

import re
from pathlib import Path

import pytest

from core.config import ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parents[3] / "deploy" / "examples" / "geogate.toml"


def test_design_example_is_valid():
    cfg = load_config(EXAMPLE)
    assert cfg.deployment.name == "demo"
    assert [r.name for r in cfg.regions] == ["eu-west", "us-east"]
    eu = cfg.region("eu-west")
    assert eu.location == [53.35, -6.26]
    assert eu.pools[0].replicas == ["grpc://127.0.0.1:18101", "http://127.0.0.1:18110"]
    assert cfg.routing.mode == "local-first" and cfg.routing.cutover == "global"
    assert cfg.health.rise == 2 and cfg.dns.ttl == 20
    # defaults for sections the example leaves out
    assert cfg.gateway.default_timeout_ms > 0


BASE = """
[[regions]]
name = "a"
location = [1.0, 2.0]
  [[regions.pools]]
  name = "p"
  replicas = ["grpc://127.0.0.1:9000"]
"""


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("[routing]\nmode = 'closest'\n", "routing.mode: must be one of"),
        ("[health]\nrise = 0\n", "health.rise: must be > 0, got 0"),
        ("[health]\ninterval_ms = 'fast'\n", "health.interval_ms: must be an integer, got 'fast'"),
        ("[health]\nbogus = 1\n", "health.bogus: unknown key"),
        ("[dns]\nlisten = 'nowhere'\n", "dns.listen: must be HOST:PORT"),
        ("[store]\nurl = 'ftp://x'\n", "store.url: must start with file:// or s3://"),
        ("surprise = true\n", "surprise: unknown key"),
    ],
)
def test_errors_name_the_key(snippet, expected):
    with pytest.raises(ConfigError) as err:
        parse_config(snippet + BASE)
    assert expected in str(err.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BASE.replace('"grpc://127.0.0.1:9000"', '"tcp://x:1"'), "regions[0].pools[0].replicas[0]"),
        (BASE.replace("[1.0, 2.0]", "[100.0, 2.0]"), "regions[0].location: latitude/longitude out of range"),
        (BASE.replace('name = "p"', 'name = "p"\n  kind = "tritno"'), "regions[0].pools[0].kind"),
        (BASE + BASE.replace("[[regions.pools]]", "").replace('name = "p"\n', "").replace(
            'replicas = ["grpc://127.0.0.1:9000"]', ""), "regions[1].name: duplicate region 'a'"),
        (BASE.replace('replicas = ["grpc://127.0.0.1:9000"]', 'discover = "dns+srv://_x._tcp.example."\n'
                      '  replicas = ["grpc://127.0.0.1:9000"]'), "exactly one of 'replicas'"),
        ("[[regions]]\nlocation = [1.0, 2.0]\n", "regions[0].name: required key is missing"),
        ("x = [", "not valid TOML"),
    ],
)
def test_structural_errors(text, expected):
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert expected in str(err.value)


def test_region_lookup_names_known_regions():
    cfg = parse_config(BASE)
    with pytest.raises(ConfigError, match=r"no region named 'zz' \(known: a\)"):
        cfg.region("zz")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.toml")


COMMENTED_SETTING = re.compile(r"^(\s*)# (\[[a-z.\[\]]+\]|[a-z_]+ = .*)$")


def test_design_example_commented_sections_are_valid_too():
    """The example's optional sections (security included) are commented out; uncommented, they
    still make a valid config with the values they show."""
    text = EXAMPLE.read_text()
    uncommented = "\n".join(COMMENTED_SETTING.sub(r"\1\2", line) for line in text.splitlines())
    assert uncommented != text
    cfg = parse_config(uncommented)
    assert cfg.auth.keys_file == "/etc/geogate/keys.json" and cfg.admin.operators_file
    assert cfg.tls.enabled and cfg.tls.client_ca_file
    assert cfg.tls.upstream.enabled and cfg.tls.upstream.cert_file and cfg.tls.upstream.key_file
    assert cfg.tls.peers.enabled
    assert cfg.limits.request_head_timeout_ms == 10000
    assert cfg.signing.public_key_file == "/etc/geogate/models.pub"
    assert cfg.region("eu-west").pools[0].control_token_file == "/etc/geogate/replica-control.token"
    # commented out as shipped: the example runs plaintext and open
    plain = load_config(EXAMPLE)
    assert not plain.tls.enabled and not plain.auth.keys_file and not plain.tls.upstream.enabled
