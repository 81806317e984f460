"""The scan cache, and the pipeline's two ways of not scanning: a cached repeat and clamd's head start."""
import dataclasses
import threading
import time

from scanmilter import policyfile
from scanmilter.message import Spool
from scanmilter.pipeline import Pipeline, scan_pool
from scanmilter.policy import Envelope
from scanmilter.scancache import CACHE_IGNORED_HEADERS, Fingerprint, ScanCache
from scanmilter.scanners import CACHED, DECIDED, Origin, ScanResult

HAM = ScanResult("spamd", "clean", score=0.1, required=5.0, rules=("NO_RELAYS",))
CLEAN = ScanResult("clamd", "clean")
VIRUS = ScanResult("clamd", "found", viruses=("Eicar-Signature",))
POOL = scan_pool(4)
ENVELOPE = Envelope("192.0.2.1", "", "smtpd", "a@outside.test", ("u@example.com",))


def fingerprint(client="192.0.2.1", headers=(), body=b"body\r\n", helo="mail.shop.test", auth=""):
    f = Fingerprint(Origin(client, "mail.shop.test", helo, auth).key())
    for name, value in headers:
        f.header(name, value)
    f.body(body)
    return f.digest()


MAILING = [("Received", b" from a"), ("From", b" news@shop.test"), ("To", b" a@x"), ("Subject", b" Sale"),
           ("Message-ID", b" <1@shop>"), ("Date", b" Thu, 26 Nov 2026 10:00:00 +0000"),
           ("Content-Type", b" text/plain"), ("DKIM-Signature", b" v=1; b=AAA")]


def test_copies_of_one_mailing_share_a_fingerprint():
    copy = [("Received", b" from b"), ("From", b" news@shop.test"), ("To", b" b@x"), ("Subject", b" Sale"),
            ("Message-ID", b" <2@shop>"), ("Date", b" Thu, 26 Nov 2026 10:00:01 +0000"),
            ("Content-Type", b" text/plain"), ("DKIM-Signature", b" v=1; b=BBB")]
    assert fingerprint(headers=MAILING) == fingerprint(headers=copy)


def changed(index, value):
    return [(n, value if i == index else v) for i, (n, v) in enumerate(MAILING)]


def test_anything_an_engine_reads_changes_the_fingerprint():
    base = fingerprint(headers=MAILING)
    # how the engines decode the message: the EICAR-as-text/plain poisoning
    assert base != fingerprint(headers=changed(6, b' application/octet-stream; name="invoice.exe"'))
    assert base != fingerprint(headers=MAILING + [("Content-Transfer-Encoding", b" base64")])
    assert base != fingerprint(headers=changed(1, b" other@shop.test"))
    assert base != fingerprint(headers=changed(3, b" Sale "))          # exact bytes, not a normalised form
    assert base != fingerprint(headers=[(n.lower(), v) for n, v in MAILING])
    assert base != fingerprint(headers=MAILING[1:] + MAILING[:1])    # order: clamd types mail by the first name
    assert base != fingerprint(headers=MAILING + [("X-Anything", b" 1")])
    assert base != fingerprint(headers=MAILING, body=b"body!\r\n")
    # where it came from, as spamd sees it
    assert base != fingerprint(client="198.51.100.7", headers=MAILING)
    assert base != fingerprint(helo="other.test", headers=MAILING)
    assert base != fingerprint(auth="alice", headers=MAILING)
    # no field can bleed into the next one
    assert fingerprint(headers=[("X-A", b" 1X-B: 2")]) != fingerprint(headers=[("X-A", b" 1"), ("X-B", b" 2")])


def test_a_message_keys_its_header_names_as_sent():
    """clamd tells mail from other files by the first header's exact name: a copy that differs
    only in the case of a name is another message to it."""
    from scanmilter.message import Message

    def digest(name):
        msg = Message("a@outside.test", Spool(1000, 1000), fingerprint=ScanCache(60, 10).fingerprint(b"origin"))
        msg.add_header(name, b" news@shop.test", lambda key: False)
        msg.end_headers()
        msg.add_body(b"body\r\n")
        return msg.fingerprint.digest()
    assert digest("From") != digest("FROM") and digest("From") == digest("From")


def test_ignored_headers_are_a_setting():
    from scanmilter import config
    cfg = config.load(None)
    assert cfg.scan_cache_ignored_headers == list(CACHE_IGNORED_HEADERS)
    strict = ScanCache(60, 10, ignored_headers=()).fingerprint(b"origin")
    loose = ScanCache(60, 10).fingerprint(b"origin")
    for f in (strict, loose):
        f.header("To", b" a@x")
    other_strict, other_loose = ScanCache(60, 10, ignored_headers=()).fingerprint(b"origin"), \
        ScanCache(60, 10).fingerprint(b"origin")
    for f in (other_strict, other_loose):
        f.header("To", b" b@x")
    assert strict.digest() != other_strict.digest() and loose.digest() == other_loose.digest()


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


def test_zero_seconds_turn_the_cache_and_the_head_start_off(tmp_path):
    from scanmilter import app, config
    path = tmp_path / "scanmilter.toml"
    path.write_text("scan_cache_seconds = 0\nclamd_head_start = 0\n")
    cfg = config.load(str(path))                 # refused at start-up before: "must be more than 0 seconds"
    pipe = app.build_pipeline(cfg, POOL, None, None)
    assert not pipe.cache.enabled and pipe.head_start == 0
    for bad in ("scan_cache_seconds = -1\n", "clamd_head_start = -0.5\n", "clamd_timeout = 0\n"):
        path.write_text(bad)
        try:
            config.load(str(path))
        except config.ConfigError as e:
            assert "seconds" in str(e)
        else:
            raise AssertionError(f"{bad!r} was accepted")
    # both engines start at once: a virus reaches spamd too, and a repeat is scanned again
    spamd, clamd = Engine("spamd", HAM), Engine("clamd", VIRUS)
    pipe = Pipeline([spamd, clamd], POOL, cache=pipe.cache, head_start=0)
    for _ in range(2):
        pipe.inspect(spool(), ENVELOPE, policy(), key=b"k")
    assert (spamd.calls, clamd.calls) == (2, 2)
