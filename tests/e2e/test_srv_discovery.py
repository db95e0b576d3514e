"""SRV discovery against a real DNS server (unbound, tests/dns_fixtures.py)."""

import asyncio
import subprocess

import pytest

from core.srv_discovery import DiscoveryError, SrvDiscovery
from tests.dns_fixtures import UnboundServer, srv_records

SERVICE = "_grpc._tcp.eu.example."
WAIT_S = 15.0


@pytest.fixture
def dns_server(tmp_path):
    server = UnboundServer(tmp_path, zones=["eu.example."])
    server.start(srv_records(SERVICE, [("r1.eu.example.", "127.0.0.1", 18101, 10),
                                       ("r2.eu.example.", "127.0.0.2", 18102, 0)]))
    try:
        yield server
    finally:
        server.stop()


def test_fixture_answers_dig(dns_server):
    out = subprocess.run(["dig", "+short", "-p", str(dns_server.port), "@127.0.0.1", "SRV", SERVICE],
                         capture_output=True, text=True, timeout=10).stdout
    assert sorted(out.split("\n")[:2]) == ["0 0 18102 r2.eu.example.", "0 10 18101 r1.eu.example."]


async def test_resolve(dns_server):
    disc = SrvDiscovery(f"dns+srv://{SERVICE}", "grpc", resolver=dns_server.address, interval_s=0.1)
    assert await disc.resolve() == [("grpc://127.0.0.1:18101", 10), ("grpc://127.0.0.2:18102", 1)]
    # IPv6 targets, http scheme, a target without address records left out, duplicates merged.
    await asyncio.to_thread(dns_server.set_records, [
        *srv_records(SERVICE, [("v6.eu.example.", "::1", 8000, 3), ("v4.eu.example.", "127.0.0.9", 8001, 2)]),
        f"{SERVICE} 1 IN SRV 5 7 8001 v4.eu.example.",
        f"{SERVICE} 1 IN SRV 0 1 9000 nowhere.eu.example.",
    ])
    disc = SrvDiscovery(SERVICE, "http", resolver=dns_server.address)
    assert await disc.resolve() == [("http://127.0.0.9:8001", 7), ("http://[::1]:8000", 3)]


async def test_unknown_name_is_empty(dns_server):
    disc = SrvDiscovery("_http._tcp.eu.example.", "http", resolver=dns_server.address)
    assert await disc.resolve() == []


async def wait_for(queue: asyncio.Queue, expected):
    async with asyncio.timeout(WAIT_S):
        while True:
            got = await queue.get()
            if got == expected:
                return


async def test_watch_follows_changes_and_keeps_last_good_set(dns_server):
    updates: asyncio.Queue = asyncio.Queue()
    disc = SrvDiscovery(SERVICE, "grpc", resolver=dns_server.address, interval_s=0.1, lifetime_s=0.3)
    task = asyncio.create_task(disc.watch(updates.put_nowait))
    try:
        first = [("grpc://127.0.0.1:18101", 10), ("grpc://127.0.0.2:18102", 1)]
        assert await asyncio.wait_for(updates.get(), WAIT_S) == first

        # A record changes: reported once.
        await asyncio.to_thread(dns_server.set_records,
                                srv_records(SERVICE, [("r3.eu.example.", "127.0.0.3", 18103, 5)]))
        await wait_for(updates, [("grpc://127.0.0.3:18103", 5)])
        await asyncio.sleep(0.5)  # several more rounds: no change, no call
        assert updates.empty()

        # All records removed: a real removal, reported as the empty set.
        await asyncio.to_thread(dns_server.set_records, [])
        await wait_for(updates, [])

        await asyncio.to_thread(dns_server.set_records,
                                srv_records(SERVICE, [("r4.eu.example.", "127.0.0.4", 18104, 1)]))
        await wait_for(updates, [("grpc://127.0.0.4:18104", 1)])

        # The server refuses (like SERVFAIL): not an answer, so the last good set is kept.
        await asyncio.to_thread(dns_server.set_records, [], zones=["eu.example. refuse"])
        async with asyncio.timeout(WAIT_S):
            while True:
                if "REFUSED" in disc.last_error:
                    break
                await asyncio.sleep(0.05)
        assert disc.last_good == [("grpc://127.0.0.4:18104", 1)] and updates.empty()
        await asyncio.to_thread(dns_server.set_records,
                                srv_records(SERVICE, [("r4.eu.example.", "127.0.0.4", 18104, 1)]),
                                zones=["eu.example."])
        async with asyncio.timeout(WAIT_S):
            while True:
                if not disc.last_error:
                    break
                await asyncio.sleep(0.05)
        assert updates.empty()  # same set as before the failure: nothing to report

        # DNS server gone: lookups fail, the last good set is kept (no update) and the why is kept.
        await asyncio.to_thread(dns_server.stop)
        async with asyncio.timeout(WAIT_S):
            while True:
                if disc.last_error:
                    break
                await asyncio.sleep(0.05)
        assert "timed out" in disc.last_error and dns_server.address in disc.last_error
        await asyncio.sleep(1.0)  # held on purpose: several failing rounds must report nothing
        assert updates.empty()
        assert disc.last_good == [("grpc://127.0.0.4:18104", 1)]
        with pytest.raises(DiscoveryError):
            await disc.resolve()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
