"""A pool: several servers of one engine (clamd or spamd) that look like one engine.

Each message goes to one member: the one with the fewest scans in flight, ties taken in turn,
members whose circuit is open left out. When a member fails (refuses, times out, breaks off or
answers garbage) the scan moves on to another member, each member tried at most once, all
within the engine's one deadline. Only when every member has failed is the result an error,
and then scan_failure_action applies as with one server.

The deadline is shared out: an attempt gets an equal part of the time left among the members
still to try (the last one gets all of it), so a member that accepts and never answers leaves
time for the others. A pool of one gives its only member the whole deadline, as before pools.

Health per member: every attempt counts for or against its member (a circuit breaker of its
own, keyed by the member's address as configured: a closed set from the configuration, never
anything a client sends). A member whose circuit is open is tried again by one message every
engine_retry_interval, and by the periodic check (ping), and rejoins when it answers. The engine
as a whole is down only when every member is.
"""
from __future__ import annotations

import copy
import threading
import time

from . import CIRCUIT, ERROR, SKIPPED, ScanResult, error_kind


class Member:
    """One server of a pool: `name` is its address as configured, `scanner` the engine's client."""

    def __init__(self, name: str, scanner):
        self.name, self.scanner = name, scanner
        self.in_flight = 0


class Pool:
    def __init__(self, name: str, members: list[Member], timeout: float, health=None, metrics=None):
        if not members:
            raise ValueError("a pool needs at least one member")
        self.name, self.members, self.timeout = name, list(members), timeout
        self.health, self.metrics = health, metrics
        self._lock = threading.Lock()
        self._turn = 0          # where the round robin starts among members equally busy

    # ---------------------------------------------------------------- choosing a member
    def _member_health(self):
        """Health for the members; None for a pool of one, whose member's health is the engine's
        own (the pipeline's circuit breaker stands in front of it)."""
        return self.health if len(self.members) > 1 else None

    def _usable(self, member: Member) -> bool:
        health = self._member_health()
        return health is None or not health.member_open(self.name, member.name)

    def _take(self, tried: set[str]) -> tuple[Member | None, int]:
        """The member to try next (its in-flight count raised), and how many members are still
        to try counting it; (None, 0) when none is left."""
        candidates = [m for m in self.members if m.name not in tried and self._usable(m)]
        if not candidates:
            return None, 0
        with self._lock:
            least = min(m.in_flight for m in candidates)
            n = len(self.members)
            order = sorted((m for m in candidates if m.in_flight == least),
                           key=lambda m: (self.members.index(m) - self._turn) % n)
            chosen = order[0]
            if not tried:       # the turn moves once per message, not per failover
                self._turn = (self.members.index(chosen) + 1) % n
            chosen.in_flight += 1
        return chosen, len(candidates)

    def _release(self, member: Member) -> None:
        with self._lock:
            member.in_flight -= 1

    # ---------------------------------------------------------------- scanning
    def scan(self, spool) -> ScanResult:
        start = time.monotonic()
        end = start + self.timeout
        tried: set[str] = set()
        last: ScanResult | None = None
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            member, remaining = self._take(tried)
            if member is None:
                break
            if tried and self.metrics is not None:
                self.metrics.member_failovers.labels(self.name).inc()
            tried.add(member.name)
            attempt = copy.copy(member.scanner)   # the same client, with this attempt's part of the deadline
            attempt.timeout = left / remaining
            try:
                result = attempt.scan(spool)
            finally:
                self._release(member)
            self._observe(member, result)
            if result.outcome != ERROR:
                return ScanResult(**{**result.__dict__, "seconds": time.monotonic() - start})
            last = result
        if last is None:
            last = ScanResult(self.name, ERROR, f"{CIRCUIT}: every member skipped after repeated failures")
        elif len(tried) > 1:
            last = ScanResult(self.name, ERROR, f"{last.detail} (all {len(tried)} members tried)")
        return ScanResult(**{**last.__dict__, "seconds": time.monotonic() - start})

    def _observe(self, member: Member, result: ScanResult) -> None:
        health = self._member_health()
        if health is not None:
            health.member_record(self.name, member.name, result)
        m = self.metrics
        if m is None:
            return
        if health is None and result.outcome != SKIPPED:
            m.member_up.labels(self.name, member.name).set(int(result.outcome != ERROR))
        m.member_scans.labels(self.name, member.name, result.outcome).inc()
        if result.outcome == ERROR:
            m.member_scan_errors.labels(self.name, member.name, error_kind(result.detail)).inc()
        else:
            m.member_scan_seconds.labels(self.name, member.name).observe(result.seconds)

    # ---------------------------------------------------------------- checks between messages
    def ping_members(self) -> list[tuple[str, str]]:
        """[(member, "" or what went wrong)], every member pinged, each marked up or down."""
        out = []
        for member in self.members:
            problem = member.scanner.ping()
            health = self._member_health()
            if health is not None:
                health.member_mark(self.name, member.name, not problem, problem)
            elif self.metrics is not None:
                self.metrics.member_up.labels(self.name, member.name).set(int(not problem))
            out.append((member.name, problem))
        return out

    def ping(self) -> str:
        """"" while at least one member answers, else every member's problem."""
        problems = self.ping_members()
        if any(not p for _, p in problems):
            return ""
        return "; ".join(f"{name}: {p}" for name, p in problems)

    def version(self):
        """The oldest signature database among the members that answer (clamd): a cached result
        is kept only while no member could have scanned with an older database."""
        versions = [v for v in (m.scanner.version() for m in self.members) if v]
        return min(versions) if versions else None

    def __getattr__(self, name):
        # settings of the engine shared by every member (size_limit, ...): the first member's
        members = self.__dict__.get("members")
        if not members:
            raise AttributeError(name)
        return getattr(members[0].scanner, name)
