"""End to end with non-default settings: the milter over TCP, a small message_size_limit with
oversize_action = reject, size limits of clamd below it, scan_failure_action = accept (fail open,
marked unscanned), the scan cache and clamd's head start off."""
import socket
import time
import uuid

import pytest

import stack as stacklib
from support import body_of, delivered_with, header_lines, make, not_delivered, send, spamd_saw, wait_summary

pytestmark = pytest.mark.integration

POLICY = '[inbound]\nscan_failure_action = "accept"\noversize_action = "reject"\n'


@pytest.fixture(scope="module")
def stack(stack_with):
    return stack_with(milter_inet_port=stacklib.free_port(), policy_text=POLICY,
                      # clamd takes 120 KB at most and unpacks no file over 60 KB (AlertExceedsMax is on):
                      # two bands below message_size_limit that must not pass unscanned
                      clamd_settings={"MaxFileSize": "60K", "MaxScanSize": "60K"},
                      scanmilter_settings={"message_size_limit": 200_000, "spool_memory_limit": 65536,
                                           "clamd_size_limit": 120_000,
                                           "spamd_timeout": 2.0, "clamd_timeout": 2.0,
                                           "scan_cache_seconds": 0, "clamd_head_start": 0})


def test_milter_over_tcp_delivers_clean_mail(stack):
    assert stack.postfix_milter.startswith("inet:127.0.0.1:")
    marker = uuid.uuid4().hex
    data = make(f"tcp {marker}")
    assert send(stack, data)["code"] == 250
    d = delivered_with(stack, marker)
    assert header_lines(d.data, "X-Virus-Status") == ["X-Virus-Status: clean"]
    assert body_of(d.data) == body_of(data)


def test_oversize_message_is_rejected_when_policy_says_so(stack):
    marker = uuid.uuid4().hex
    r = send(stack, make(f"big {marker}", body=f"{marker} padding padding padding\n" * 8000))
    assert r["code"] == 552 and "5.3.4" in r["reply"], r
    assert not_delivered(stack, marker)


def test_clamd_down_with_fail_open_delivers_marked_unscanned(stack):
    marker = uuid.uuid4().hex
    stack.stop_service("clamd")
    try:
        assert send(stack, make(f"fail-open {marker}"))["code"] == 250
    finally:
        stack.start_service("clamd")
    d = delivered_with(stack, marker)
    assert header_lines(d.data, "X-Virus-Status") == ["X-Virus-Status: unscanned (refused)"]
    assert header_lines(d.data, "X-Spam-Status")[0].startswith("X-Spam-Status: No, score=")


def test_spamd_that_accepts_but_never_answers_times_out(stack):
    marker = uuid.uuid4().hex
    stack.stop_service("spamd")
    silent = socket.socket()
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    silent.bind(("127.0.0.1", stack.spamd_port))
    silent.listen(16)                      # connections complete in the backlog; nobody answers
    try:
        start = time.monotonic()
        assert send(stack, make(f"spamd-hangs {marker}"))["code"] == 250
        assert time.monotonic() - start < 10      # spamd_timeout is 2 s
    finally:
        silent.close()
        stack.start_service("spamd")
    d = delivered_with(stack, marker)
    assert header_lines(d.data, "X-Spam-Status") == ["X-Spam-Status: unscanned (timeout)"]
    assert header_lines(d.data, "X-Virus-Status") == ["X-Virus-Status: clean"]


@pytest.mark.parametrize("size, why", [(150_000, "clamd:size"), (90_000, "clamd:limits")])
def test_mail_an_engine_skips_for_its_size_gets_the_oversize_rule(stack, size, why):
    """Between an engine's size limit and message_size_limit, mail is never passed unscanned:
    clamd_size_limit (skipped before sending) and clamd's own MaxFileSize (AlertExceedsMax)."""
    marker = uuid.uuid4().hex
    line = f"{marker} padding padding padding\n"
    body = line * (size // len(line))
    r = send(stack, make(f"band {marker}", body=body, msgid=f"<{marker}@outside.test>"))
    assert r["code"] == 552 and "5.3.4" in r["reply"], r
    line = wait_summary(stack, marker)
    assert "action=reject, reason=oversize" in line and why in line, line
    assert not_delivered(stack, marker)


def test_zero_turns_the_scan_cache_and_the_head_start_off(stack):
    marker = uuid.uuid4().hex
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    body = f"Our offers this week {marker}\n" + "Lots of words about products.\n" * 40
    for mid in (first, second):
        assert send(stack, make(f"Weekly offers {marker}", body=body, msgid=f"<{mid}@outside.test>"))["code"] == 250
    for mid in (first, second):
        assert "cached" not in wait_summary(stack, mid)
    deadline = time.monotonic() + 30
    while not (spamd_saw(stack, first) and spamd_saw(stack, second)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert spamd_saw(stack, first) and spamd_saw(stack, second)        # both copies scanned
    # no head start: spamd is asked about a virus at the same time as clamd
    virus = uuid.uuid4().hex
    r = send(stack, make(f"eicar {virus}", body=stacklib.eicar().decode() + "\n", msgid=f"<{virus}@outside.test>"))
    assert r["code"] == 550 and "Eicar-Test-Signature" in r["reply"], r
    assert "skipped=spamd:decided" not in wait_summary(stack, virus)
