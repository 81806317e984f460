"""Webhooks end to end: real Postfix, clamd (a pool of two) and spamd (tools/stack.py), and a receiver
started by the tests (tests/receiver.py). Held, released, deleted and purged mail announced by the
daemon and the quarantine command, a virus, a clamd member killed and started again; and mail that
keeps flowing at its normal pace while every POST hangs, the overflow dropped and counted. The hold
queue backend announces alike (a stack of its own)."""
import os
import signal
import time
import uuid

import pytest

import stack as stacklib
from receiver import Receiver, documented_verify
from scanmilter import config
from support import OUTSIDE, delivered_with, get, make, scanmilter, scrape, send, wait_for

pytestmark = pytest.mark.integration

SECRET = "e2e-webhook-secret-0123456789"
HOOK_TIMEOUT = 10.0         # seconds one POST may take: a hang costs this much to the sender, never to mail
QUEUE_SIZE = 4

POLICY = """
[inbound]
quarantine_level = 6.0
"""


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def stack(stack_with, receiver):
    def add_webhook(stack):
        with open(stack.milter_config, "a") as f:
            f.write(webhook_table(receiver))
    return stack_with(policy_text=POLICY, quarantine=True, clamd_members=2, before_start=add_webhook,
                      scanmilter_settings={"engine_check_interval": 0.5, "engine_failure_threshold": 1,
                                           "engine_retry_interval": 1.0, "scan_cache_seconds": 0,
                                           "webhook_retry_interval": 0.2, "webhook_deadline": 60.0,
                                           "webhook_queue_size": QUEUE_SIZE, "webhook_flush_timeout": 2.0})


@pytest.fixture(autouse=True)
def answering(receiver):
    receiver.answer(200)


def webhook_table(receiver, path="/scanmilter") -> str:
    """The [[webhook]] table of a stack; each stack posts to a path of its own."""
    return (f'[[webhook]]\nname = "test"\nurl = {config.toml_value(receiver.url(path))}\n'
            f'secret = "{SECRET}"\ntimeout = {HOOK_TIMEOUT}\n')


def verified(request):
    """The request's JSON document, once its signature checks out as docs/webhooks.md says."""
    assert documented_verify()(SECRET.encode(), request.headers, request.body)
    return request.json()


def cli(stack, *args):
    r = scanmilter(stack, "quarantine", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def hold(stack, receiver, marker):
    """Send a message the policy holds (the stack's spamd scores this Subject 8.0); its entry id, from
    the message.quarantined event."""
    r = stack.send(make(f"scanmilter-tag-test {marker}"), "alice@outside.test", ["bob@example.com"],
                   xclient_addr=OUTSIDE)
    assert r["code"] == 250, r
    request = receiver.wait_event("message.quarantined", lambda d: marker in (d["subject"] or ""))
    return verified(request)


def test_held_released_deleted_and_purged_mail_is_announced_by_the_daemon_and_the_command(stack, receiver):
    marker = uuid.uuid4().hex
    document = hold(stack, receiver, marker)
    assert document["version"] == 1 and document["host"]
    held = document["data"]
    assert held["backend"] == "files" and held["reason"] == "spam" and held["score"] >= 6.0
    assert held["sender"] == "alice@outside.test" and held["recipients"] == ["bob@example.com"]
    assert held["client_address"] == OUTSIDE and held["queue_id"] and held["entry"]
    entry = held["entry"]

    cli(stack, "release", entry, "--by", "postmaster")
    released = verified(receiver.wait_event("message.released", lambda d: d["entry"] == entry))["data"]
    assert released["by"] == "postmaster" and released["recipients"] == ["bob@example.com"]
    assert released["queue_id"] == held["queue_id"] and marker in released["subject"]
    delivered_with(stack, marker)

    second = hold(stack, receiver, uuid.uuid4().hex)["data"]["entry"]
    cli(stack, "delete", second)
    deleted = verified(receiver.wait_event("message.deleted", lambda d: d["entry"] == second))["data"]
    assert deleted["by"] and deleted["reason"] == "spam"

    third = hold(stack, receiver, uuid.uuid4().hex)["data"]["entry"]
    cli(stack, "purge", "--older-than", "0s")         # the released one and the third
    for gone in (entry, third):
        verified(receiver.wait_event("message.purged", lambda d: d["entry"] == gone))
    assert not [r for r in receiver.received("message.deleted") if r.json()["data"]["entry"] in (entry, third)]


def test_the_hold_queue_backend_announces_alike(stack_with, receiver):
    """quarantine_backend = "hold": the entry is Postfix's queue id, released by postsuper -H."""
    def settings(stack):
        with open(stack.milter_config, "a") as f:
            f.write(f'postfix_config_directory = "{stack.postfix_conf}"\n' + webhook_table(receiver, "/hold"))
    held_stack = stack_with(policy_text=POLICY, quarantine=True, before_start=settings,
                            scanmilter_settings={"quarantine_backend": "hold", "engine_check_interval": 0.5})
    marker = uuid.uuid4().hex
    held = hold(held_stack, receiver, marker)["data"]
    assert held["backend"] == "hold" and held["entry"] == held["queue_id"]
    cli(held_stack, "release", held["entry"], "--by", "postmaster")
    released = verified(receiver.wait_event("message.released", lambda d: d["entry"] == held["entry"]))["data"]
    assert released["by"] == "postmaster" and released["recipients"] == ["bob@example.com"]
    delivered_with(held_stack, marker)
    second = hold(held_stack, receiver, uuid.uuid4().hex)["data"]["entry"]
    cli(held_stack, "delete", second)
    verified(receiver.wait_event("message.deleted", lambda d: d["entry"] == second))
    held_stack.stop()


def test_a_virus_is_announced_with_what_the_policy_did(stack, receiver):
    marker = uuid.uuid4().hex
    r = send(stack, make(f"virus {marker}", body=stacklib.eicar().decode() + "\n"))
    assert r["code"] == 550, r
    data = verified(receiver.wait_event("virus.found", lambda d: marker in d["subject"]))["data"]
    assert data["action"] == "reject" and data["entry"] is None and data["direction"] == "inbound"
    assert any(v.startswith("Eicar-Test-Signature") for v in data["viruses"])
    assert data["sender"] == "alice@outside.test" and data["client_address"] == OUTSIDE


def test_a_clamd_member_killed_and_started_again_is_announced_down_then_up(stack, receiver):
    member = stack.member_address("clamd-2")
    [(pid, _)] = stack.pids("clamd-2")
    os.killpg(pid, signal.SIGKILL)
    stack.process("clamd-2").wait(10)
    down = verified(receiver.wait_event("engine.down", lambda d: d["member"] == member))["data"]
    assert down["engine"] == "clamd" and down["detail"]
    marker = uuid.uuid4().hex
    assert send(stack, make(f"pool {marker}"))["code"] == 250           # the other member takes the mail
    delivered_with(stack, marker)
    stack.start_service("clamd-2")
    verified(receiver.wait_event("engine.up", lambda d: d["member"] == member))
    # the engine as a whole never went down: one member answered throughout
    assert not [r for r in receiver.received("engine.down")
                if r.path == "/scanmilter" and r.json()["data"]["member"] is None]


def test_mail_flows_at_its_normal_pace_while_every_post_hangs(stack, receiver):
    """Each message is answered as fast as with a healthy receiver, though every POST hangs for
    HOOK_TIMEOUT; the events that do not fit in the queue are dropped, counted and logged."""
    def timed(data):
        began = time.monotonic()
        answer = send(stack, data)
        return answer, time.monotonic() - began

    normal, before = [], len(receiver.received("virus.found"))
    for _ in range(3):
        marker = uuid.uuid4().hex
        answer, took = timed(make(f"virus {marker}", body=stacklib.eicar().decode() + "\n"))
        assert answer["code"] == 550
        normal.append(took)
    receiver.wait(lambda: len(receiver.received("virus.found")) == before + 3, "the events of the healthy receiver")

    receiver.answer("hang")
    first = uuid.uuid4().hex
    assert send(stack, make(f"virus {first}", body=stacklib.eicar().decode() + "\n"))["code"] == 550
    receiver.wait(lambda: receiver.hanging >= 1, "the receiver holding a POST")
    hams, slow = [], []
    for i in range(2 * (QUEUE_SIZE + 2)):          # more events than the queue holds
        marker = uuid.uuid4().hex
        virus = i % 2 == 0
        answer, took = timed(make(f"{'virus' if virus else 'ham'} {marker}",
                                  body=stacklib.eicar().decode() + "\n" if virus else "Hello,\nfine.\n"))
        assert answer["code"] == (550 if virus else 250), answer
        if not virus:
            hams.append(marker)
        slow.append(took)
    # a POST held costs HOOK_TIMEOUT; a message waits for none of it
    assert max(slow) < min(HOOK_TIMEOUT / 2, max(normal) * 3 + 2.0), (normal, slow)
    for marker in hams:
        delivered_with(stack, marker)
    wait_for(lambda: get(scrape(stack), "scanmilter_webhook_dropped_total", reason="queue_full") >= 1,
             "dropped events counted")
    stack.wait_logged("webhooks: queue full (webhook_queue_size = 4)")
    assert receiver.hanging >= 1            # and the receiver held a POST all along
