"""The pool of one engine's servers (scanners/pool.py) with fake members: which member a message
goes to, failover within one deadline, each member at most once, the error when all failed,
and each member's own circuit breaker and metrics."""
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from scanmilter import config, scanners
from scanmilter.health import Health
from scanmilter.message import Spool
from scanmilter.metrics import Metrics
from scanmilter.scanners import CLEAN, ERROR, ScanResult
from scanmilter.scanners.clamd import ClamdScanner
from scanmilter.scanners.pool import Member, Pool
from scanmilter.scanners.spamd import SpamdScanner

from fakes import BadServer, Server


class FakeScanner:
    """A member's client: answers `outcome` (an error "kind: text" for ERROR); `gate` holds a
    scan until it is set; every scan is logged with the timeout it was given."""

    def __init__(self, name, outcome=CLEAN, detail="", gate=None, timeout=30.0, sleep=0.0):
        self.name, self.outcome, self.detail, self.gate, self.timeout = "clamd", outcome, detail, gate, timeout
        self.member, self.sleep = name, sleep
        self.calls = []           # shared through copy.copy: one log for the member
        self.ping_answer = ""

    def scan(self, spool):
        self.calls.append(self.timeout)
        if self.gate is not None:
            self.gate.wait(10)
        if self.sleep:
            time.sleep(min(self.sleep, self.timeout))
            if self.sleep >= self.timeout:
                return ScanResult("clamd", ERROR, "timeout: no answer in time", self.timeout)
        return ScanResult("clamd", self.outcome, self.detail, 0.01)

    def ping(self):
        return self.ping_answer


def pool(*scanners, timeout=30.0, health=None, metrics=None):
    return Pool("clamd", [Member(s.member, s) for s in scanners], timeout, health, metrics)


def test_ties_go_round_robin():
    a, b, c = FakeScanner("a"), FakeScanner("b"), FakeScanner("c")
    p = pool(a, b, c)
    for _ in range(6):
        assert p.scan(None).outcome == CLEAN
    assert (len(a.calls), len(b.calls), len(c.calls)) == (2, 2, 2)


def test_the_least_loaded_member_gets_the_message():
    gate = threading.Event()
    a, b = FakeScanner("a", gate=gate), FakeScanner("b")
    p = pool(a, b)
    busy = threading.Thread(target=p.scan, args=(None,))
    busy.start()                        # a takes the first message and holds it
    try:
        deadline = time.monotonic() + 5
        while not a.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in range(3):              # while a is busy, b gets every message
            p.scan(None)
        assert (len(a.calls), len(b.calls)) == (1, 3)
    finally:
        gate.set()
        busy.join(5)
    assert [m.in_flight for m in p.members] == [0, 0]


def test_a_failed_member_hands_the_message_to_the_next_once():
    a, b = FakeScanner("a", ERROR, "refused: connection refused"), FakeScanner("b")
    m = Metrics(CollectorRegistry())
    p = pool(a, b, metrics=m)
    for _ in range(4):
        r = p.scan(None)
        assert (r.engine, r.outcome) == ("clamd", CLEAN)
    assert len(b.calls) == 4 and len(a.calls) == 2       # a tried in its turns, never twice for one message
    assert m.registry.get_sample_value("scanmilter_member_failovers_total", {"engine": "clamd"}) == 2
    assert m.registry.get_sample_value("scanmilter_member_scan_errors_total",
                                       {"engine": "clamd", "member": "a", "kind": "refused"}) == 2
    assert m.registry.get_sample_value("scanmilter_member_scans_total",
                                       {"engine": "clamd", "member": "b", "outcome": "clean"}) == 4


@pytest.mark.parametrize("kind", ["refused", "timeout", "protocol"])
def test_every_member_failed_is_an_error_after_one_try_each(kind):
    members = [FakeScanner(n, ERROR, f"{kind}: broken") for n in "abc"]
    r = pool(*members).scan(None)
    assert (r.engine, r.outcome) == ("clamd", ERROR)
    assert scanners.error_kind(r.detail) == kind and "all 3 members tried" in r.detail
    assert [len(s.calls) for s in members] == [1, 1, 1]


def test_a_pool_of_one_keeps_the_engines_own_error():
    r = pool(FakeScanner("a", ERROR, "refused: connect to x: refused")).scan(None)
    assert (r.outcome, r.detail) == (ERROR, "refused: connect to x: refused")


def test_the_deadline_is_shared_out_and_never_exceeded():
    """A member that hangs gets its share of the deadline; the next gets what is left."""
    hang, ok = FakeScanner("hang", sleep=100), FakeScanner("ok")
    p = pool(hang, ok, timeout=1.0)
    start = time.monotonic()
    r = p.scan(None)
    took = time.monotonic() - start
    assert r.outcome == CLEAN and took < 1.0
    assert hang.calls == [pytest.approx(0.5, abs=0.05)]
    assert ok.calls and ok.calls[0] == pytest.approx(0.5, abs=0.05)


def test_when_the_deadline_is_spent_no_other_member_is_tried():
    hang, other = FakeScanner("hang", sleep=100), FakeScanner("other", sleep=100)
    p = pool(hang, other, timeout=0.6)
    start = time.monotonic()
    r = p.scan(None)
    assert r.outcome == ERROR and time.monotonic() - start < 0.6 + 0.2
    assert sum(hang.calls + other.calls) == pytest.approx(0.6, abs=0.05)


def test_a_dead_member_leaves_the_rotation_and_rejoins_when_it_answers():
    health = Health(None, failure_threshold=2, retry_interval=0.3)
    dead, ok = FakeScanner("dead", ERROR, "refused: down"), FakeScanner("ok")
    p = pool(dead, ok, health=health)
    for _ in range(6):
        assert p.scan(None).outcome == CLEAN
    assert len(dead.calls) == 2                    # then its circuit opened: not tried any more
    dead.outcome, dead.detail = CLEAN, ""          # it is back
    deadline = time.monotonic() + 5
    while len(dead.calls) == 2:                    # one message tries it again after retry_interval
        assert time.monotonic() < deadline, "the member never got a message again"
        p.scan(None)
    assert not health.member_open("clamd", "dead")
    before = len(dead.calls)
    for _ in range(4):
        p.scan(None)
    assert len(dead.calls) == before + 2           # back in the rotation, its turn every other message


def test_a_ping_closes_a_members_circuit():
    health = Health(None, failure_threshold=1, retry_interval=60)
    dead, ok = FakeScanner("dead", ERROR, "refused: down"), FakeScanner("ok")
    p = pool(dead, ok, health=health)
    p.scan(None)
    p.scan(None)
    assert health.member_open("clamd", "dead")
    dead.outcome, dead.ping_answer = CLEAN, "connect refused"
    assert p.ping() == ""                          # the engine answers: one member is enough
    assert health.member_open("clamd", "dead")
    dead.ping_answer = ""
    p.ping()
    assert not health.member_open("clamd", "dead")


def test_all_members_open_is_an_error_without_trying():
    health = Health(None, failure_threshold=1, retry_interval=60)
    a, b = FakeScanner("a", ERROR, "refused: x"), FakeScanner("b", ERROR, "refused: y")
    p = pool(a, b, health=health)
    p.scan(None)
    r = p.scan(None)
    assert (r.outcome, scanners.error_kind(r.detail)) == (ERROR, "circuit")
    assert (len(a.calls), len(b.calls)) == (1, 1)
    a.ping_answer = "refused"
    b.ping_answer = "refused"
    assert "a: refused" in p.ping() and "b: refused" in p.ping()


def test_member_metrics_and_circuit_state():
    m = Metrics(CollectorRegistry())
    health = Health(m, failure_threshold=1, retry_interval=60)
    p = pool(FakeScanner("a", ERROR, "timeout: x"), FakeScanner("b"), health=health, metrics=m)
    p.scan(None)
    get = m.registry.get_sample_value
    assert get("scanmilter_member_circuit_open", {"engine": "clamd", "member": "a"}) == 1
    assert get("scanmilter_member_up", {"engine": "clamd", "member": "a"}) == 0
    assert get("scanmilter_member_up", {"engine": "clamd", "member": "b"}) == 1
    assert get("scanmilter_member_scan_duration_seconds_count", {"engine": "clamd", "member": "b"}) == 1
    assert get("scanmilter_engine_up", {"engine": "clamd"}) is None     # the engine's own state is the pipeline's


def test_settings_take_one_address_or_a_list():
    cfg = config.parse(config.DAEMON_SETTINGS, {"clamd_socket": ["unix:/run/a.sock", "inet:127.0.0.1:3310"],
                                                "spamd_socket": "inet:127.0.0.1:783"}, "test")
    engines = {e.name: e for e in scanners.from_settings(cfg)}
    clamd, spamd = engines["clamd"], engines["spamd"]
    assert [m.name for m in clamd.members] == ["unix:/run/a.sock", "inet:127.0.0.1:3310"]
    assert [m.scanner.address for m in clamd.members] == [("unix", "/run/a.sock"), ("inet", ("127.0.0.1", 3310))]
    assert all(isinstance(m.scanner, ClamdScanner) for m in clamd.members)
    assert [m.name for m in spamd.members] == ["inet:127.0.0.1:783"]
    assert isinstance(spamd.members[0].scanner, SpamdScanner)
    assert clamd.timeout == cfg.clamd_timeout and spamd.timeout == cfg.spamd_timeout


@pytest.mark.parametrize("value, words", [
    ([], "non-empty list"),
    (["unix:/a", "unix:/a"], "listed twice"),
    (["unix:/a", "/b"], 'expected "unix:/path"'),
    ([1], "non-empty list"),
    (3, "non-empty list"),
])
def test_bad_member_lists_are_refused(value, words):
    with pytest.raises(config.ConfigError, match=words):
        config.parse(config.DAEMON_SETTINGS, {"spamd_socket": value}, "test")


def _clamd_ok(server, conn):
    server.read_all(conn, until=lambda data: data.endswith(b"\0\0\0\0"))
    conn.sendall(b"stream: OK\0")
    conn.close()


def test_a_real_client_that_hangs_gives_way_to_the_next_member(tmp_path):
    """Real clamd clients: the first address accepts and never answers, the second answers; the
    scan moves on and ends clean within the engine's deadline."""
    hang = BadServer("hang", unix_path=tmp_path / "hang.sock")
    ok = Server(_clamd_ok, unix_path=tmp_path / "ok.sock")
    try:
        cfg = config.parse(config.DAEMON_SETTINGS, {
            "clamd_socket": [f"unix:{tmp_path}/hang.sock", f"unix:{tmp_path}/ok.sock"], "files_enabled": False,
            "clamd_timeout": 1.0, "spamd_enabled": False}, "test")
        [clamd] = scanners.from_settings(cfg)
        spool = Spool(1024, 1024)
        spool.write(b"Subject: x\r\n\r\nbody\r\n")
        start = time.monotonic()
        r = clamd.scan(spool)
        took = time.monotonic() - start
    finally:
        hang.close()
        ok.close()
    assert r.outcome == CLEAN and 0.4 < took < 1.0, (r, took)
    assert len(hang.conns) == 1 and len(ok.received) == 1


def test_postfix_check_names_each_dead_member_and_errs_when_none_answers(tmp_path):
    from scanmilter.commands import postfix_check
    ok = Server(lambda server, conn: (conn.recv(100), conn.sendall(b"PONG\0")), unix_path=tmp_path / "ok.sock")
    try:
        one_dead = config.parse(config.DAEMON_SETTINGS, {
            "clamd_socket": [f"unix:{tmp_path}/ok.sock", f"unix:{tmp_path}/gone.sock"],
            "spamd_socket": f"inet:127.0.0.1:1", "engine_check_timeout": 1.0}, "test")
        findings, passed = postfix_check.engine_checks(one_dead)
    finally:
        ok.close()
    assert [(f.level, f.text.split(": ")[0]) for f in findings] == \
        [("warning", f"clamd member unix:{tmp_path}/gone.sock does not answer")]
    assert passed == ["clamd: 1 of 2 members answered"]      # a single spamd is not pinged here
    all_dead = config.parse(config.DAEMON_SETTINGS, {
        "clamd_socket": [f"unix:{tmp_path}/a.sock", f"unix:{tmp_path}/b.sock"], "spamd_enabled": False}, "test")
    findings, passed = postfix_check.engine_checks(all_dead)
    assert [f.level for f in findings] == ["error", "error"] and passed == ["clamd: 0 of 2 members answered"]
