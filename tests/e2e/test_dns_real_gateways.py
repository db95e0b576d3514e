"""GeoDNS in front of real `geogate gateway` processes (each with a real ONNX Runtime replica):
when a region loses its last replica its gateway's readiness goes 503 and `geogate dns` stops
answering with that region; when the replica is back, so is the region (after the rise period).
The stand-in gateways in the other DNS tests serve exactly the endpoints exercised here."""

from __future__ import annotations

import time

from loadtests.geo_standin import NEW_YORK_NET, PARIS_NET, dig, start_dns, wait_dns
from replicas.demo.onnx_model import write_repository_entry
from tests.procs import GEOGATE, Proc, ReplicaProc, free_port, http_ok

SERVICE = "infer.geogate.test"
EU, US = "192.0.2.10", "192.0.2.20"
WAIT_S = 60.0


def _config(path, dns_port, ports, replicas, mmdb) -> None:
    regions = [("eu-west", (53.35, -6.26), EU), ("us-east", (38.9, -77.0), US)]
    lines = ["[deployment]", 'name = "dns-e2e"', "", "[routing]", 'mode = "local-first"',
             f'geoip_database = "{mmdb}"', "",
             "[health]", "interval_ms = 300", "timeout_ms = 1000", "rise = 1", "fall = 1", "",
             "[dns]", f'listen = "127.0.0.1:{dns_port}"', 'zone = "geogate.test."',
             'service = "infer.geogate.test."', "check_timeout_ms = 2000", ""]
    for (name, loc, addr), (http, grpc, admin), replica in zip(regions, ports, replicas, strict=True):
        lines += ["[[regions]]", f'name = "{name}"', f"location = [{loc[0]}, {loc[1]}]",
                  f'http = "127.0.0.1:{http}"', f'grpc = "127.0.0.1:{grpc}"', f'admin = "127.0.0.1:{admin}"',
                  f'addresses = ["{addr}"]', "", "  [[regions.pools]]", f'  name = "{name}-ort"',
                  '  kind = "geogate"', f'  replicas = ["http://{replica.http_url}"]', ""]
    path.write_text("\n".join(lines))


def _until(cond, what: str, procs: list[Proc], timeout_s: float = WAIT_S) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if cond():
            return time.monotonic() - start
        time.sleep(0.05)
    logs = "\n".join(f"--- {p.name}:\n{p.output()[-2000:]}" for p in procs)
    raise AssertionError(f"not {what} after {timeout_s}s\n{logs}")


def test_dns_follows_real_gateway_readiness(tmp_path, procs):
    from geo.mmdb_build import DEMO_NETWORKS, build_city_db

    mmdb = str(tmp_path / "city.mmdb")
    build_city_db(mmdb, DEMO_NETWORKS)
    repo = tmp_path / "repo"
    write_repository_entry(repo, 1)
    replicas = [ReplicaProc(str(repo)), ReplicaProc(str(repo))]
    procs.extend(replicas)
    for r in replicas:
        r.wait_ready()
    ports = [(free_port(), free_port(), free_port()) for _ in replicas]
    dns_port = free_port()
    config = tmp_path / "world.toml"
    _config(config, dns_port, ports, replicas, mmdb)
    gateways = [Proc([*GEOGATE, "gateway", "--config", str(config), "--region", name], name=f"gw-{name}")
                for name in ("eu-west", "us-east")]
    procs.extend(gateways)
    for gw, (http, _, _) in zip(gateways, ports, strict=True):
        gw.wait_until(lambda h=http: http_ok(f"http://127.0.0.1:{h}/v2/health/ready"), WAIT_S)
    dns = start_dns(str(config))
    procs.append(dns)
    wait_dns(dns, dns_port)
    everything = [*replicas, *gateways, dns]

    def answer(subnet: str) -> list[str]:
        return dig(dns_port, SERVICE, "A", f"+subnet={subnet}").addresses

    _until(lambda: answer(NEW_YORK_NET) == [US] and answer(PARIS_NET) == [EU], "nearest regions answered",
           everything)
    # us-east's only replica dies: its gateway is no longer ready, DNS sends New York to eu-west.
    replicas[1].kill()
    took = _until(lambda: answer(NEW_YORK_NET) == [EU], "us-east withdrawn", everything)
    print(f"us-east withdrawn {took:.2f}s after its last replica died (gateway health + DNS checks)")
    assert not http_ok(f"http://127.0.0.1:{ports[1][0]}/v2/health/ready")
    assert answer(PARIS_NET) == [EU]
    # The replica comes back on the same ports: gateway ready again, then DNS after its rise period.
    back = ReplicaProc(str(repo), http_port=replicas[1].http_port, grpc_port=replicas[1].grpc_port)
    procs.append(back)
    back.wait_ready()
    _until(lambda: answer(NEW_YORK_NET) == [US], "us-east answered again", [*everything, back])
