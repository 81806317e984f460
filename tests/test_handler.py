"""The milter callbacks driven directly (no MTA), with engines replaced by canned results.
What Postfix really does with the edits is shown by the integration tests."""
import logging

import Milter
import pytest

from fakes import CLEAN, HAM, POOL, Engine, feed, handler
from scanmilter.pipeline import Pipeline
from scanmilter.scanners import ScanResult
from support import assert_safe, decoded

SPAM8 = ScanResult("spamd", "found", score=8.0, required=5.0, rules=("SCANMILTER_TAG_TEST",))


def test_engines_see_the_message_byte_exact():
    spamd, clamd = Engine("spamd", HAM), Engine("clamd", CLEAN)
    h = handler(spamd, clamd)
    rc = feed(h, [("Subject", b" caf\xc3\xa9"), ("From", b"\t<a@example.org>")], body=b"x\r\n")
    assert rc == Milter.ACCEPT
    expected = b"Subject: caf\xc3\xa9\r\nFrom:\t<a@example.org>\r\n\r\nx\r\n"
    assert spamd.seen == [expected] and clamd.seen == [expected]
    assert h._ctx.calls == [("add", "X-Virus-Status", " clean"),
                            ("add", "X-Spam-Status", " No, score=0.1 required=5.0 tests=NO_RELAYS")]


def test_forged_verdicts_are_removed_highest_index_first():
    h = handler(Engine("spamd", HAM), Engine("clamd", CLEAN))
    feed(h, [("X-Spam-Flag", b" YES"), ("Subject", b" hi"), ("x-spam-flag", b" YES"),
             ("X-Virus-Status", b" clean")])
    removes = [c for c in h._ctx.calls if c[0] == "chg"]
    assert removes == [("chg", "x-spam-flag", 2, None), ("chg", "X-Spam-Flag", 1, None),
                       ("chg", "X-Virus-Status", 1, None)]


def test_subject_is_tagged_once_and_8bit_subjects_survive():
    h = handler(Engine("spamd", SPAM8), Engine("clamd", CLEAN))
    feed(h, [("Subject", b" Gr\xfc\xdfe")])                # invalid UTF-8 from the wire
    [value] = [c[3] for c in h._ctx.calls if c[:3] == ("chg", "Subject", 1)]
    assert_safe(value)                                     # pymilter sends it as UTF-8: no surrogates
    assert decoded(value) == b"[SPAM] Gr\xfc\xdfe"           # the original bytes, not U+FFFD
    assert ("add", "X-Spam-Flag", " YES") in h._ctx.calls
    h = handler(Engine("spamd", SPAM8), Engine("clamd", CLEAN))
    feed(h, [("Subject", b" [SPAM] again")])
    assert not [c for c in h._ctx.calls if c[1] == "Subject"]
    h = handler(Engine("spamd", SPAM8), Engine("clamd", CLEAN))
    feed(h, [("From", b" a@b")])
    assert ("add", "Subject", " [SPAM]") in h._ctx.calls


def test_virus_reject_reply_doubles_percent():
    virus = ScanResult("clamd", "found", viruses=("Win.100%.Bad",))
    h = handler(Engine("spamd", HAM), Engine("clamd", virus), virus_reply="100% sure: {virus}")
    assert feed(h, [("Subject", b" x")]) == Milter.REJECT
    # names are reduced to a safe alphabet; libmilter wants a literal % doubled
    assert h._ctx.reply == ("550", "5.7.1", "100%% sure: Win.100_.Bad")


def test_a_bug_in_our_code_is_a_451_not_a_crash(logged):
    h = handler(Engine("spamd", exc=None, result=None), Engine("clamd", CLEAN))   # result None -> bug
    assert feed(h, [("Subject", b" x")]) == Milter.TEMPFAIL
    assert h._ctx.reply[:2] == ("451", "4.7.1")
    assert h.rt.in_flight == 0
    # the README promises the error "logged with its traceback"
    [rec] = [r for r in logged.records if r.levelno == logging.ERROR]
    assert rec.getMessage() == "4XQID1: error in eom callback"
    assert rec.exc_info and rec.exc_info[0] is AttributeError
    assert "Traceback (most recent call last)" in logged.text and "AttributeError" in logged.text


def test_an_error_before_eom_is_answered_at_eom():
    h = handler(Engine("spamd", HAM), Engine("clamd", CLEAN))
    h.connect("c", 2, ("192.0.2.1", 25))
    h.envfrom("<a@b>")
    def broken(*args):
        raise RuntimeError("bug")
    h.msg.add_header = broken             # the next callback fails inside our code
    assert h.header_bytes("Subject", b" x") == Milter.CONTINUE
    h.eoh()
    assert h.eom() == Milter.TEMPFAIL and h._ctx.reply[0] == "451"
    # the next transaction on the same connection starts clean
    h.envfrom("<a@b>")
    h.eoh()
    assert h.eom() == Milter.ACCEPT


def test_abort_and_close_release_the_message():
    h = handler(Engine("spamd", HAM))
    h.connect("c", 2, ("192.0.2.1", 25))
    h.envfrom("<a@b>")
    assert h.rt.in_flight == 1
    h.abort()
    h.envfrom("<a@b>")
    h.close()
    assert h.rt.in_flight == 0 and h.msg is None


def test_engines_run_concurrently():
    import threading
    barrier = threading.Barrier(2, timeout=5)   # passes only if both engines are inside scan() at once

    class Meeting(Engine):
        def scan(self, spool):
            barrier.wait()
            return self.result

    pipeline = Pipeline([Meeting("spamd", HAM), Meeting("clamd", CLEAN)], POOL)
    from scanmilter.message import Spool
    spool = Spool(100, 100)
    spool.write(b"x")
    results = pipeline.scan(spool)
    assert [r.outcome for r in results] == ["clean", "clean"]


def stuck_clamd(release):
    """A clamd with a 0.1 s timeout whose scan waits for `release` (an Event)."""
    class Stuck(Engine):
        def scan(self, spool):
            release.wait(10)
            return self.result

    stuck = Stuck("clamd", CLEAN)
    stuck.timeout = 0.1
    return stuck


def test_a_stuck_engine_thread_is_given_up_at_its_deadline():
    import threading
    release = threading.Event()
    stuck = stuck_clamd(release)
    from scanmilter import pipeline as pl
    old, pl.DEADLINE_GRACE = pl.DEADLINE_GRACE, 0.1
    try:
        from scanmilter.message import Spool
        results = Pipeline([Engine("spamd", HAM), stuck], POOL).scan(Spool(10, 10))
    finally:
        pl.DEADLINE_GRACE = old
        release.set()
    assert results[1].outcome == "error" and results[1].detail.startswith("timeout")


def test_a_scan_given_up_at_its_deadline_stays_in_flight_until_its_thread_leaves_the_engine():
    """scanmilter_scans_in_flight counts the threads inside an engine, the one a message stopped
    waiting for too: a thread stuck in an engine shows there until it returns."""
    import threading

    import procs
    from prometheus_client import CollectorRegistry
    from scanmilter import pipeline as pl
    from scanmilter.message import Spool
    from scanmilter.metrics import Metrics
    release = threading.Event()
    stuck = stuck_clamd(release)
    metrics = Metrics(CollectorRegistry())

    def in_flight(engine):
        return metrics.registry.get_sample_value("scanmilter_scans_in_flight", {"engine": engine})
    old, pl.DEADLINE_GRACE = pl.DEADLINE_GRACE, 0.1
    try:
        results = Pipeline([Engine("spamd", HAM), stuck], POOL, metrics=metrics).scan(Spool(10, 10))
        assert results[1].detail.startswith("timeout")
        assert (in_flight("clamd"), in_flight("spamd")) == (1, 0)
    finally:
        pl.DEADLINE_GRACE = old
        release.set()
    assert procs.wait_until(lambda: in_flight("clamd") == 0, 10)


def start(h, sender="<a@example.org>", rcpt="<u@example.com>"):
    h.connect("client.example", 2, ("192.0.2.1", 25))
    h.envfrom(sender)
    h.envrcpt(rcpt)


def test_a_flood_of_forged_verdict_headers_is_refused_unscanned_and_unedited(logged):
    spamd, clamd = Engine("spamd", HAM), Engine("clamd", CLEAN)
    h = handler(spamd, clamd)
    limit = h.rt.cfg.verdict_header_limit
    start(h)
    kept = 0
    for i in range(20_000):
        h.header_bytes(f"X-Spam-Flood-{i}", b" x")
        kept = max(kept, len(h.msg.seen))
    h.eoh()
    h.body(b"x\r\n")
    assert h.eom() == Milter.REJECT
    assert h._ctx.reply == ("552", "5.6.0", "Too many header fields")
    assert kept <= limit                                   # memory bounded by the cap
    assert h._ctx.calls == []                              # not one header edit for Postfix to apply
    assert spamd.seen == [] and clamd.seen == []           # not scanned
    assert h.rt.in_flight == 0
    lines = [r.getMessage() for r in logged.records]
    assert "4XQID1: 20000 header fields, over verdict_header_limit (50): reject, unscanned" in lines
    [summary] = [line for line in lines if "action=" in line]
    assert summary.startswith("4XQID1: action=reject, reason=headers, direction=inbound,")


def test_verdict_headers_up_to_the_limit_are_all_stripped():
    h = handler(Engine("spamd", HAM), Engine("clamd", CLEAN))
    limit = h.rt.cfg.verdict_header_limit
    assert feed(h, [(f"X-Spam-Forged-{i}", b" x") for i in range(limit)]) == Milter.ACCEPT
    assert len([c for c in h._ctx.calls if c[0] == "chg" and c[3] is None]) == limit


def test_one_header_field_over_header_count_limit_is_refused():
    h = handler(Engine("spamd", HAM), Engine("clamd", CLEAN))
    limit = h.rt.cfg.header_count_limit
    assert feed(h, [(f"X-Many-{i}", b" v") for i in range(limit)]) == Milter.ACCEPT
    h = handler(Engine("spamd", HAM), Engine("clamd", CLEAN))
    assert feed(h, [(f"X-Many-{i}", b" v") for i in range(limit + 1)]) == Milter.REJECT
    assert h._ctx.reply == ("552", "5.6.0", "Too many header fields") and h._ctx.calls == []


def test_header_limit_action_tempfail_and_the_next_message_is_clean():
    h = handler(Engine("spamd", HAM), Engine("clamd", CLEAN),
                daemon={"header_count_limit": 10, "header_limit_action": "tempfail"})
    assert feed(h, [("X-Many", b" v")] * 11) == Milter.TEMPFAIL
    assert h._ctx.reply == ("451", "4.6.0", "Too many header fields, please try again later")
    h.envfrom("<a@example.org>")                           # same connection, next transaction
    h.envrcpt("<u@example.com>")
    for _ in range(10):
        h.header_bytes("X-Many", b" v")
    h.eoh()
    assert h.eom() == Milter.ACCEPT
