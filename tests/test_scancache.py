"""The scan cache, and the pipeline's two ways of not scanning: a cached repeat and clamd's head start."""
import dataclasses
import threading
import time

from scanmilter import policyfile
from scanmilter.message import Spool
from scanmilter.pipeline import DECIDED, Pipeline, scan_pool
from scanmilter.policy import Envelope
from scanmilter.scancache import CACHED, Fingerprint, ScanCache
from scanmilter.scanners import ScanResult

HAM = ScanResult("spamd", "clean", score=0.1, required=5.0, rules=("NO_RELAYS",))
CLEAN = ScanResult("clamd", "clean")
VIRUS = ScanResult("clamd", "found", viruses=("Eicar-Signature",))
POOL = scan_pool(4)
ENVELOPE = Envelope("192.0.2.1", "", "smtpd", "a@outside.test", ("u@example.com",))


def fingerprint(client="192.0.2.1", headers=(), body=b"body\r\n"):
    f = Fingerprint(client)
    for name, value in headers:
        f.header(name, value)
    f.body(body)
    return f.digest()


def test_copies_of_one_mailing_share_a_fingerprint():
    one = fingerprint(headers=[("From", b" news@shop.test"), ("To", b" a@x"), ("Subject", b" Sale"),
                               ("Message-ID", b" <1@shop>"), ("Received", b" from a")])
    two = fingerprint(headers=[("Received", b" from b"), ("from", b" news@shop.test"), ("To", b" b@x"),
                               ("Subject", b" Sale "), ("Message-ID", b" <2@shop>")])
    assert one == two
    base = dict(headers=[("From", b" news@shop.test"), ("Subject", b" Sale")])
    assert fingerprint(**base) != fingerprint(**base, body=b"body!\r\n")
    assert fingerprint(**base) != fingerprint(client="198.51.100.7", **base)
    assert fingerprint(**base) != fingerprint(headers=[("From", b" other@shop.test"), ("Subject", b" Sale")])
    assert fingerprint(**base) != fingerprint(headers=[("From", b" news@shop.test"), ("Subject", b" Sale 2")])


def test_entries_expire_are_bounded_and_never_hold_errors():
    now = [100.0]
    cache = ScanCache(60, 2, clock=lambda: now[0])
    cache.put("spamd", b"k1", HAM)
    hit = cache.get("spamd", b"k1")
    assert hit == dataclasses.replace(HAM, detail=CACHED, seconds=0.0)
    assert cache.get("clamd", b"k1") is None                        # per engine
    now[0] += 61
    assert cache.get("spamd", b"k1") is None                        # expired
    cache.put("spamd", b"e", ScanResult("spamd", "error", "timeout: no answer in time"))
    cache.put("spamd", b"s", ScanResult("spamd", "skipped", "size"))
    assert len(cache) == 0
    for k in (b"a", b"b", b"c"):
        cache.put("spamd", k, HAM)
    assert cache.get("spamd", b"a") is None and cache.get("spamd", b"c") is not None   # oldest went
    cache.put("clamd", b"c", CLEAN)
    assert cache.forget("clamd") == 1 and cache.get("clamd", b"c") is None and cache.get("spamd", b"c")
    off = ScanCache(0, 100)
    off.put("spamd", b"k", HAM)
    assert not off.enabled and off.get("spamd", b"k") is None


class Engine:
    def __init__(self, name, result, delay=0.0, timeout=5.0):
        self.name, self.result, self.delay, self.timeout = name, result, delay, timeout
        self.calls = 0
        self.lock = threading.Lock()

    def scan(self, spool):
        with self.lock:
            self.calls += 1
        time.sleep(self.delay)
        return self.result


def spool():
    s = Spool(1000, 1000)
    s.write(b"Subject: x\r\n\r\nbody\r\n")
    return s


def policy(**inbound):
    p = policyfile.load("")
    return dataclasses.replace(p, directions={**p.directions, "inbound": {**p.directions["inbound"], **inbound}})


def test_a_repeat_is_answered_from_the_cache():
    spamd, clamd = Engine("spamd", HAM), Engine("clamd", CLEAN)
    pipe = Pipeline([spamd, clamd], POOL, cache=ScanCache(60, 100))
    first = pipe.inspect(spool(), ENVELOPE, policy(), key=b"k")
    again = pipe.inspect(spool(), ENVELOPE, policy(), key=b"k")
    other = pipe.inspect(spool(), ENVELOPE, policy(), key=b"other")
    assert (spamd.calls, clamd.calls) == (2, 2)
    assert first.verdict.cached == () and again.verdict.cached == ("spamd", "clamd")
    assert again.verdict.score == first.verdict.score and again.outcome.action == "accept"
    assert other.verdict.cached == ()


def test_a_virus_that_policy_refuses_never_reaches_spamd():
    for action in ("reject", "discard"):
        spamd, clamd = Engine("spamd", HAM), Engine("clamd", VIRUS)
        pipe = Pipeline([spamd, clamd], POOL, head_start=1.0)
        inspection = pipe.inspect(spool(), ENVELOPE, policy(virus_action=action))
        assert spamd.calls == 0 and clamd.calls == 1
        assert inspection.outcome.action == action and inspection.outcome.reason == "virus"
        assert ("spamd", DECIDED) in inspection.verdict.skipped


def test_a_virus_that_is_only_tagged_still_gets_its_spam_score():
    spamd, clamd = Engine("spamd", HAM), Engine("clamd", VIRUS)
    inspection = Pipeline([spamd, clamd], POOL, head_start=1.0).inspect(spool(), ENVELOPE, policy(virus_action="tag"))
    assert spamd.calls == 1 and inspection.verdict.score == 0.1


def test_a_slow_clamd_does_not_hold_spamd_back():
    spamd_started = threading.Event()
    waited = []

    class Spamd(Engine):
        def scan(self, spool):
            spamd_started.set()
            return super().scan(spool)

    class SlowClamd(Engine):
        def scan(self, spool):      # finishes only once spamd runs beside it (or gives up after 5 s)
            waited.append(spamd_started.wait(5))
            return super().scan(spool)

    pipe = Pipeline([Spamd("spamd", HAM), SlowClamd("clamd", CLEAN)], POOL, head_start=0.05)
    inspection = pipe.inspect(spool(), ENVELOPE, policy())
    assert [r.outcome for r in inspection.results] == ["clean", "clean"]
    assert waited == [True]
