"""End to end with non-default settings: the milter over TCP, a small message_size_limit with
oversize_action = reject, and scan_failure_action = accept (fail open, marked unscanned)."""
import socket
import time
import uuid

import pytest

import stack as stacklib
from conftest import scratch
from test_e2e import OUTSIDE, body_of, delivered_with, header_lines, make, not_delivered

pytestmark = pytest.mark.integration

POLICY = '[inbound]\nscan_failure_action = "accept"\noversize_action = "reject"\n'


@pytest.fixture(scope="module")
def stack():
    root = scratch("scanmilter-e2e-opt-")
    s = stacklib.Stack(root, smtp_port=stacklib.free_port(), milter_inet_port=stacklib.free_port(),
                       policy_text=POLICY,
                       scanmilter_settings={"message_size_limit": 200_000, "spool_memory_limit": 65536,
                                            "spamd_timeout": 2.0, "clamd_timeout": 2.0})
    s.start()
    yield s
    s.stop()


def send(stack, data):
    return stack.send(data, "alice@outside.test", ["bob@example.com"], xclient_addr=OUTSIDE)


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
