"""End to end through real Postfix and spamd: per-user spamd (spamd_user = "%r"). spamd reads
each virtual user's user_prefs (tools/stack.py spamd_virtual_users), so one message scores
differently for recipients whose preferences differ, and each recipient gets its own decision."""
import json
import re
import uuid

import pytest

from support import OUTSIDE, delivered_with, header_lines, make, scanmilter

pytestmark = pytest.mark.integration

# The site scores SCANMILTER_TAG_TEST 8.0 (tagged). Alice's preferences push it past the default
# reject_level (15), Bob's bring it under tag_level (5); Carol has none and keeps the site's.
USERS = {"alice@example.com": "score SCANMILTER_TAG_TEST 20.0\n",
         "bob@example.com": "score SCANMILTER_TAG_TEST 0.001\n"}


@pytest.fixture(scope="module")
def stack(stack_with):
    return stack_with(spamd_virtual_users=USERS, quarantine=True,
                      scanmilter_settings={"spamd_user": "%r"})


def held(stack, marker):
    r = scanmilter(stack, "quarantine", "list", "--json")
    assert r.returncode == 0, r.stderr
    return [e for e in map(json.loads, r.stdout.splitlines()) if marker in e.get("subject", "")]


def score(data: bytes) -> float:
    [status] = header_lines(data, "X-Spam-Status")
    return float(re.search(r"score=(-?\d+\.\d)", status).group(1))


def test_one_message_two_users_each_recipient_gets_its_own_score_and_decision(stack):
    marker = uuid.uuid4().hex
    data = make(f"scanmilter-tag-test {marker}")
    r = stack.send(data, "alice@outside.test", ["alice@example.com", "bob@example.com"], xclient_addr=OUTSIDE)
    assert r["code"] == 250, r      # mixed recipients with a quarantine: Alice's reject is held, Bob gets it
    d = delivered_with(stack, marker)
    assert d.recipients == ["bob@example.com"]
    assert score(d.data) < 5.0 and header_lines(d.data, "X-Spam-Flag") == []
    assert not any(marker in s and s.startswith("Subject: [SPAM]") for s in header_lines(d.data, "Subject"))
    [entry] = held(stack, marker)
    assert entry["recipients"] == ["alice@example.com"] and entry["score"] >= 20.0, entry
    # the same message again, to a user of its own: scanned as Carol, never Bob's cached score
    r = stack.send(data, "alice@outside.test", ["carol@example.com"], xclient_addr=OUTSIDE)
    assert r["code"] == 250, r
    stack.wait_drained()
    copies = [x for x in stack.delivered() if marker.encode() in x.data and x.recipients == ["carol@example.com"]]
    assert len(copies) == 1 and 5.0 <= score(copies[0].data) < 15.0
    assert header_lines(copies[0].data, "X-Spam-Flag") == ["X-Spam-Flag: YES"]


def test_recipients_of_one_user_share_one_scan(stack):
    marker = uuid.uuid4().hex
    msgid = f"<{marker}@outside.test>"
    r = stack.send(make(f"scanmilter-tag-test {marker}", msgid=msgid), "alice@outside.test",
                   ["bob@example.com", "BOB@example.com"], xclient_addr=OUTSIDE)
    assert r["code"] == 250, r
    d = delivered_with(stack, marker)
    assert score(d.data) < 5.0
    # spamd logs each check with its user: one scan, as bob@example.com
    checks = re.findall(rf"checking message {re.escape(msgid)} for (\S+?):", stack.logs["spamd"].read_text())
    assert checks == ["bob@example.com"], checks
