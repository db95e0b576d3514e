"""Links to the other regions' gateways: how a request crosses to a peer region.

A peer gateway speaks the same KServe v2 protocol as a replica, so the same upstream clients
carry the request, in the client's own protocol (HTTP body or gRPC message as received, never
re-encoded), with three differences:
- ``geogate-hops`` is raised by one, so the peer serves it from its own replicas only (no
  loops, no ping-pong between two sick regions);
- the deadline travels as what is LEFT of it (``geogate-timeout-ms`` header / gRPC deadline);
  when that was the client's own deadline and it runs out, the forwarder counts it as the
  client's doing (DEADLINE_CLIENT), not the peer's failure; the peer, for which the forwarded
  deadline is a client's, does the same for its replicas;
- the version sent is the one the client asked for (the peer resolves its own release record,
  so a per-site cutover stays per site), and the peer's ``geogate-region`` and
  ``geogate-replica`` answer headers are kept so the client sees who really served it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os

import aiohttp
import grpc

from core.kserve import HOPS_HEADER, PRIORITY_HEADER, REGION_HEADER, REPLICA_HEADER, REQUEST_ID_HEADER, TIMEOUT_HEADER
from core.tls import ClientTls
from gateway.upstream.grpc_upstream import GrpcUpstream, classify_rpc_error
from gateway.upstream.http_upstream import HttpUpstream, make_session
from gateway.upstream.proto_peek import ProtoError, peek_response_version
from gateway.upstream.types import PROTOCOL_HTTP, InferCall, Reply
from health.outcomes import Outcome

log = logging.getLogger("geogate.peers")

MS_PER_S = 1000.0
# Leave the peer a little less than our own remaining time, so its deadline answer (504 with
# its reason) reaches us before our own timer fires.
DEADLINE_MARGIN_S = 0.002


class PeerGrpc(GrpcUpstream):
    """gRPC to a peer gateway: also reads the peer's initial metadata (who served)."""

    async def infer_grpc(self, call: InferCall, timeout_s: float, extra_headers: dict[str, str]) -> Reply:
        try:
            rpc = self._infer(call.raw, timeout=timeout_s, metadata=tuple(extra_headers.items()))
            data = await rpc
        except grpc.aio.AioRpcError as err:
            reply = self._error_reply(classify_rpc_error(err), err, timeout_s)
            md = dict(err.initial_metadata() or ())
            reply.region, reply.replica = md.get(REGION_HEADER, ""), md.get(REPLICA_HEADER, "")
            return reply
        except grpc.aio.UsageError as exc:
            return self._unusable_channel(exc)
        try:
            md = dict(await rpc.initial_metadata() or ())
            version = peek_response_version(data)
        except ProtoError as exc:
            return self._unreadable(exc)
        return Reply(Outcome.SUCCESS, body=data, model_version=version,
                     region=md.get(REGION_HEADER, ""), replica=md.get(REPLICA_HEADER, ""))


class PeerLink:
    """One peer region's gateway, over HTTP and gRPC."""

    def __init__(self, region: str, http: str, grpc_address: str, session: aiohttp.ClientSession,
                 connections: int, tls: ClientTls | None = None, api_key: str = "") -> None:
        self.region = region
        # The API key presented to the peer ([auth] peer_key_env), if its gateway checks keys.
        self.auth_header = f"Bearer {api_key}" if api_key else ""
        # tls: [tls.peers] (the peer's client-facing listeners serve TLS; mutual with a client cert)
        self.http = HttpUpstream(http, session, connections=connections, tls=tls)
        self.grpc = PeerGrpc(grpc_address, tls=tls)
        self.label = f"peer:{region}"
        # Resolved when the region monitor marks this peer down (see `mark`).
        self._down: asyncio.Future[str] | None = None

    @property
    def is_down(self) -> bool:
        return self._down is not None and self._down.done()

    def mark(self, healthy: bool, reason: str = "") -> None:
        """The region monitor's verdict on this peer. Going down fails the requests in flight
        to it at once (they move on to the next region) instead of letting them wait out their
        deadline on a connection that will never answer (a blackholed region)."""
        if healthy:
            if self._down is not None and self._down.done():
                self._down = None
        else:
            if self._down is None:
                self._down = asyncio.get_running_loop().create_future()
            if not self._down.done():
                self._down.set_result(reason or "health checks failed")

    async def forward(self, call: InferCall, timeout_s: float) -> Reply:
        timeout_s = max(0.001, timeout_s)
        headers = {REQUEST_ID_HEADER: call.request_id, HOPS_HEADER: str(call.hops + 1)}
        if self.auth_header:
            headers["authorization"] = self.auth_header
        if call.priority:  # the class this gateway resolved: the peer's admission uses it
            headers[PRIORITY_HEADER] = call.priority
        # The client's version, not ours: the peer resolves its own release record.
        peer_call = dataclasses.replace(call, version=call.requested_version)
        if call.protocol == PROTOCOL_HTTP:
            headers[TIMEOUT_HEADER] = f"{max(1.0, (timeout_s - DEADLINE_MARGIN_S) * MS_PER_S):.0f}"
            send = self.http.infer_http(peer_call, timeout_s, headers)
        else:
            send = self.grpc.infer_grpc(peer_call, max(0.001, timeout_s - DEADLINE_MARGIN_S), headers)
        if self._down is None:
            self._down = asyncio.get_running_loop().create_future()
        down = self._down
        if down.done():  # already known down (tried only as a last resort): plain attempt
            reply = await send
        else:
            task = asyncio.ensure_future(send)
            try:
                await asyncio.wait((task, down), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not task.done():
                    task.cancel()
            if task.done() and not task.cancelled():
                reply = task.result()
            else:
                reply = Reply(Outcome.RESET, 503, grpc.StatusCode.UNAVAILABLE,
                              message=f"the region went down while the request was in flight ({down.result()})")
        if not reply.region:
            reply.region = self.region
        if reply.message:
            reply.message = f"peer region {self.region!r}: {reply.message}"
        return reply

    async def close(self) -> None:
        await self.http.close()
        await self.grpc.close()


class PeerLinks:
    """Every peer of one gateway, by region name."""

    def __init__(self, cfg, local_region: str, *, tls: ClientTls | None = None) -> None:
        self._cfg = cfg
        self._tls = tls  # [tls.peers]
        self.local_region = local_region
        self.links: dict[str, PeerLink] = {}
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        conns = self._cfg.gateway.upstream_connections_per_replica
        self._session = make_session(conns)
        key_env = self._cfg.auth.peer_key_env
        api_key = os.environ.get(key_env, "") if key_env else ""
        for r in self._cfg.regions:
            if r.name != self.local_region:
                self.links[r.name] = PeerLink(r.name, r.http, r.grpc, self._session, conns, self._tls,
                                              api_key)

    def mark(self, region: str, healthy: bool, reason: str = "") -> None:
        link = self.links.get(region)
        if link is not None:
            link.mark(healthy, reason)

    def link(self, region: str) -> PeerLink | None:
        return self.links.get(region)

    async def close(self) -> None:
        for link in self.links.values():
            try:
                await link.close()
            except Exception:  # closing must go on for the others
                log.exception("closing the link to peer %s failed", link.region)
        if self._session is not None:
            await self._session.close()
