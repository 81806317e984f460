"""Engine health: up/down from every scan and from a light periodic check, logged once per change.

A circuit breaker keeps a dead engine from costing every message a full timeout: after
`engine_failure_threshold` failures in a row the engine is skipped (an error result at once) for
`engine_retry_interval` seconds, then one message tries it again.
"""
from __future__ import annotations

import threading
import time

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
        self._up: dict[str, bool] = {}
        self._failures: dict[str, int] = {}
        self._open_until: dict[str, float] = {}

    def is_open(self, engine: str) -> bool:
        """True while the breaker says: do not even try this engine now."""
        with self._lock:
            until = self._open_until.get(engine, 0.0)
            if until and time.monotonic() >= until:
                # half-open: let one message try; the next failure opens it again
                self._open_until[engine] = time.monotonic() + self.retry_interval
                return False
            return bool(until)

    def record(self, result: ScanResult) -> None:
        if result.outcome == SKIPPED:
            return
        self.mark(result.engine, result.outcome != ERROR, result.detail)

    def mark(self, engine: str, ok: bool, detail: str = "") -> None:
        m = self.metrics
        with self._lock:
            was = self._up.get(engine)
            self._up[engine] = ok
            if ok:
                self._failures[engine] = 0
                closed = self._open_until.pop(engine, None) is not None
            else:
                self._failures[engine] = self._failures.get(engine, 0) + 1
                opened = self._failures[engine] >= self.failure_threshold and engine not in self._open_until
                if opened:
                    self._open_until[engine] = time.monotonic() + self.retry_interval
        if m:
            m.engine_up.labels(engine).set(1 if ok else 0)
            if ok:
                m.engine_last_success.labels(engine).set_to_current_time()
            m.breaker_open.labels(engine).set(0 if ok else int(engine in self._open_until))
        if ok and was is False:
            log.info("%s is back up%s", engine, "; circuit closed" if closed else "")
        elif not ok and was is not False:
            log.warning("%s is down: %s", engine, escape(detail))
        if not ok and opened:
            log.warning("%s failed %d times in a row: skipping it for %.0fs (circuit open)", engine,
                        self.failure_threshold, self.retry_interval)


def breaker_result(engine: str) -> ScanResult:
    return ScanResult(engine, ERROR, f"{CIRCUIT}: skipped after repeated failures")

