"""Pools end to end through real Postfix, with two clamd and two spamd started by the test stack:
one member of each killed with SIGKILL under a steady stream of mail (no tempfail, each message
delivered or rejected once), the killed members back in the rotation within
engine_retry_interval, every member of an engine dead (tempfail as with one server), and a
member that accepts and never answers (its scans move on within the deadline, no thread stuck)."""
import concurrent.futures
import os
import re
import signal
import threading
import time
import uuid

import pytest

import procs
import stack as stacklib
from fakes import BadServer
from support import GTUBE, delivered_with, make, not_delivered, scrape, send, wait_for

pytestmark = pytest.mark.integration

ENGINE_TIMEOUT = 6.0
RETRY_INTERVAL = 1.5


@pytest.fixture(scope="module")
def stack(stack_with):
    return stack_with(clamd_members=2, spamd_members=2, scanmilter_settings={
        "clamd_timeout": ENGINE_TIMEOUT, "spamd_timeout": ENGINE_TIMEOUT,
        "engine_retry_interval": RETRY_INTERVAL, "engine_failure_threshold": 2,
        # members come back through the messages that try them, not through the periodic check
        "engine_check_interval": 600.0, "scan_cache_seconds": 0})


def threads(stack):
    pid = stack.pids("scanmilter")[0][0]
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"Threads:\s+(\d+)", f.read()).group(1))


def member_scans(stack, name, outcome=None):
    """Scans the daemon sent to one member (a stack service name), by its metrics."""
    engine, address = name.partition("-")[0], stack.member_address(name)
    return sum(v for (metric, labels), v in scrape(stack).items()
               if metric == "scanmilter_member_scans_total" and ("engine", engine) in labels
               and ("member", address) in labels and (outcome is None or ("outcome", outcome) in labels))


def kill(stack, name):
    """SIGKILL a member and its children (spamd's), as a crash would."""
    [(pid, _)] = stack.pids(name)
    os.killpg(pid, signal.SIGKILL)
    stack.process(name).wait(10)


def message(kind, marker):
    body = {"ham": "Hello,\nan ordinary message.\n", "gtube": f"Hello,\n{GTUBE}\n",
            "eicar": stacklib.eicar().decode() + "\n"}[kind]
    return make(f"pool {kind} {marker}", body=body, msgid=f"<{marker}@outside.test>")


def test_killing_one_member_of_each_engine_under_load_loses_nothing(stack):
    sessions, per_session = 4, 12
    kinds = ["ham", "gtube", "eicar", "ham"]
    markers = {f"pool{uuid.uuid4().hex}": kinds[i % len(kinds)] for i in range(sessions * per_session)}
    plan = list(markers.items())
    answers, sent = {}, threading.Semaphore(0)
    assert all(member_scans(stack, n) == 0 for n in ("clamd-2", "spamd-2"))

    def session(part):
        for marker, kind in part:
            answers[marker] = send(stack, message(kind, marker))
            sent.release()

    with concurrent.futures.ThreadPoolExecutor(sessions) as senders:
        running = [senders.submit(session, plan[i::sessions]) for i in range(sessions)]
        for _ in range(len(plan) // 3):        # a third of the mail is through: kill
            assert sent.acquire(timeout=120)
        assert member_scans(stack, "clamd-2") > 0 and member_scans(stack, "spamd-2") > 0
        kill(stack, "clamd-2")
        kill(stack, "spamd-2")
        for r in running:
            r.result(timeout=300)
    codes = {m: a["code"] for m, a in answers.items()}
    assert not [m for m, c in codes.items() if 400 <= c < 500], codes
    stack.wait_drained()
    delivered = [d.message()["Message-ID"] for d in stack.delivered()]
    for marker, kind in markers.items():
        copies = delivered.count(f"<{marker}@outside.test>")
        if kind == "ham":
            assert codes[marker] == 250 and copies == 1, (marker, codes[marker], copies)
        else:
            assert 500 <= codes[marker] < 600 and copies == 0, (marker, kind, answers[marker], copies)
    log = stack.logs["scanmilter"].read_text()
    assert "scan failed" not in log, log[-3000:]


def test_killed_members_started_again_get_mail_within_the_retry_interval(stack):
    for name in ("clamd-2", "spamd-2"):
        if any(procs.alive(pid, start) for pid, start in stack.pids(name)):
            kill(stack, name)
    # make sure both members are known dead: their circuits open
    for _ in range(4):
        assert send(stack, make("pool warm-up"))["code"] == 250
    before = {n: member_scans(stack, n, "clean") for n in ("clamd-2", "spamd-2")}
    stack.start_service("clamd-2")
    stack.start_service("spamd-2")
    back = time.monotonic()
    waited = {}
    while len(waited) < 2:
        assert send(stack, make("pool back"))["code"] == 250
        for n in ("clamd-2", "spamd-2"):
            if n not in waited and member_scans(stack, n, "clean") > before[n]:
                waited[n] = time.monotonic() - back
        assert time.monotonic() - back < RETRY_INTERVAL + 10, waited
    # one message tries an open member every retry_interval; one more message's time on top
    assert all(w <= RETRY_INTERVAL + 1.5 for w in waited.values()), waited


@pytest.mark.parametrize("engine", ["clamd", "spamd"])
def test_every_member_of_an_engine_dead_tempfails_as_with_one(stack, engine):
    names = stack.members(engine)
    for name in names:
        stack.stop_service(name)
    try:
        marker = uuid.uuid4().hex
        r = send(stack, make(f"pool all dead {marker}"))
        assert r["code"] == 451 and "4.7.1" in r["reply"], r
        assert not_delivered(stack, marker)
        assert f"{engine} scan failed: refused" in stack.logs["scanmilter"].read_text()
    finally:
        for name in names:
            stack.start_service(name)
    wait_for(lambda: send(stack, make(f"pool back {marker}"))["code"] == 250, f"{engine} back", timeout=30)


@pytest.mark.parametrize("engine", ["clamd", "spamd"])
def test_a_hanging_member_gives_way_within_the_deadline_and_leaves_no_thread(stack, engine):
    baseline = threads(stack)
    name = f"{engine}-2"
    stack.stop_service(name)
    if engine == "clamd":
        bad = BadServer("hang", unix_path=stack.member_clamd_socket(name))
    else:
        bad = BadServer("hang", port=stack.member_port(name))
    try:
        markers = []
        for _ in range(4):          # the first ones each wait for the hanging member, then its circuit opens
            marker = uuid.uuid4().hex
            start = time.monotonic()
            r = send(stack, make(f"pool hang {marker}"))
            took = time.monotonic() - start
            assert r["code"] == 250, r
            assert took < ENGINE_TIMEOUT + 2, took
            markers.append(marker)
        assert bad.conns, "the hanging member was never tried"
        for marker in markers:
            delivered_with(stack, marker)
    finally:
        bad.close()
        stack.start_service(name)
    errors = scrape(stack)
    assert any(metric == "scanmilter_member_scan_errors_total" and ("kind", "timeout") in labels
               and ("member", stack.member_address(name)) in labels and v > 0
               for (metric, labels), v in errors.items())
    # the threads that waited on the hanging member are gone
    wait_for(lambda: threads(stack) <= baseline + 1, f"threads back to {baseline}", timeout=ENGINE_TIMEOUT + 5)


def test_selftest_and_postfix_check_check_every_member(stack):
    from scanmilter import config
    from scanmilter.commands import postfix_check
    from support import scanmilter
    ok = scanmilter(stack, "selftest", timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    members = [f"{e} member {stack.member_address(n)}" for e in ("spamd", "clamd") for n in stack.members(e)]
    assert [ln.split(":")[0] for ln in ok.stdout.splitlines()] == \
        ["PASS clean", "PASS gtube", "PASS eicar"] + [f"PASS {m.split(':')[0]}" for m in members], ok.stdout
    assert all(f"PASS {m}: answers" in ok.stdout for m in members), ok.stdout
    cfg = config.load(str(stack.milter_config))
    findings, passed = postfix_check.engine_checks(cfg)
    assert not findings and passed == ["spamd: 2 of 2 members answered", "clamd: 2 of 2 members answered"]
    stack.stop_service("spamd-2")
    try:
        bad = scanmilter(stack, "selftest", timeout=120)
        findings, passed = postfix_check.engine_checks(cfg)
    finally:
        stack.start_service("spamd-2")
    # the pool still answers every case; the dead member is named
    assert bad.returncode == 1 and "PASS clean" in bad.stdout and "PASS gtube" in bad.stdout, bad.stdout
    assert f"FAIL spamd member {stack.member_address('spamd-2')}: " in bad.stdout, bad.stdout
    assert [(f.level, f.text.split(": ")[0]) for f in findings] == \
        [("warning", f"spamd member {stack.member_address('spamd-2')} does not answer")], findings
    assert passed == ["spamd: 1 of 2 members answered", "clamd: 2 of 2 members answered"]
