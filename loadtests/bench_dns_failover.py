"""How fast does `geogate dns` stop answering with a region that fails?

Starts three stand-in region gateways (loadtests/geo_standin.py: real HTTP processes serving
`/v2/health/ready` and `/geogate/v1/region`) and `geogate dns` with the default check settings
(interval 500 ms, timeout 400 ms, fall 2, rise 3), then for each trial:

- killed:     SIGKILL us-east's gateway (connection refused from then on);
- blackholed: SIGSTOP it (TCP connects still complete in the kernel, nothing ever answers);

and measures, polling the responder every 10 ms with an EDNS Client Subnet from New York (whose
nearest region is us-east), the time from the outage until the answer no longer names us-east.
Each outage starts at a random phase of the probe cadence.  After each, the gateway is restored
and the time until it is answered again is recorded too (that includes the rise period: 3
probes).  Finally a single lost probe (the stand-in swallows exactly one readiness probe) is
injected several times while polling: the answer must never change.

Goal: withdrawal <= 2 s in every trial.  Exits 1 if the goal or the lost-probe check fails.

    .venv/bin/python -m loadtests.bench_dns_failover --trials 10
"""

from __future__ import annotations

import argparse
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dns.edns
import dns.message
import dns.query
import dns.rdatatype

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # loadtests.* when run as a file

from geo.mmdb_build import DEMO_NETWORKS, build_city_db
from loadtests.geo_standin import NEW_YORK_NET, REGIONS, StandinGateway, start_dns, wait_dns, write_config
from loadtests.procs import free_port

GOAL_S = 2.0
POLL_S = 0.01
QUERY_TIMEOUT_S = 1.0
MAX_WAIT_S = 30.0
SERVICE = "infer.geogate.test."
US_EAST = "192.0.2.20"


def answer(port: int, subnet: str = NEW_YORK_NET) -> set[str]:
    net, srclen = subnet.split("/")
    q = dns.message.make_query(SERVICE, dns.rdatatype.A, use_edns=0,
                               options=[dns.edns.ECSOption(net, int(srclen))])
    r = dns.query.udp(q, "127.0.0.1", port=port, timeout=QUERY_TIMEOUT_S)
    return {rd.address for rrset in r.answer for rd in rrset}


def wait_for(cond, what: str, timeout_s: float = MAX_WAIT_S) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if cond():
                return time.monotonic() - start
        except dns.exception.Timeout:
            pass
        time.sleep(POLL_S)
    raise TimeoutError(f"not {what} after {timeout_s}s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=5, help="trials per outage kind")
    p.add_argument("--lost-probes", type=int, default=5, help="single lost probes to inject")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)

    tmp = tempfile.mkdtemp(prefix="geogate-bench-dns-")
    mmdb = f"{tmp}/city.mmdb"
    build_city_db(mmdb, DEMO_NETWORKS)
    gateways = [StandinGateway(name, loc, tmp) for name, loc, _ in REGIONS]
    dns_proc = None
    rows: list[tuple[int, str, float, float]] = []
    flips = 0
    try:
        for gw in gateways:
            gw.wait_ready()
        us = next(gw for gw in gateways if gw.region == "us-east")
        port = free_port()
        dns_proc = start_dns(write_config(f"{tmp}/geo.toml", gateways, dns_port=port, mmdb=mmdb))
        wait_dns(dns_proc, port)
        wait_for(lambda: answer(port) == {US_EAST}, "us-east answered")

        for trial in range(1, args.trials + 1):
            for kind in ("killed", "blackholed"):
                wait_for(lambda: answer(port) == {US_EAST}, "us-east answered before the trial")
                time.sleep(rng.uniform(0.0, 0.5))  # a random phase of the 500 ms probe cadence
                t0 = time.monotonic()
                if kind == "killed":
                    us.proc.kill()  # SIGKILL (and reaped)
                else:
                    us.proc.signal(signal.SIGSTOP)
                wait_for(lambda: US_EAST not in answer(port), f"us-east withdrawn ({kind})")
                withdraw_s = time.monotonic() - t0
                if kind == "killed":
                    us.start().wait_ready()
                else:
                    us.proc.signal(signal.SIGCONT)
                t1 = time.monotonic()
                wait_for(lambda: answer(port) == {US_EAST}, f"us-east back ({kind})")
                rows.append((trial, kind, withdraw_s, time.monotonic() - t1))
                print(f"trial {trial:>2} {kind:<10} withdrawn after {withdraw_s:.3f}s", file=sys.stderr, flush=True)

        # A single lost probe must never change the answer.
        for _ in range(args.lost_probes):
            wait_for(lambda: answer(port) == {US_EAST}, "us-east answered")
            us.set_state("drop-next")
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                if answer(port) != {US_EAST}:
                    flips += 1
                    break
                time.sleep(POLL_S)
            if Path(us.state_file).read_text() != "ok":
                raise RuntimeError("the stand-in never received the probe it was to drop")
    finally:
        if dns_proc is not None:
            dns_proc.stop()
        for gw in gateways:
            gw.stop()

    print()
    print("geogate dns failover (defaults: check_interval_ms=500 check_timeout_ms=400 fall=2 rise=3)")
    print(f"{'trial':>5}  {'outage':<10}  {'withdrawn after (s)':>19}  {'answered again after restore (s)':>32}")
    for trial, kind, withdraw_s, back_s in rows:
        print(f"{trial:>5}  {kind:<10}  {withdraw_s:>19.3f}  {back_s:>32.3f}")
    ok = True
    for kind in ("killed", "blackholed"):
        values = [w for _, k, w, _ in rows if k == kind]
        worst = max(values)
        verdict = "ok" if worst <= GOAL_S else f"MISSED the {GOAL_S:.0f} s goal"
        ok &= worst <= GOAL_S
        print(f"{kind:<10}: n={len(values)} median {statistics.median(values):.3f}s  max {worst:.3f}s  "
              f"(goal <= {GOAL_S:.1f}s: {verdict})")
    print(f"single lost probe: {args.lost_probes} injected, answer changed {flips} times "
          f"({'ok' if flips == 0 else 'FAILED'})")
    return 0 if ok and flips == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
