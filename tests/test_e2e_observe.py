"""End to end: metrics after real mail, engine health, state-change logging, selftest."""
import os
import re
import shlex
import signal
import subprocess
import uuid

import pytest

import stack as stacklib
from conftest import ROOT, new_stack
from support import GTUBE, OUTSIDE, delivered_with, get, make, scanmilter, scrape, send, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(stack_with):
    return stack_with(scanmilter_settings={"engine_check_interval": 0.5, "engine_failure_threshold": 3,
                                           "engine_retry_interval": 1.0,
                                           "clamd_head_start": 10.0})     # see test_e2e.stack


def test_metrics_move_by_exactly_the_expected_amounts(stack):
    before = scrape(stack)
    marker = uuid.uuid4().hex
    assert send(stack, make(f"clean {marker}"))["code"] == 250
    assert send(stack, make(f"gtube {marker}", body=GTUBE + "\n"))["code"] == 550
    assert send(stack, make(f"eicar {marker}", body=stacklib.eicar().decode() + "\n"))["code"] == 550
    delivered_with(stack, marker)
    after = scrape(stack)

    def delta(name, **labels):
        return get(after, name, **labels) - get(before, name, **labels)
    assert delta("scanmilter_messages_total", direction="inbound", action="accept") == 1
    assert delta("scanmilter_messages_total", direction="inbound", action="reject") == 2
    assert delta("scanmilter_recipients_total", action="reject") == 2
    assert delta("scanmilter_decisions_total", reason="spam") == 1
    assert delta("scanmilter_decisions_total", reason="virus") == 1
    assert delta("scanmilter_scans_total", engine="clamd", outcome="clean") == 2
    assert delta("scanmilter_scans_total", engine="clamd", outcome="found") == 1
    assert delta("scanmilter_scans_total", engine="spamd", outcome="found") == 1
    # EICAR is rejected whatever its score: spamd is never asked about it
    assert delta("scanmilter_scans_total", engine="spamd", outcome="skipped") == 1
    assert delta("scanmilter_scan_duration_seconds_count", engine="clamd") == 3
    assert delta("scanmilter_scan_duration_seconds_count", engine="spamd") == 2
    assert delta("scanmilter_decision_duration_seconds_count") == 3
    assert delta("scanmilter_message_size_bytes_count") == 3
    assert delta("scanmilter_spam_score_count", direction="inbound") == 2
    # cumulative buckets: the clean message scores low; GTUBE (1000) lies above 100
    assert delta("scanmilter_spam_score_bucket", direction="inbound", le="100.0") == 1
    assert delta("scanmilter_spam_score_bucket", direction="inbound", le="+Inf") == 2
    assert delta("scanmilter_scan_cache_hits_total", engine="spamd") == 0
    # a second copy of the clean message (another Message-ID and recipient) comes from the cache
    copy = make(f"clean {marker}").replace(b"To: bob@example.com", b"To: carol@example.com")
    assert send(stack, copy)["code"] == 250
    again = scrape(stack)
    for engine in ("clamd", "spamd"):
        hits, scans = "scanmilter_scan_cache_hits_total", "scanmilter_scan_duration_seconds_count"
        assert get(again, hits, engine=engine) - get(after, hits, engine=engine) == 1
        assert get(again, scans, engine=engine) == get(after, scans, engine=engine)
    assert get(after, "scanmilter_engine_up", engine="clamd") == 1
    assert get(after, "scanmilter_build_info", version=__import__("scanmilter").__version__,
               python=__import__("platform").python_version()) == 1
    assert get(after, "scanmilter_messages_in_flight") == 0


def test_engine_down_flips_the_up_gauge_and_logs_once(stack):
    stack.stop_service("clamd")
    try:
        assert wait_for(lambda: get(scrape(stack), "scanmilter_engine_up", engine="clamd") == 0, "clamd down",
                        timeout=10)
        for _ in range(4):          # failures in a row open the circuit: later ones fail at once
            r = send(stack, make("while clamd is down"))
            assert r["code"] == 451, r
        values = scrape(stack)
        assert get(values, "scanmilter_engine_circuit_open", engine="clamd") == 1
        assert get(values, "scanmilter_scan_errors_total", engine="clamd", kind="circuit") >= 1
    finally:
        stack.start_service("clamd")
    assert wait_for(lambda: get(scrape(stack), "scanmilter_engine_up", engine="clamd") == 1, "clamd up", timeout=10)
    assert get(scrape(stack), "scanmilter_engine_circuit_open", engine="clamd") == 0
    log = stack.logs["scanmilter"].read_text()
    assert log.count("warning: clamd is down") == 1           # once per state change, not per message
    assert log.count("clamd is back up") == 1
    marker = uuid.uuid4().hex
    assert send(stack, make(f"after recovery {marker}"))["code"] == 250


def selftest(stack):
    return scanmilter(stack, "selftest", timeout=120)


def test_selftest_passes_and_fails_when_clamd_is_stopped(stack):
    ok = selftest(stack)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    lines = ok.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["PASS clean", "PASS gtube", "PASS eicar"]
    assert "Eicar-Test-Signature" in lines[2]
    stack.stop_service("clamd")
    try:
        bad = selftest(stack)
    finally:
        stack.start_service("clamd")
    assert bad.returncode == 1
    assert "FAIL clean" in bad.stdout and "FAIL eicar" in bad.stdout and "Traceback" not in bad.stderr


# EICAR and GTUBE held, not refused: virus_action "quarantine", and GTUBE's score (about 1000)
# lies between quarantine_level and reject_level
HOLDING_POLICY = """
[inbound]
virus_action = "quarantine"
quarantine_level = 8.0
reject_level = inf
quarantine_action = "discard"
"""
# the same held through [virus_classes], with a 550 reply to the sender
HOLDING_POLICY_REJECT = """
[inbound]
quarantine_level = 8.0
reject_level = inf
quarantine_action = "reject"
[virus_classes]
"Eicar-*" = "quarantine"
"""


def quarantine_list(stack):
    return scanmilter(stack, "quarantine", "list")


# Postfix asks for selftest's mark among its connect macros (it has no value to send for it: its
# macros are its own attributes)
ASKING_MACROS = {"milter_connect_macros": "{scanmilter_selftest} " + stacklib.MILTER_CONNECT_MACROS}


def test_selftest_judges_by_a_policy_that_quarantines_and_holds_nothing():
    with new_stack("selftest-q", policy_text=HOLDING_POLICY, quarantine=True, postfix_settings=ASKING_MACROS) as s:
        assert "milter_connect_macros = {scanmilter_selftest} j " in (s.postfix_conf / "main.cf").read_text()
        ok = selftest(s)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        lines = ok.stdout.splitlines()
        assert [line.split(":")[0] for line in lines] == ["PASS clean", "PASS gtube", "PASS eicar"]
        assert lines[1].startswith("PASS gtube: discard;") and "not stored: self test" in lines[1]
        assert lines[2].startswith("PASS eicar: discard;") and "Eicar-Test-Signature" in lines[2]
        listed = quarantine_list(s)
        assert (listed.returncode, listed.stdout.strip()) == (0, "Quarantine is empty"), listed.stdout + listed.stderr
        # the test messages went nowhere: nothing reached Postfix, nothing was delivered
        assert s.delivered() == [] and s.queue_empty() and "SELFTEST" not in s.postfix_log()
        log = s.logs["scanmilter"].read_text()
        assert log.count("self test: would quarantine") == 2 and "quarantined as" not in log

        # the same policy holds real mail from Postfix, even one that asks for the self-test mark
        r = s.send(make("a real virus", body=stacklib.eicar().decode() + "\n"), "alice@outside.test",
                   ["bob@example.com"], xclient_addr=OUTSIDE)
        assert r["code"] == 250, r
        s.wait_logged("quarantined as")
        listed = quarantine_list(s)
        assert listed.returncode == 0 and "Eicar" in listed.stdout and "1 entry" in listed.stdout, listed.stdout

        # [virus_classes] and quarantine_action = "reject": the sender's answer is quarantine_reply
        (s.milter_config.parent / "policy.toml").write_text(HOLDING_POLICY_REJECT)
        reloads = len(s.wait_logged("reloaded configuration", count=0))
        [(pid, _)] = s.pids("scanmilter")
        os.kill(pid, signal.SIGHUP)
        s.wait_logged("reloaded configuration", count=reloads + 1)
        ok = selftest(s)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        lines = ok.stdout.splitlines()
        assert lines[2].startswith("PASS eicar: 550 5.7.1 Message held for review by the postmaster;"), lines
        assert '"Eicar-*"' in lines[2] and "not stored: self test" in lines[2]
        listed = quarantine_list(s)
        assert "1 entry" in listed.stdout, listed.stdout          # still only the real message


def readme_swaks() -> list[str]:
    """The README's swaks command for an inbound test from the server itself."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Trying it from the server itself", 1)[1].split("\n## ", 1)[0]
    assert "smtpd_authorized_xclient_hosts = 127.0.0.1\n" in section        # the main.cf line, exactly
    [line] = [ln for ln in section.split("```sh\n", 1)[1].split("```", 1)[0].splitlines() if ln.startswith("swaks ")]
    return shlex.split(line)


def swaks(stack, args: list[str], marker: str) -> str:
    args = [{"127.0.0.1": f"127.0.0.1:{stack.smtp_port}", "someone@yourdomain": "bob@example.com"}.get(a, a)
            for a in args]
    r = subprocess.run([*args, "--header", f"Subject: {marker}", "--from", "admin@example.com"],
                       capture_output=True, text=True, timeout=120)
    return r.stdout + r.stderr


def test_mail_from_the_box_is_outbound_and_the_readme_xclient_command_tests_inbound(stack):
    command = readme_swaks()
    gtube_body = command.index("--body")
    # the README's command: inbound, refused by the [inbound] spam reply
    out = swaks(stack, command, uuid.uuid4().hex)
    assert "<** 550 5.7.1 Message rejected as spam (score " in out, out
    # the same without XCLIENT: loopback is internal, so the [outbound] policy answers
    plain = [a for i, a in enumerate(command) if not a.startswith("--xclient")
             and not command[i - 1].startswith("--xclient")]
    out = swaks(stack, plain, uuid.uuid4().hex)
    assert "<** 550 5.7.1 Your message was not sent: it looks like spam" in out, out
    # without --body: swaks's own clean message, delivered with the inbound scan headers
    marker = uuid.uuid4().hex
    out = swaks(stack, command[:gtube_body] + command[gtube_body + 2:], marker)
    assert "<-  250 2.0.0 Ok: queued" in out, out
    d = delivered_with(stack, marker)
    # inbound scan headers (swaks's bare message from a documentation address may score enough for a tag)
    assert b"\nX-Virus-Status: clean\n" in d.data and re.search(rb"\nX-Spam-Status: (Yes|No), score=", d.data)
