"""End to end through real Postfix: directions, overrides, mixed recipients, header rewrites, reload."""
import os
import signal
import threading
import time
import uuid

import pytest

import procs
import stack as stacklib
from support import GTUBE, OUTSIDE, delivered_with, header_lines, make, not_delivered

pytestmark = pytest.mark.integration

POLICY = """
[inbound.domains."strict.example.com"]
reject_level = 6.0
[inbound.domains."lab.example.com"]
virus_action = "tag"
[inbound.recipients."spamlover@example.com"]
reject_level = 1000.0
[inbound.recipients."trap@example.com"]
virus_action = "discard"

[lists]
allow_senders = ["friend@partner.test"]
allow_senders_clients = ["198.51.100.0/24"]

[[header_rewrite]]
direction = "outbound"
action = "remove"
name = "X-Originating-IP"

[[header_rewrite]]
direction = "outbound"
action = "replace"
name = "X-Mailer"
match = "^Internal"
value = "Mailer"
"""


@pytest.fixture(scope="module")
def stack(stack_with):
    return stack_with(policy_text=POLICY)


def tagged(marker, **kw):
    """A message our test spamd rule scores 8.0: between tag (5) and reject (15)."""
    return make(f"scanmilter-tag-test {marker}", **kw)


def test_inbound_from_outside_is_tagged(stack):
    marker = uuid.uuid4().hex
    r = stack.send(tagged(marker), "alice@outside.test", ["bob@example.com"], xclient_addr=OUTSIDE)
    assert r["code"] == 250, r
    d = delivered_with(stack, marker)
    assert header_lines(d.data, "Subject") == [f"Subject: [SPAM] scanmilter-tag-test {marker}"]
    assert header_lines(d.data, "X-Spam-Flag") == ["X-Spam-Flag: YES"]
    line = [x for x in stack.logs["scanmilter"].read_text().splitlines() if "direction=" in x][-1]
    assert "action=accept, reason=tagged, direction=inbound" in line


def _outbound_checks(d, marker):
    assert header_lines(d.data, "Subject") == [f"Subject: scanmilter-tag-test {marker}"]   # never rewritten
    assert header_lines(d.data, "X-Spam-Status") == [] and header_lines(d.data, "X-Virus-Status") == []
    assert header_lines(d.data, "X-Originating-IP") == []                                # rewrite: removed
    assert header_lines(d.data, "X-Mailer") == ["X-Mailer: Mailer"]                       # rewrite: replaced


OUTBOUND_EXTRA = [("X-Originating-IP", "10.1.2.3"), ("X-Mailer", "Internal Tool 2.1")]


def test_outbound_from_mynetworks_is_not_tagged_and_rewritten(stack):
    marker = uuid.uuid4().hex
    r = stack.send(tagged(marker, extra=OUTBOUND_EXTRA), "carol@example.com", ["dave@elsewhere.test"])
    assert r["code"] == 250, r
    _outbound_checks(delivered_with(stack, marker), marker)


def test_sasl_authenticated_sender_is_outbound(stack):
    marker = uuid.uuid4().hex
    r = stack.send(tagged(marker, extra=OUTBOUND_EXTRA), "carol@example.com", ["bob@example.com"],
                   xclient_addr=OUTSIDE, xclient_login="carol")
    assert r["code"] == 250, r
    _outbound_checks(delivered_with(stack, marker), marker)
    line = [x for x in stack.logs["scanmilter"].read_text().splitlines() if "direction=" in x][-1]
    assert "direction=outbound" in line and f"client={OUTSIDE}" in line


def test_outbound_spam_is_refused_with_a_reply_for_the_user(stack):
    r = stack.send(make("hi", body=GTUBE + "\n"), "carol@example.com", ["dave@elsewhere.test"])
    assert r["code"] == 550 and "Your message was not sent: it looks like spam" in r["reply"], r


def test_per_domain_override_takes_effect(stack):
    marker = uuid.uuid4().hex
    r = stack.send(tagged(marker), "alice@outside.test", ["eve@strict.example.com"], xclient_addr=OUTSIDE)
    assert r["code"] == 550 and "limit 6.0" in r["reply"], r
    assert not_delivered(stack, marker)


def test_mixed_recipients_one_discards_a_virus_the_other_gets_it_tagged(stack):
    marker = uuid.uuid4().hex
    data = make(f"virus for two {marker}", body=stacklib.eicar().decode() + "\n")
    r = stack.send(data, "alice@outside.test", ["researcher@lab.example.com", "trap@example.com"],
                   xclient_addr=OUTSIDE)
    assert r["code"] == 250, r
    d = delivered_with(stack, marker)
    assert d.recipients == ["researcher@lab.example.com"]                  # trap@ removed (delrcpt)
    assert header_lines(d.data, "X-Virus-Status") == ["X-Virus-Status: infected (Eicar-Test-Signature.UNOFFICIAL)"]
    assert "removed=1" in stack.logs["scanmilter"].read_text()


def test_mixed_recipients_with_a_reject_are_rejected_for_all(stack):
    marker = uuid.uuid4().hex
    r = stack.send(tagged(marker), "alice@outside.test", ["spamlover@example.com", "eve@strict.example.com"],
                   xclient_addr=OUTSIDE)
    assert r["code"] == 550, r
    assert not_delivered(stack, marker)


def test_sighup_reloads_under_traffic_and_a_broken_policy_is_refused(stack):
    [(pid, _)] = stack.pids("scanmilter")
    policy_file = stack.root / "scanmilter" / "policy.toml"
    results, stop = [], threading.Event()

    def traffic():
        while not stop.is_set():
            marker = uuid.uuid4().hex
            r = stack.send(tagged(marker), "alice@outside.test", ["bob@example.com"], xclient_addr=OUTSIDE)
            results.append((marker, r["code"]))

    def answered(more):
        """Wait until the traffic has had `more` further answers."""
        want, deadline = len(results) + more, time.monotonic() + 60
        while len(results) < want and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(results) >= want, results

    reloaded, refused = "reloaded configuration", "reload refused, old configuration and policy stay in force"
    reloads, refusals = len(stack.wait_logged(reloaded, count=0)), len(stack.wait_logged(refused, count=0))
    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        answered(2)                                              # under the old policy
        policy_file.write_text(POLICY + '\n[inbound]\nsubject_tag = "[JUNK]"\n')
        os.kill(pid, signal.SIGHUP)
        stack.wait_logged(reloaded, count=reloads + 1)
        answered(2)                                              # under the new one
        policy_file.write_text("[inbound]\nreject_level = \"broken\"\n")
        os.kill(pid, signal.SIGHUP)
        stack.wait_logged(refused, count=refusals + 1)
        answered(2)                                              # still under the new one
    finally:
        stop.set()
        sender.join()
    assert procs.alive(pid) and stack.pids("scanmilter")[0][0] == pid
    assert len(results) >= 5 and all(code == 250 for _, code in results), results
    log = stack.logs["scanmilter"].read_text()
    assert "reloaded configuration" in log
    assert "reload refused, old configuration and policy stay in force" in log and "reject_level" in log
    subjects = [header_lines(delivered_with(stack, m).data, "Subject")[0] for m, _ in results]
    assert subjects[0].startswith("Subject: [SPAM] ")
    assert subjects[-1].startswith("Subject: [JUNK] ")           # the good new policy, kept after the bad one
    assert all(s.startswith(("Subject: [SPAM] ", "Subject: [JUNK] ")) for s in subjects)
    policy_file.write_text(POLICY)
    os.kill(pid, signal.SIGHUP)
    stack.wait_logged(reloaded, count=reloads + 2)               # later tests see the module's policy


def test_an_allow_listed_sender_counts_only_from_its_own_clients(stack):
    """allow_senders trusts the envelope sender, which anyone can forge: with allow_senders_clients
    the exemption holds only for mail from those networks (or authenticated)."""
    forged, real = uuid.uuid4().hex, uuid.uuid4().hex
    r = stack.send(tagged(forged), "friend@partner.test", ["bob@example.com"], xclient_addr=OUTSIDE)
    assert r["code"] == 250, r
    d = delivered_with(stack, forged)
    assert header_lines(d.data, "X-Spam-Flag") == ["X-Spam-Flag: YES"]         # judged like anyone else
    r = stack.send(tagged(real), "friend@partner.test", ["bob@example.com"], xclient_addr="198.51.100.20")
    assert r["code"] == 250, r
    d = delivered_with(stack, real)
    assert header_lines(d.data, "X-Spam-Flag") == [] and "[SPAM]" not in "".join(header_lines(d.data, "Subject"))
