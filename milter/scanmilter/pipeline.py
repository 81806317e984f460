"""inspect(message): scanners in parallel -> verdict -> decision. Read this module first.

clamd and spamd scan the same spool at the same time (each through its own reader), so a
message costs about the time of the slower engine, not the sum. The attachment checks
(scanners/files.py) are one more engine: they walk the spool in the pool beside them, from the
start. The calling thread runs one engine itself and the shared pool runs the others: no thread
is created per message.

Two ways of not scanning at all: a repeat of a recently scanned message takes the earlier
results from the cache (scancache.py), and clamd gets a head start of clamd_head_start
seconds so that a message it finds infected, and that policy will refuse whatever its spam
score, is never sent to spamd, the expensive engine.

SECURITY: the message and its envelope are the sender's; this module only hands the spool to
the engines and their results to the policy. Results are trusted only as far as the engines'
own parsing goes (scanners/): an engine that fails, is skipped or misses its deadline yields an
error or skip result, which the policy never reads as clean. An oversize spool is never scanned
in part. A cached result is reused only for a message whose every header (but the named ones),
body and origin are identical (scancache.py). That covers the attachment facts too: the walk
reads only Content-* values (never ignored by the key), header names and order, and the body;
the cache keeps facts, never decisions, so the policy in force judges them each time, and a
reload (new limits or rules) starts with an empty cache.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from dataclasses import dataclass, field

from . import policy as P
from .health import breaker_result
from .scancache import ScanCache
from .scanners import CACHED, DECIDED, ERROR, FOUND, OVERSIZE, SKIPPED, SPAM_ENGINES, TIMEOUT, ScanResult, error_kind
from .scanners.spamd import ForUser, is_user_pattern, user_for
from .verdict import Verdict, combine

# Time the pipeline grants past an engine's own timeout before giving up on its thread
# (the engine's socket timeouts end the thread itself shortly after).
DEADLINE_GRACE = 1.0
HEAD_START_ENGINE = "clamd"     # the quick engine whose verdict can make the others needless
# Checks that cost no server's time (the attachment walk, in this process): they start at once,
# with the head-start engine, instead of waiting out its head start.
EARLY_ENGINES = ("files",)


@dataclass(frozen=True)
class Inspection:
    results: tuple[ScanResult, ...]
    verdict: Verdict            # the verdict of the recipient whose settings shape the headers
    outcome: P.Outcome
    seconds: float
    verdicts: dict[str, Verdict] = field(default_factory=dict)   # recipient -> its own (per-user spamd)


@dataclass(frozen=True)
class SpamdUsers:
    """spamd_user as a pattern: which spamd user each recipient is scanned as. At most `limit`
    distinct users get a scan of their own (in the order their recipients came); recipients
    beyond share one scan as `fallback`, so one message to many recipients costs a bounded
    number of spamd scans."""
    pattern: str
    limit: int = 10
    fallback: str = ""

    def assign(self, recipients) -> dict[str, str]:
        """recipient -> spamd user; empty when spamd_user is a fixed name (one scan, as always)."""
        if not is_user_pattern(self.pattern):
            return {}
        own: list[str] = []
        users = {}
        for recipient in recipients:
            user = user_for(self.pattern, recipient)
            if user not in own and len(own) < self.limit:
                own.append(user)
            users[recipient] = user if user in own else self.fallback
        return users


# One scan to run: an engine, and for spamd the per-recipient user (None: the engine's own)
Job = tuple[object, "str | None"]


def scan_pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """The worker threads shared by all messages (and kept across reloads)."""
    return concurrent.futures.ThreadPoolExecutor(max(threads, 1), thread_name_prefix="scan")


class Pipeline:
    """The engines of one configuration with what they share: the worker pool, engine health
    (circuit breakers), metrics and the scan cache. `scan` runs the engines a message needs in
    parallel, each within its own deadline; `inspect` adds the verdict and the policy's decision.
    Replaced whole on reload (the pool and health carry over); a message keeps the one it began with."""

    def __init__(self, engines: list, pool: concurrent.futures.ThreadPoolExecutor, health=None, metrics=None,
                 cache: ScanCache | None = None, head_start: float = 0.0, users: SpamdUsers | None = None):
        self.engines, self.pool, self.health, self.metrics = engines, pool, health, metrics
        self.users = users
        self.cache = cache if cache is not None else ScanCache(0, 0)
        self.head_start = head_start
        # the engine whose score is the spam score (spam_engine), "spamd" when none runs
        self.spam_engine = next((e.name for e in engines if e.name in SPAM_ENGINES), "spamd")

    def _scan_one(self, job: Job, spool, key: bytes | None = None) -> ScanResult:
        engine, user = job
        if user is not None:
            # a per-user score is another result: the user is part of the cache key
            spool = ForUser(spool, user)
            key = None if key is None else key + b"\0spamd_user=" + user.encode()
        if key is not None:
            cached = self.cache.get(engine.name, key)
            if cached is not None:
                return cached
        if self.health is not None and self.health.is_open(engine.name):
            return _as(breaker_result(engine.name), user)   # a dead engine costs nothing while its circuit is open
        if self.metrics is None:
            result = _as(engine.scan(spool), user)
        else:
            # counted until the engine returns, also when the message stopped waiting for it: a
            # thread stuck in an engine shows here until the engine's own timeout ends it
            with self.metrics.scans_in_flight.labels(engine.name).track_inprogress():
                result = _as(engine.scan(spool), user)
        if key is not None and not _timed_out(result):
            self.cache.put(engine.name, key, result)
        return result

    def _observe(self, result: ScanResult) -> None:
        if result.detail == CACHED:      # no engine was asked: says nothing of its health or speed
            if self.metrics is not None:
                self.metrics.scan_cache_hits.labels(result.engine).inc()
            return
        if self.health is not None:
            self.health.record(result)
        m = self.metrics
        if m is not None:
            m.scans.labels(result.engine, result.outcome).inc()
            if result.outcome == ERROR:
                m.scan_errors.labels(result.engine, error_kind(result.detail)).inc()
            elif result.outcome != SKIPPED:
                m.scan_seconds.labels(result.engine).observe(result.seconds)

    def scan(self, spool, wanted: set[str] | None = None, key: bytes | None = None,
             final=None, users: tuple[str, ...] = ()) -> list[ScanResult]:
        """Results in the order of self.engines. `key`: the message's fingerprint for the cache.
        `final(results)`: whether the head-start engine's result alone settles the message.
        `users`: spamd scans once per user given (each result carries its user), else once."""
        jobs: list[Job] = [(e, u) for e in self.engines if wanted is None or e.name in wanted
                           for u in (users if users and e.name == "spamd" else (None,))]
        if not jobs:
            return []
        if spool.oversize:
            # Part of a message is not the message: an engine could call a truncated zip clean.
            return [ScanResult(e.name, SKIPPED, OVERSIZE, user=u) for e, u in jobs]
        start = time.monotonic()
        done: dict[Job, ScanResult] = {}
        running: list[tuple[Job, concurrent.futures.Future]] = []
        lead = next((j for j in jobs if j[0].name == HEAD_START_ENGINE), None)
        if lead is not None and len(jobs) > 1 and final is not None and self.head_start > 0:
            running += [(j, self.pool.submit(self._scan_one, j, spool, key)) for j in jobs
                        if j[0].name in EARLY_ENGINES]
            future = self.pool.submit(self._scan_one, lead, spool, key)
            try:
                done[lead] = future.result(timeout=self.head_start)
            except concurrent.futures.TimeoutError:
                running.append((lead, future))      # slow today: the others start now, in parallel
            else:
                if done[lead].outcome == FOUND and final([done[lead]]):
                    for job in jobs:
                        if all(job is not r for r, _ in running):      # those started finish
                            done.setdefault(job, ScanResult(job[0].name, SKIPPED, DECIDED, user=job[1]))
        todo = [j for j in jobs if j not in done and all(j is not r for r, _ in running)]
        if todo:
            running += [(j, self.pool.submit(self._scan_one, j, spool, key)) for j in todo[1:]]
            done[todo[0]] = self._scan_one(todo[0], spool, key)
        for job, future in running:
            engine, user = job
            left = start + engine.timeout + DEADLINE_GRACE - time.monotonic()
            try:
                done[job] = future.result(timeout=max(left, 0))
            except concurrent.futures.TimeoutError:
                future.cancel()
                done[job] = ScanResult(engine.name, ERROR, f"{TIMEOUT}: no result in time",
                                       time.monotonic() - start, user=user)
        results = [done[j] for j in jobs if j in done]
        for result in results:
            self._observe(result)
        return results

    def inspect(self, spool, envelope: P.Envelope, policy: P.Policy,
                key: bytes | None = None) -> Inspection:
        start = time.monotonic()
        needed = P.checks_needed(envelope, policy, self.spam_engine)

        def final(partial: list[ScanResult]) -> bool:
            rest = [ScanResult(e.name, SKIPPED, DECIDED) for e in self.engines
                    if e.name in needed and all(r.engine != e.name for r in partial)]
            return P.refused_whatever_the_score(
                P.decide(combine(partial + rest, oversize=spool.oversize), envelope, policy))

        # spamd_user as a pattern: a scan per distinct user of the recipients it scores
        users = {}
        if self.users is not None and self.spam_engine == "spamd" and "spamd" in needed:
            users = self.users.assign(r for r in envelope.recipients if not P.allow_reason(envelope, r, policy))
        distinct = tuple(dict.fromkeys(users.values()))
        results = self.scan(spool, needed, key, final, distinct)
        if not distinct:
            verdict = combine(results, oversize=spool.oversize)
            outcome = P.decide(verdict, envelope, policy)
            self._count_files(verdict, outcome)
            return Inspection(tuple(results), verdict, outcome, time.monotonic() - start)
        by_user = {u: combine([r for r in results if r.engine != "spamd" or r.user == u], oversize=spool.oversize)
                   for u in distinct}
        verdicts = {r: by_user[u] for r, u in users.items()}
        default = by_user[distinct[0]]      # recipients not scored (allow-listed) read no score anyway
        outcome = P.decide(default, envelope, policy, verdicts)
        self._count_files(default, outcome)
        lead = outcome.headers_from or next((d for d in outcome.recipients if d.recipient in outcome.quarantine),
                                            None) or next(d for d in outcome.recipients if d.action == outcome.action)
        return Inspection(tuple(results), verdicts.get(lead.recipient, default), outcome,
                          time.monotonic() - start, verdicts)


    def _count_files(self, verdict: Verdict, outcome: P.Outcome) -> None:
        """Per message: each [files] rule that matched with its action (the rule names are the
        policy's, a closed set per configuration), each kind of problem the checks met."""
        if self.metrics is None or verdict.files is None:
            return
        for rule, action in dict.fromkeys((h.name, h.action) for d in outcome.recipients for h in d.files
                                          if h.kind == "rule"):
            self.metrics.file_rule_hits.labels(rule, action).inc()
        for kind in sorted(verdict.files.kinds()):
            self.metrics.attachment_problems.labels(kind).inc()


def _timed_out(result: ScanResult) -> bool:
    """Attachment facts cut short by attachment_timeout: they say how busy this host was, not what
    the message is, so a copy of the message is checked again rather than given them."""
    return result.report is not None and "attachment_timeout" in result.report.limits


def _as(result: ScanResult, user: str | None) -> ScanResult:
    """`result` marked as spamd's scan for `user` (None: the engine's own user, unmarked)."""
    return result if user is None else dataclasses.replace(result, user=user)
