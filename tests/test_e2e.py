"""End to end: real Postfix -> scanmilter -> real clamd and spamd -> a sink, all on loopback.

The stack (tools/stack.py) is started once for the module; each test sends mail through
Postfix with smtplib and looks at the SMTP answer and at what reached the sink.
"""
import os
import re
import time
import uuid

import pytest

import procs
import stack as stacklib
from support import (GTUBE, OUTSIDE, body_of, delivered_with, header_lines, make, not_delivered, peak_rss_kib,
                     raw_message, send, spamd_result, spamd_saw, summary_line, summary_lines)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(stack_with):
    # a long clamd head start: on a busy machine clamd may need more than the default 0.1 s, and
    # whether EICAR reaches spamd must not depend on that here
    return stack_with(scanmilter_settings={"log_level": "debug", "clamd_head_start": 10.0})


def test_clean_mail_is_delivered_with_our_headers(stack):
    marker = uuid.uuid4().hex
    data = make(f"clean {marker}")
    r = send(stack, data)
    assert r["code"] == 250, r
    d = delivered_with(stack, marker)
    assert d.recipients == ["bob@example.com"]
    assert header_lines(d.data, "X-Virus-Status") == ["X-Virus-Status: clean"]
    status = header_lines(d.data, "X-Spam-Status")
    assert len(status) == 1 and re.match(r"X-Spam-Status: No, score=-?\d+\.\d required=5\.0 tests=", status[0])
    assert header_lines(d.data, "X-Spam-Flag") == []
    # the body reaches the sink unchanged
    assert body_of(d.data) == body_of(data)


def test_one_summary_line_per_message_keyed_by_queue_id(stack):
    marker = uuid.uuid4().hex
    assert send(stack, make(f"logged {marker}", msgid=f"<{marker}@outside.test>"))["code"] == 250
    delivered_with(stack, marker)
    qid, lines = summary_lines(stack, marker)
    assert len(lines) == 1
    assert re.fullmatch(rf"{qid}: action=accept, reason=ham, direction=inbound, virus=-, score=-?\d+\.\d, "
                        rf"from=<alice@outside.test>, rcpts=1, size=\d+, ms=\d+, client={OUTSIDE}", lines[0])


def test_gtube_is_rejected(stack):
    marker = uuid.uuid4().hex
    r = send(stack, make(f"gtube {marker}", body=f"{GTUBE}\n"))
    assert r["code"] == 550 and "5.7.1" in r["reply"] and "spam" in r["reply"], r
    assert not_delivered(stack, marker)


def test_eicar_is_rejected_naming_the_virus(stack):
    marker = uuid.uuid4().hex
    r = send(stack, make(f"eicar {marker}", body=stacklib.eicar().decode() + "\n"))
    assert r["code"] == 550 and "5.7.1" in r["reply"], r
    assert "Eicar-Test-Signature" in r["reply"]
    assert not_delivered(stack, marker)


def test_eicar_as_a_base64_attachment_is_rejected(stack):
    marker = uuid.uuid4().hex
    data = make(f"attachment {marker}", attachment=stacklib.eicar())
    assert b"multipart/mixed" in data and b"base64" in data
    r = send(stack, data)
    assert r["code"] == 550 and "Eicar-Test-Signature" in r["reply"], r
    assert not_delivered(stack, marker)


def test_forged_verdict_headers_are_removed(stack):
    marker = uuid.uuid4().hex
    data = make(f"forged {marker}", extra=[("X-Spam-Flag", "YES"), ("X-Virus-Status", "clean (trust me)"),
                                           ("x-spam-status", "No, score=-100")])
    assert send(stack, data)["code"] == 250
    d = delivered_with(stack, marker)
    assert header_lines(d.data, "X-Spam-Flag") == []
    assert header_lines(d.data, "X-Virus-Status") == ["X-Virus-Status: clean"]
    assert len(header_lines(d.data, "X-Spam-Status")) == 1
    assert "score=-100" not in d.data.decode("utf-8", "replace")


def test_subject_is_tagged_once_between_tag_and_reject_level(stack):
    marker = uuid.uuid4().hex
    assert send(stack, make(f"scanmilter-tag-test {marker}"))["code"] == 250
    d = delivered_with(stack, marker)
    assert header_lines(d.data, "Subject") == [f"Subject: [SPAM] scanmilter-tag-test {marker}"]
    assert header_lines(d.data, "X-Spam-Flag") == ["X-Spam-Flag: YES"]
    assert "SCANMILTER_TAG_TEST" in "".join(header_lines(d.data, "X-Spam-Status"))
    # already tagged: never twice
    marker2 = uuid.uuid4().hex
    assert send(stack, make(f"[SPAM] scanmilter-tag-test {marker2}"))["code"] == 250
    d2 = delivered_with(stack, marker2)
    assert header_lines(d2.data, "Subject") == [f"Subject: [SPAM] scanmilter-tag-test {marker2}"]


def test_clamd_down_tempfails_and_clamd_back_delivers(stack):
    marker = uuid.uuid4().hex
    data = make(f"clamd-down {marker}")
    stack.stop_service("clamd")
    try:
        r = send(stack, data)
        assert r["code"] == 451 and "4.7.1" in r["reply"], r
        assert not_delivered(stack, marker)
    finally:
        stack.start_service("clamd")
    r = send(stack, data)                    # the sender's retry
    assert r["code"] == 250, r
    delivered_with(stack, marker)
    assert "clamd scan failed: refused" in stack.logs["scanmilter"].read_text()


def test_large_message_spills_to_disk_and_arrives_intact(stack):
    marker = uuid.uuid4().hex
    body = "".join(f"line {i:07d} of a large but ordinary message {marker}\n" for i in range(40000))
    data = make(f"large {marker}", body=body)           # about 2.5 MB: over spamd_size_limit
    assert send(stack, data)["code"] == 250
    d = delivered_with(stack, marker, timeout=60)
    assert body_of(d.data) == body_of(data)
    assert header_lines(d.data, "X-Virus-Status") == ["X-Virus-Status: clean"]
    # spamd scores its first spamd_size_limit bytes (spamd_oversize_action = "truncate")
    assert header_lines(d.data, "X-Spam-Status")[0].startswith("X-Spam-Status: No, score=")


def test_50_mb_message_does_not_grow_memory(stack):
    pid = stack.pids("scanmilter")[0][0]
    marker = uuid.uuid4().hex
    # warm up: one ordinary message so that lazily built parts exist before measuring
    assert send(stack, make(f"warm {marker}"))["code"] == 250
    before = peak_rss_kib(pid)
    line = ("%s 0123456789abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ\n" % marker)
    body = line * (50_000_000 // len(line))
    r = send(stack, make(f"huge {marker}", body=body))
    assert r["code"] == 250, r
    growth_mib = (peak_rss_kib(pid) - before) / 1024
    print(f"peak RSS growth for a 50 MB message: {growth_mib:.1f} MiB")
    assert growth_mib < 8


def test_scanmilter_stops_cleanly_on_sigterm(stack):
    import signal
    [(pid, _)] = stack.pids("scanmilter")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while procs.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert not procs.alive(pid)
        assert stack.process("scanmilter").wait(timeout=5) == 0
        assert "stopped" in stack.logs["scanmilter"].read_text()
    finally:
        stack.start_service("scanmilter")
    marker = uuid.uuid4().hex
    assert send(stack, make(f"after restart {marker}"))["code"] == 250


def test_copies_of_a_bulk_mailing_are_scanned_once(stack):
    marker = uuid.uuid4().hex
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    body = f"Our offers this week {marker}\n" + "Lots of words about products.\n" * 40
    for rcpt, mid in (("bob@example.com", first), ("carol@example.com", second)):
        data = make(f"Weekly offers {marker}", body=body, msgid=f"<{mid}@outside.test>")
        assert send(stack, data, rcpt=rcpt)["code"] == 250
    copies = []
    deadline = time.monotonic() + 30
    while len(copies) < 2 and time.monotonic() < deadline:
        copies = [d for d in stack.delivered() if marker.encode() in d.data]
        time.sleep(0.1)
    stack.wait_drained()                         # no third copy on its way
    copies = [d for d in stack.delivered() if marker.encode() in d.data]
    assert len(copies) == 2
    statuses = {header_lines(d.data, "X-Spam-Status")[0] for d in copies}
    assert len(statuses) == 1                    # the same verdict on both copies
    assert spamd_saw(stack, first) and not spamd_saw(stack, second)
    assert "cached" not in summary_line(stack, first)
    assert "cached=spamd,clamd" in summary_line(stack, second)


def test_a_rejected_virus_is_never_sent_to_spamd(stack):
    marker = uuid.uuid4().hex
    r = send(stack, make(f"eicar-alone {marker}", body=stacklib.eicar().decode() + "\n",
                         msgid=f"<{marker}@outside.test>"))
    assert r["code"] == 550 and "Eicar-Test-Signature" in r["reply"], r
    log = stack.logs["scanmilter"].read_text()
    line = next(ln for ln in log.splitlines() if "Eicar-Test-Signature" in ln and "skipped=" in ln)
    assert "action=reject, reason=virus" in line and "skipped=spamd:decided" in line, line
    assert not spamd_saw(stack, marker)


def test_a_cached_verdict_never_covers_a_message_decoded_differently(stack):
    """Cache poisoning: EICAR in base64 declared text/plain is clean and cached; the same client,
    From, Subject and body declared as a base64 .exe attachment must be scanned, not cached."""
    import base64
    marker = uuid.uuid4().hex
    body = base64.encodebytes(stacklib.eicar()).replace(b"\n", b"\r\n")
    common = [("From", "Alice <alice@outside.test>"), ("To", "bob@example.com"), ("Subject", f"invoice {marker}"),
              ("MIME-Version", "1.0")]
    plain = raw_message(common + [("Message-ID", f"<{marker}-1@outside.test>"),
                                  ("Content-Type", "text/plain")], body)
    exe = raw_message(common + [("Message-ID", f"<{marker}-2@outside.test>"),
                                ("Content-Type", 'application/octet-stream; name="invoice.exe"'),
                                ("Content-Transfer-Encoding", "base64")], body)
    assert send(stack, plain)["code"] == 250
    delivered_with(stack, marker)
    r = send(stack, exe)
    assert r["code"] == 550 and "Eicar-Test-Signature" in r["reply"], r
    stack.wait_drained()
    assert len([d for d in stack.delivered() if marker.encode() in d.data]) == 1


def test_spamd_sees_the_client_through_a_received_line_of_our_own(stack):
    marker = uuid.uuid4().hex
    data = make(f"relay {marker}", msgid=f"<{marker}@outside.test>")
    assert send(stack, data)["code"] == 250
    d = delivered_with(stack, marker)
    status = "".join(header_lines(d.data, "X-Spam-Status"))
    # the test rule matches 203.0.113.7 as the first untrusted relay
    assert "SCANMILTER_RELAY_TEST" in status and "NO_RELAYS" not in status and "NO_RECEIVED" not in status, status
    # the delivered message carries Postfix's own Received line only: ours went to spamd alone
    received = header_lines(d.data, "Received")
    assert len(received) == 1 and f"[{OUTSIDE}]" in received[0], received
    assert body_of(d.data) == body_of(data)


def test_spamd_sees_an_authenticated_sender_as_authenticated(stack):
    marker = uuid.uuid4().hex
    r = stack.send(make(f"auth {marker}", msgid=f"<{marker}@outside.test>"), "alice@outside.test",
                   ["bob@example.com"], xclient_addr=OUTSIDE, xclient_login="alice")
    assert r["code"] == 250, r
    delivered_with(stack, marker)
    line = spamd_result(stack, marker)
    assert "ALL_TRUSTED" in line and "SCANMILTER_RELAY_TEST" not in line and "NO_RELAYS" not in line, line
