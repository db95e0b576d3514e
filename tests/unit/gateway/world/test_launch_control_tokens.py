"""`geogate up --config`: a pool's control_token_file reaches the replicas it starts (resolved
against the config's directory), and a pool without one starts replicas without the flag."""

from __future__ import annotations

from pathlib import Path

from core.config import parse_config
from gateway.world.autoscaler import autoscaled_pools
from gateway.world.launch import children, launch_from_config

CONFIG = """
[store]
url = "file:///tmp/store"
[[regions]]
name = "eu-west"
location = [53.35, -6.26]
http = "127.0.0.1:18000"
grpc = "127.0.0.1:18001"
admin = "127.0.0.1:18002"
  [[regions.pools]]
  name = "locked"
  replicas = ["http://127.0.0.1:18110"]
  repository = "locked-models"
  control_token_file = "secrets/replica.token"
  [[regions.pools]]
  name = "open"
  replicas = ["grpc://127.0.0.1:18111"]
  repository = "open-models"
"""


def _replica_argv(tmp_path: Path) -> dict[str, list[str]]:
    cfg = parse_config(CONFIG, base_dir=str(tmp_path))
    launch = launch_from_config(cfg, tmp_path / "geogate.toml", tmp_path / "state")
    out = {}
    for child in children(launch):
        if "replica" in child.argv:
            repo = child.argv[child.argv.index("--repository") + 1]
            out[Path(repo).name] = child.argv
    return out


def test_pool_control_token_file_is_passed_to_its_replicas(tmp_path):
    argv = _replica_argv(tmp_path)
    locked, unlocked = argv["locked-models"], argv["open-models"]
    assert locked[locked.index("--control-token-file") + 1] == str(tmp_path / "secrets" / "replica.token")
    assert "--control-token-file" not in unlocked


def test_autoscaled_pool_keeps_its_control_token_file(tmp_path):
    cfg = parse_config(CONFIG.replace('replicas = ["http://127.0.0.1:18110"]',
                                      'discover = "dns+srv://_http._tcp.locked.geogate."\n'
                                      '  discover_resolver = "127.0.0.1:5399"')
                       + '[capacity]\nautoscale_dns = "127.0.0.1:5399"\n', base_dir=str(tmp_path))
    (pool,) = autoscaled_pools(cfg)
    assert pool.control_token_file == str(tmp_path / "secrets" / "replica.token")
