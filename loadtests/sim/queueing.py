"""One replica as a queue: c parallel slots, a mean service time, arrivals at rate lambda.

Steady state (arrival rate under capacity): M/G/c by the Allen-Cunneen approximation, i.e.
the exact M/M/c waiting time (Erlang C) scaled by (1 + cs^2) / 2 for the service time's
squared coefficient of variation cs^2 (inference batches have steadier service times than an
exponential: ``SERVICE_SHAPE`` gives cs^2 = 1/9). A request waits with probability C (Erlang
C); its wait is then exponential with the conditional mean.

Overload (arrivals over capacity, or a backlog left by an earlier overload): a fluid backlog
grows by (lambda - capacity) per second and drains at (capacity - lambda); every request
waits backlog / capacity on top of the steady-state wait. The backlog never holds more than
``abandon_s`` of work: requests that would wait longer are past their deadline, and the gateway
cancels them (they count as timeouts). In-flight (what a gateway counts as
outstanding) is busy slots + queued, by Little's law.
"""

from __future__ import annotations

import math
import random

SERVICE_SHAPE = 9.0  # gamma shape of the service time: cs^2 = 1 / shape
RHO_STEADY_MAX = 0.98  # the steady-state formulas are used up to this utilization; beyond, the backlog
DEFAULT_ABANDON_S = 30.0  # requests that would wait longer are abandoned (the client's deadline passed)


def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with `servers` slots and offered
    load `offered` = lambda / mu (Erlang C). 1.0 at or over capacity."""
    if offered <= 0.0:
        return 0.0
    if offered >= servers:
        return 1.0
    b = 1.0  # Erlang B by the stable recursion B(k) = a B(k-1) / (k + a B(k-1))
    for k in range(1, servers + 1):
        b = offered * b / (k + offered * b)
    rho = offered / servers
    return b / (1.0 - rho * (1.0 - b))


def mmc_wait_s(servers: int, service_s: float, arrival_per_s: float) -> float:
    """Mean wait in queue of an M/M/c queue (Erlang C / (c mu - lambda)); inf at or over capacity."""
    mu = 1.0 / service_s
    if arrival_per_s >= servers * mu:
        return math.inf
    return erlang_c(servers, arrival_per_s / mu) / (servers * mu - arrival_per_s)


class ReplicaQueue:
    """The queueing state of one replica, advanced in steps of the simulation's tick."""

    __slots__ = ("abandon_s", "alive", "arrival_per_s", "backlog", "p_wait", "service_s", "slots", "slowdown",
                 "wait_s", "wait_ss_s")

    def __init__(self, slots: int, service_s: float, *, abandon_s: float = DEFAULT_ABANDON_S) -> None:
        self.abandon_s = abandon_s
        self.slots = slots
        self.service_s = service_s
        self.slowdown = 1.0  # a slow replica (fault): service time multiplied by this
        self.alive = True
        self.arrival_per_s = 0.0
        self.backlog = 0.0  # requests queued beyond the steady state (fluid)
        self.p_wait = 0.0
        self.wait_ss_s = 0.0  # steady-state mean wait
        self.wait_s = 0.0  # mean wait including the backlog

    @property
    def effective_service_s(self) -> float:
        return self.service_s * self.slowdown

    @property
    def capacity_per_s(self) -> float:
        return self.slots / self.effective_service_s

    def step(self, arrival_per_s: float, dt_s: float) -> None:
        """Advance by `dt_s` with arrivals at `arrival_per_s` during the step."""
        if not self.alive:
            self.arrival_per_s, self.backlog, self.p_wait, self.wait_ss_s, self.wait_s = 0.0, 0.0, 0.0, 0.0, 0.0
            return
        cap = self.capacity_per_s
        self.arrival_per_s = arrival_per_s
        self.backlog = min(cap * self.abandon_s, max(0.0, self.backlog + (arrival_per_s - cap) * dt_s))
        lam = min(arrival_per_s, RHO_STEADY_MAX * cap)
        svc = self.effective_service_s
        if lam > 0.0:
            c = erlang_c(self.slots, lam * svc)
            self.p_wait = c if self.backlog <= 0.0 else 1.0
            self.wait_ss_s = c / (cap - lam) * (1.0 + 1.0 / SERVICE_SHAPE) / 2.0
        else:
            self.p_wait, self.wait_ss_s = 0.0, 0.0
        self.wait_s = self.wait_ss_s + self.backlog / cap

    def in_flight_if(self, arrival_per_s: float, dt_s: float) -> float:
        """In-flight at the end of a step of `dt_s` with arrivals at `arrival_per_s` (without
        changing the state): what a gateway would see as outstanding after sending that load."""
        if not self.alive:
            return 0.0
        svc = self.service_s * self.slowdown
        cap = self.slots / svc
        backlog = min(cap * self.abandon_s, max(0.0, self.backlog + (arrival_per_s - cap) * dt_s))
        lam = min(arrival_per_s, RHO_STEADY_MAX * cap)
        wait_ss = 0.0
        if lam > 0.0:
            wait_ss = erlang_c(self.slots, lam * svc) / (cap - lam) * (1.0 + 1.0 / SERVICE_SHAPE) / 2.0
        return min(arrival_per_s, cap) * svc + lam * wait_ss + backlog

    def latency_at_level_s(self, in_flight: int, rng: random.Random | None = None) -> float:
        """Latency of a request sent when `in_flight` requests (itself included) are inside:
        its service, after the (in_flight - slots) ahead of it beyond the slots have left (one
        per service time / slots), plus the fluid backlog's wait. With `rng`, the service time
        is drawn from its distribution (one real request), else its mean."""
        svc = self.effective_service_s
        if rng is not None:
            svc = rng.gammavariate(SERVICE_SHAPE, svc / SERVICE_SHAPE)
        return svc * max(1.0, in_flight / self.slots) + self.backlog / self.capacity_per_s

    @property
    def mean_latency_s(self) -> float:
        return self.wait_s + self.effective_service_s

    @property
    def in_flight(self) -> float:
        """Requests inside the replica (busy slots + queued), Little's law."""
        if not self.alive:
            return 0.0
        busy = min(self.arrival_per_s, self.capacity_per_s) * self.effective_service_s
        return busy + min(self.arrival_per_s, RHO_STEADY_MAX * self.capacity_per_s) * self.wait_ss_s + self.backlog

    def sample_latency_s(self, rng: random.Random) -> float:
        """One request's time in the replica: backlog wait + (maybe) a steady-state wait + service."""
        svc = self.effective_service_s
        service = rng.gammavariate(SERVICE_SHAPE, svc / SERVICE_SHAPE)
        wait = self.backlog / self.capacity_per_s
        if self.wait_ss_s > 0.0 and self.p_wait > 0.0 and rng.random() < self.p_wait:
            wait += rng.expovariate(self.p_wait / self.wait_ss_s)  # conditional mean wait_ss / p_wait
        return wait + service
