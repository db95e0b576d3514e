"""Three regions on one machine for the cross-region tests: per region two ONNX Runtime replica
processes and a gateway, all reading one TOML config (as in production), on free ports."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.gateway_procs import FAST_HEALTH, GatewayListeners, get_json
from tests.procs import GEOGATE, Proc, ReplicaProc, free_port, http_ok

# Real locations: Dublin, Washington, Mumbai.
REGIONS = {"eu-west": (53.35, -6.26), "us-east": (38.9, -77.0), "ap-south": (19.08, 72.88)}


class RegionProcs(GatewayListeners):
    def __init__(self, name: str) -> None:
        self.name = name
        self.http_port, self.grpc_port, self.admin_port = free_port(), free_port(), free_port()
        self.replica_ports = [(free_port(), free_port(), free_port()) for _ in range(2)]
        self.replicas: list[ReplicaProc | None] = [None, None]
        self.gateway: Proc | None = None

    def summary(self) -> dict:
        return get_json(f"http://{self.admin}/geogate/v1/region")


class World:
    """`routing`: extra keys for [routing]; `cidrs`: region -> client_cidrs."""

    def __init__(self, tmp_path: Path, repo: str, procs: list, *, routing: str = "",
                 cidrs: dict[str, list[str]] | None = None, hold_ms: int = 1500, store_url: str = "") -> None:
        """`store_url`: sites synced from that store (a sync agent per region filling the
        region's own repository, which its replicas serve) instead of the shared `repo`."""
        self.repo = repo
        self.procs = procs
        self.tmp_path = tmp_path
        self.store_url = store_url
        self.regions = {name: RegionProcs(name) for name in REGIONS}
        parts = [f'[deployment]\nname = "multi-region-test"\n{FAST_HEALTH}',
                 f"[routing]\nfailback_hold_ms = {hold_ms}\n{routing}",
                 "[dns]\ncheck_interval_ms = 200\ncheck_timeout_ms = 300\nfall = 2\nrise = 2\n"]
        if store_url:
            parts.append(f'[store]\nurl = "{store_url}"\n[sync]\npoll_interval_ms = 300\nload_timeout_ms = 60000\n')
        for name, (lat, lon) in REGIONS.items():
            r = self.regions[name]
            urls = [f"http://127.0.0.1:{h}" for h, _, _ in r.replica_ports]
            repository = f'repository = "{self.site_repo(name)}"' if store_url else ""
            parts.append(f"""
[[regions]]
name = "{name}"
location = [{lat}, {lon}]
http = "{r.http}"
grpc = "{r.grpc}"
admin = "{r.admin}"
client_cidrs = {json.dumps((cidrs or {}).get(name, []))}

  [[regions.pools]]
  name = "{name}-ort"
  kind = "geogate"
  replicas = {json.dumps(urls)}
  {repository}
""")
        self.config = tmp_path / "world.toml"
        self.config.write_text("\n".join(parts))

    def site_repo(self, region: str) -> Path:
        return self.tmp_path / "sites" / region / "models"

    def start(self) -> World:
        for r in self.regions.values():
            if self.store_url:
                self.site_repo(r.name).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                self.start_replica(r.name, i, wait=False)
        for r in self.regions.values():
            for rep in r.replicas:
                rep.wait_ready()
        if self.store_url:
            for r in self.regions.values():
                self.procs.append(Proc([*GEOGATE, "sync", "--config", str(self.config), "--site", r.name],
                                       name=f"sync-{r.name}"))
        for r in self.regions.values():
            self.start_gateway(r.name)
        for r in self.regions.values():
            r.gateway.wait_until(lambda r=r: http_ok(f"http://{r.http}/v2/health/ready"), 60, "gateway ready")
        # Every gateway sees every peer healthy before a test begins.
        self.wait(lambda: all(all(p["healthy"] for p in r.summary()["peers"]) for r in self.regions.values()),
                  30, "peers healthy")
        return self

    def start_replica(self, region: str, i: int, *, wait: bool = True) -> ReplicaProc:
        r = self.regions[region]
        h, g, m = r.replica_ports[i]
        repo = str(self.site_repo(region)) if self.store_url else self.repo
        rep = ReplicaProc(repo, http_port=h, grpc_port=g, metrics_port=m)
        self.procs.append(rep)
        r.replicas[i] = rep
        if wait:
            rep.wait_ready()
        return rep

    def start_gateway(self, region: str) -> Proc:
        r = self.regions[region]
        gw = Proc([*GEOGATE, "gateway", "--config", str(self.config), "--region", region], name=f"gw-{region}")
        self.procs.append(gw)
        r.gateway = gw
        return gw

    def kill_replicas(self, region: str) -> None:
        for rep in self.regions[region].replicas:
            rep.kill()

    def healthy_replicas(self, region: str) -> int:
        return self.regions[region].summary()["replicas"]["healthy"]

    @staticmethod
    def wait(pred, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if pred():
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
