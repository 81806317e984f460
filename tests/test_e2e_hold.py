"""End to end: quarantine_backend = "hold" through real Postfix. Held mail waits on Postfix's hold
queue (mailq shows it with "!"), our verdict beside it; the quarantine CLI lists, shows, releases
(postsuper -H) and deletes (postsuper -d) it."""
import json
import os
import re
import sqlite3
import subprocess
import sys
import uuid

import pytest

import procs
from conftest import ROOT
from scanmilter import config
from scanmilter.commands import selftest
from scanmilter.commands.selftest import eicar
from scanmilter.quarantine.hold import parse_queue
from support import OUTSIDE, body_of, get, header_lines, make, scanmilter, scrape, wait_for

pytestmark = pytest.mark.integration

POLICY = """
[inbound]
quarantine_level = 6.0
virus_action = "quarantine"
[inbound.recipients."spamlover@example.com"]
quarantine_level = inf
reject_level = 1000.0
[inbound.recipients."strict@example.com"]
reject_level = 7.0
[inbound.recipients."dropper@example.com"]
virus_action = "discard"
"""
FORGED = b"X-Spam-Flag: NO\r\nX-Virus-Status: clean\r\nX-Quarantine-Released: id=x, by=postmaster\r\n"


def name_the_instance(stack):
    """postfix_config_directory: the stack's private Postfix (its directory is known only now)."""
    with open(stack.milter_config, "a") as f:
        f.write(f'postfix_config_directory = "{stack.postfix_conf}"\n')


@pytest.fixture(scope="module")
def stack(stack_with):
    return stack_with(policy_text=POLICY, quarantine=True, spamd_learning=True, before_start=name_the_instance,
                      scanmilter_settings={"quarantine_backend": "hold", "engine_check_interval": 0.5})


def cli(stack, *args):
    return scanmilter(stack, "quarantine", *args)


def postfix(stack, name, *args):
    return subprocess.run([procs.binary(name), "-c", str(stack.postfix_conf), *args], capture_output=True,
                          timeout=60)


def queue(stack) -> dict:
    out = postfix(stack, "postqueue", "-j")
    assert out.returncode == 0, out.stderr
    found, problems = parse_queue(out.stdout)
    assert problems == []
    return found


def held(stack, marker, rcpts=("bob@example.com",), head=b"", attachment=None):
    """Send a message the policy holds; its queue id once Postfix has it on hold."""
    data = head + make(f"scanmilter-tag-test {marker}", body=f"Hello,\nplease hold {marker}.\n",
                       attachment=attachment)
    r = stack.send(data, "alice@outside.test", list(rcpts), xclient_addr=OUTSIDE)
    assert r["code"] == 250, r
    qid = re.search(r"queued as (\w+)", r["reply"]).group(1)
    wait_for(lambda: queue(stack).get(qid) and queue(stack)[qid].queue_name == "hold", f"{qid} on hold")
    return qid, data


def copies(stack, marker):
    return [d for d in stack.delivered() if marker.encode() in d.data]


def delivered_once(stack, marker, qid):
    """The one copy of `marker`, once Postfix is done with queue id `qid`: delivered and removed
    from the queue, so no other copy of it is on its way (stack.delivered() counts only dumps
    the sink has finished)."""
    wait_for(lambda: qid not in queue(stack) and copies(stack, marker), f"{qid} delivered")
    found = copies(stack, marker)
    assert len(found) == 1, f"{marker} delivered {len(found)} times"
    return found[0]


def racing(stack, *args):
    """`scanmilter quarantine ARGS` started, not waited for (support.scanmilter runs one to its end)."""
    return subprocess.Popen([sys.executable, "-m", "scanmilter", "quarantine", *args, "-c", str(stack.milter_config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT / "milter")))


def entries(stack):
    r = cli(stack, "list", "--json")
    assert r.returncode == 0, r.stderr
    return {e["id"]: e for e in map(json.loads, r.stdout.splitlines())}


def test_held_by_policy_visible_shown_and_released_exactly_once(stack):
    marker = uuid.uuid4().hex
    qid, data = held(stack, marker, head=FORGED)
    assert re.search(rf"(?m)^{qid}!", postfix(stack, "postqueue", "-p").stdout.decode())     # mailq: "!" = held
    assert re.search(rf"{qid}: milter-hold: END-OF-MESSAGE .*: milter triggers HOLD action", stack.postfix_log())
    entry = entries(stack)[qid]
    assert entry["reason"] == "spam" and entry["recipients"] == ["bob@example.com"] and entry["score"] >= 8.0
    assert entry["rule"] == "quarantine_level = 6.0 from [inbound]"
    table = cli(stack, "list").stdout
    assert qid in table and "spam" in table
    show = cli(stack, "show", qid)
    assert show.returncode == 0, show.stderr
    assert "reason:      spam" in show.stdout and "quarantine_level = 6.0 from [inbound]" in show.stdout
    assert f"Subject: scanmilter-tag-test {marker}" in show.stdout and f"please hold {marker}." in show.stdout
    raw = cli(stack, "show", qid, "--raw").stdout
    assert marker in raw and "X-Spam-Flag: NO" not in raw      # forged verdicts went before the hold
    postfix(stack, "postqueue", "-f")                           # a queue run does not touch the hold queue
    assert queue(stack)[qid].queue_name == "hold" and copies(stack, marker) == []
    wait_for(lambda: get(scrape(stack), "scanmilter_quarantine_entries", reason="spam") >= 1, "held entry metric")

    # two admins release at the same moment: one does, the other is told who did
    racers = [racing(stack, "release", qid, "--by", f"admin{i}") for i in (1, 2)]
    results = [(p.wait(60), *p.communicate()) for p in racers]
    assert sorted(rc for rc, _, _ in results) == [0, 3], results
    [(_, won, _)] = [r for r in results if r[0] == 0]
    [(_, _, lost)] = [r for r in results if r[0] == 3]
    assert won.startswith(f"{qid}: released from Postfix's hold queue to bob@example.com")
    assert re.search(r"not released again: released by admin[12] at \d{4}-", lost), lost
    d = delivered_once(stack, marker, qid)
    assert d.recipients == ["bob@example.com"]
    for name in ("X-Spam-Flag", "X-Virus-Status", "X-Quarantine-Released"):
        assert header_lines(d.data, name) == [], name
    assert body_of(d.data) == body_of(data)
    again = cli(stack, "release", qid)
    assert again.returncode == 3 and "released by admin" in again.stderr
    assert cli(stack, "show", qid).returncode == 1
    assert qid not in entries(stack)
    assert len(copies(stack, marker)) == 1


def test_deleted_and_gone(stack):
    marker = uuid.uuid4().hex
    qid, _ = held(stack, marker)
    d = cli(stack, "delete", qid)
    assert d.returncode == 0 and d.stdout.strip() == "deleted 1 entry", d
    assert qid not in queue(stack) and qid not in entries(stack)
    assert f"{qid}: removed" in stack.postfix_log()
    show = cli(stack, "show", qid)
    assert show.returncode == 1 and "deleted by " in show.stderr
    rel = cli(stack, "release", qid)
    assert rel.returncode == 3 and "deleted by " in rel.stderr
    postfix(stack, "postqueue", "-f")
    assert copies(stack, marker) == []


def test_mixed_recipients_are_held_as_one_message_and_released_to_all(stack):
    marker = uuid.uuid4().hex
    # spamlover accepts, bob's copy is quarantined, strict's is rejected: Postfix holds the whole
    # message, and nobody gets it (not even spamlover) until it is released, then everyone does
    rcpts = ("spamlover@example.com", "bob@example.com", "strict@example.com")
    qid, _ = held(stack, marker, rcpts=rcpts)
    assert queue(stack)[qid].recipients == rcpts
    assert entries(stack)[qid]["recipients"] == list(rcpts)
    postfix(stack, "postqueue", "-f")
    assert copies(stack, marker) == []
    assert cli(stack, "release", qid, "--to", "bob@example.com").returncode == 3     # a whole message or none
    assert cli(stack, "release", qid).returncode == 0
    assert sorted(delivered_once(stack, marker, qid).recipients) == sorted(rcpts)

    # a recipient whose decision is discard is taken off the held message
    marker = uuid.uuid4().hex
    qid, _ = held(stack, marker, rcpts=("bob@example.com", "dropper@example.com"), attachment=eicar())
    assert queue(stack)[qid].recipients == ("bob@example.com",)
    assert entries(stack)[qid]["reason"] == "virus"
    assert cli(stack, "release", qid).returncode == 0
    assert delivered_once(stack, marker, qid).recipients == ["bob@example.com"]


def test_hostile_queue_ids_are_refused_before_any_command(stack):
    marker = uuid.uuid4().hex
    qid, _ = held(stack, marker)
    postsuper_lines = stack.postfix_log().count("postfix/postsuper[")
    for bad in ("ALL", "-d", "../../etc/passwd", f"{qid} ALL", qid.lower(), "A" * 40, "", f"{qid}\n", "-H ALL"):
        for verb in (("show",), ("release",), ("delete",), ("confirm",)):
            r = cli(stack, *verb, bad)
            assert r.returncode in (1, 2) and "Traceback" not in r.stderr, (verb, bad, r)
    assert queue(stack)[qid].queue_name == "hold"                # "delete ALL" deleted nothing
    assert stack.postfix_log().count("postfix/postsuper[") == postsuper_lines
    assert cli(stack, "delete", qid).returncode == 0


def test_learning_works_from_the_held_bytes(stack):
    spam_marker, ham_marker = uuid.uuid4().hex, uuid.uuid4().hex
    spam_qid, _ = held(stack, spam_marker)
    ham_qid, _ = held(stack, ham_marker)
    first = cli(stack, "confirm", spam_qid, "--by", "postmaster")
    assert first.returncode == 0 and first.stdout.strip() == f"{spam_qid}: learned as spam", first
    assert queue(stack)[spam_qid].queue_name == "hold"           # a confirmed entry stays held
    rel = cli(stack, "release", ham_qid, "--learn-ham", "--by", "postmaster")
    assert rel.returncode == 0, rel.stderr
    assert rel.stdout.splitlines()[-1] == f"{ham_qid}: learned as ham"
    delivered_once(stack, ham_marker, ham_qid)
    assert cli(stack, "delete", spam_qid).returncode == 0


def test_purge_deletes_held_mail_through_postsuper(stack):
    marker = uuid.uuid4().hex
    qid, _ = held(stack, marker)
    dry = cli(stack, "purge", "--older-than", "0s", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.startswith("would delete 1 entry"), dry
    done = cli(stack, "purge", "--older-than", "0s")
    assert done.returncode == 0 and done.stdout.startswith("deleted 1 entry"), done
    assert qid not in queue(stack) and entries(stack) == {}


def test_an_index_that_cannot_be_written_tempfails_and_nothing_is_lost(stack):
    marker = uuid.uuid4().hex
    blocker = sqlite3.connect(str(stack.root / "quarantine" / "hold.sqlite"), isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")                       # the daemon's write times out on this
        before = set(queue(stack))
        data = make(f"scanmilter-tag-test {marker}", body=f"retry {marker}\n")
        r = stack.send(data, "alice@outside.test", ["bob@example.com"], xclient_addr=OUTSIDE)
        assert r["code"] == 451 and "4.7.1" in r["reply"], r
        assert "quarantine store failed" in stack.logs["scanmilter"].read_text()
        assert set(queue(stack)) == before                       # not queued, not held: the sender retries
    finally:
        blocker.rollback()
        blocker.close()
    r = stack.send(data, "alice@outside.test", ["bob@example.com"], xclient_addr=OUTSIDE)    # the retry
    assert r["code"] == 250
    qid = re.search(r"queued as (\w+)", r["reply"]).group(1)
    wait_for(lambda: qid in entries(stack), "the retry held")
    assert cli(stack, "delete", qid).returncode == 0


def test_selftest_and_postfix_check_check_the_backend(stack):
    out = scanmilter(stack, "selftest", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASS eicar" in out.stdout and "held on Postfix's hold queue (SMFIR_QUARANTINE: scanmilter: virus" \
        in out.stdout
    lines = []
    cfg = config.load(str(stack.milter_config))
    assert selftest.run(cfg.milter_socket, 120, out=lines.append, cfg=cfg) == 0, lines
    assert any(ln.startswith("PASS hold: postsuper runs against") for ln in lines), lines
    check = scanmilter(stack, "postfix-check", "--main-cf", str(stack.postfix_conf / "main.cf"),
                       "--clamd-conf", str(stack.root / "clamd" / "clamd.conf"))
    text = check.stdout
    for passed in ("live: hold: postqueue -j of", "live: hold: postsuper runs against",
                   "live: hold: the index", "live: hold: the daemon asks for the quarantine action"):
        assert passed in text, text
    assert "hold" not in "".join(ln for ln in text.splitlines() if ln.startswith(("error", "warning"))), text
