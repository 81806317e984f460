"""Engine health: up/down from every scan and from a light periodic check, logged once per change.

A circuit breaker keeps a dead engine from costing every message a full timeout: after
`engine_failure_threshold` failures in a row the engine is skipped (an error result at once) for
`engine_retry_interval` seconds, then one message tries it again.

An engine with several servers (a pool, scanners/pool.py) has the same state per member, keyed
(engine, member address as configured): a dead member leaves the pool's rotation while the
others take its mail. The engine's own state then says whether the pool as a whole answered.
"""
from __future__ import annotations

import threading
import time

from . import events
from .logs import escape, log
from .scanners import CIRCUIT, ERROR, SKIPPED, ScanResult


class Health:
    """Each engine's state: up or down, failures in a row, and until when its circuit is open.
    Fed by every scan result (record) and by the periodic check (mark); asked by the pipeline
    before each scan (is_open). Each change of state is logged once and shown in the metrics."""

    def __init__(self, metrics=None, failure_threshold: int = 3, retry_interval: float = 10.0):
        self.metrics = metrics
        self.failure_threshold, self.retry_interval = failure_threshold, retry_interval
        self._lock = threading.Lock()
        # keyed by engine name, or (engine, member) for a member of a pool
        self._up: dict = {}
        self._failures: dict = {}
        self._open_until: dict = {}

    def is_open(self, engine: str) -> bool:
        """True while the breaker says: do not even try this engine now."""
        return self._is_open(engine)

    def member_open(self, engine: str, member: str) -> bool:
        """is_open for one member of a pool."""
        return self._is_open((engine, member))

    def _is_open(self, key) -> bool:
        with self._lock:
            until = self._open_until.get(key, 0.0)
            if until and time.monotonic() >= until:
                # half-open: let one message try; the next failure opens it again
                self._open_until[key] = time.monotonic() + self.retry_interval
                return False
            return bool(until)

    def record(self, result: ScanResult) -> None:
        if result.outcome == SKIPPED:
            return
        self.mark(result.engine, result.outcome != ERROR, result.detail)

    def member_record(self, engine: str, member: str, result: ScanResult) -> None:
        if result.outcome == SKIPPED:
            return
        self.member_mark(engine, member, result.outcome != ERROR, result.detail)

    def mark(self, engine: str, ok: bool, detail: str = "") -> None:
        was, closed, opened, is_open = self._mark(engine, ok)
        m = self.metrics
        if m:
            m.engine_up.labels(engine).set(1 if ok else 0)
            if ok:
                m.engine_last_success.labels(engine).set_to_current_time()
            m.breaker_open.labels(engine).set(int(is_open))
        self._log(engine, ok, detail, was, closed, opened)
        self._announce(engine, None, ok, detail, was)

    def member_mark(self, engine: str, member: str, ok: bool, detail: str = "") -> None:
        was, closed, opened, is_open = self._mark((engine, member), ok)
        m = self.metrics
        if m:
            m.member_up.labels(engine, member).set(1 if ok else 0)
            m.member_circuit_open.labels(engine, member).set(int(is_open))
        self._log(f"{engine} member {member}", ok, detail, was, closed, opened)
        self._announce(engine, member, ok, detail, was)

    def _mark(self, key, ok: bool) -> tuple[bool | None, bool, bool, bool]:
        """(up before, circuit closed now, circuit opened now, circuit open)"""
        closed = opened = False
        with self._lock:
            was = self._up.get(key)
            self._up[key] = ok
            if ok:
                self._failures[key] = 0
                closed = self._open_until.pop(key, None) is not None
            else:
                self._failures[key] = self._failures.get(key, 0) + 1
                opened = self._failures[key] >= self.failure_threshold and key not in self._open_until
                if opened:
                    self._open_until[key] = time.monotonic() + self.retry_interval
            return was, closed, opened, key in self._open_until

    def _log(self, what: str, ok: bool, detail: str, was, closed: bool, opened: bool) -> None:
        if ok and was is False:
            log.info("%s is back up%s", what, "; circuit closed" if closed else "")
        elif not ok and was is not False:
            log.warning("%s is down: %s", what, escape(detail))
        if not ok and opened:
            log.warning("%s failed %d times in a row: skipping it for %.0fs (circuit open)", what,
                        self.failure_threshold, self.retry_interval)

    @staticmethod
    def _announce(engine: str, member: str | None, ok: bool, detail: str, was) -> None:
        """The engine.down and engine.up webhook events: on a change of state only (down is also
        announced when the very first word about an engine is that it is down)."""
        if ok and was is False or not ok and was is not False:
            events.engine_changed(engine, member, ok, detail)


def breaker_result(engine: str) -> ScanResult:
    return ScanResult(engine, ERROR, f"{CIRCUIT}: skipped after repeated failures")

