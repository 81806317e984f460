"""inspect(message): scanners in parallel -> verdict -> decision. Read this module first.

clamd and spamd scan the same spool at the same time (each through its own reader), so a
message costs about the time of the slower engine, not the sum. The calling thread runs
one engine itself and the shared pool runs the others: no thread is created per message.
"""
from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass

from . import policy as policy_mod
from .health import breaker_result
from .scanners import ERROR, SKIPPED, TIMEOUT, ScanResult, error_kind
from .verdict import Verdict, combine

# Time the pipeline grants past an engine's own timeout before giving up on its thread
# (the engine's socket timeouts end the thread itself shortly after).
DEADLINE_GRACE = 1.0


@dataclass(frozen=True)
class Inspection:
    results: tuple[ScanResult, ...]
    verdict: Verdict
    outcome: policy_mod.Outcome
    seconds: float


def scan_pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """The worker threads shared by all messages (and kept across reloads)."""
    return concurrent.futures.ThreadPoolExecutor(max(threads, 1), thread_name_prefix="scan")


class Pipeline:
    def __init__(self, engines: list, pool: concurrent.futures.ThreadPoolExecutor, health=None, metrics=None):
        self.engines, self.pool, self.health, self.metrics = engines, pool, health, metrics

    def _scan_one(self, engine, spool) -> ScanResult:
        if self.health is not None and self.health.is_open(engine.name):
            return breaker_result(engine.name)       # a dead engine costs nothing while its circuit is open
        return engine.scan(spool)

    def _observe(self, result: ScanResult) -> None:
        if self.health is not None:
            self.health.record(result)
        m = self.metrics
        if m is not None:
            m.scans.labels(result.engine, result.outcome).inc()
            if result.outcome == ERROR:
                m.scan_errors.labels(result.engine, error_kind(result.detail)).inc()
            elif result.outcome != SKIPPED:
                m.scan_seconds.labels(result.engine).observe(result.seconds)

    def scan(self, spool, wanted: set[str] | None = None) -> list[ScanResult]:
        engines = [e for e in self.engines if wanted is None or e.name in wanted]
        if not engines:
            return []
        if spool.oversize:
            # Part of a message is not the message: an engine could call a truncated zip clean.
            return [ScanResult(e.name, SKIPPED, "oversize") for e in engines]
        start = time.monotonic()
        others = [(e, self.pool.submit(self._scan_one, e, spool)) for e in engines[1:]]
        results = [self._scan_one(engines[0], spool)]
        for engine, future in others:
            left = start + engine.timeout + DEADLINE_GRACE - time.monotonic()
            try:
                results.append(future.result(timeout=max(left, 0)))
            except concurrent.futures.TimeoutError:
                future.cancel()
                results.append(ScanResult(engine.name, ERROR, f"{TIMEOUT}: no result in time",
                                          time.monotonic() - start))
        for result in results:
            self._observe(result)
        return results

    def inspect(self, spool, envelope: policy_mod.Envelope, policy: policy_mod.Policy) -> Inspection:
        start = time.monotonic()
        results = self.scan(spool, policy_mod.engines_needed(envelope, policy))
        verdict = combine(results, oversize=spool.oversize)
        outcome = policy_mod.decide(verdict, envelope, policy)
        return Inspection(tuple(results), verdict, outcome, time.monotonic() - start)
