"""End to end: held mail through real Postfix, reviewed and released with the quarantine CLI."""
import io
import json
import re
import sqlite3
import time
import urllib.request
import uuid

import pytest

from support import OUTSIDE, body_of, delivered_with, header_lines, make, not_delivered, scanmilter

pytestmark = pytest.mark.integration

POLICY = """
[inbound]
quarantine_level = 6.0
[inbound.recipients."spamlover@example.com"]
quarantine_level = inf
reject_level = 1000.0
"""


@pytest.fixture(scope="module")
def stack(stack_with):
    return stack_with(policy_text=POLICY, spamd_learning=True, quarantine=True,
                      scanmilter_settings={"engine_check_interval": 0.5})


def cli(stack, *args):
    return scanmilter(stack, "quarantine", *args)


def entries(stack, *filters):
    r = cli(stack, "list", "--json", *filters)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def actions(stack) -> dict:
    """scanmilter_quarantine_actions_total by action, as the daemon exports them."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=10).read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^scanmilter_quarantine_actions_total\{action="(\w+)"\} (\S+)$', text, re.M)}


def wait_actions(stack, want: dict, timeout=10):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(actions(stack).get(k) == v for k, v in want.items()):
            return
        time.sleep(0.2)
    raise AssertionError(f"{actions(stack)} != {want}")


def hold(stack, marker, rcpts=("bob@example.com",)):
    data = make(f"scanmilter-tag-test {marker}", body=f"Hello,\nplease hold {marker}.\n\x1b[31mred\x1b[0m\n")
    r = stack.send(data, "alice@outside.test", list(rcpts), xclient_addr=OUTSIDE)
    return data, r


def test_held_message_is_listed_shown_released_once_and_deleted(stack):
    marker = uuid.uuid4().hex
    data, r = hold(stack, marker)
    assert r["code"] == 250, r                                   # quarantine_action = discard
    assert not_delivered(stack, marker)                          # waits for Postfix to be done
    [entry] = [e for e in entries(stack, "--from", "alice@") if marker in e["subject"]]
    # 8.0 from the test rule; random marker text can hit a stock rule too (PDS_BTC_ID likes some hex)
    assert entry["reason"] == "spam" and entry["recipients"] == ["bob@example.com"] and entry["score"] >= 8.0
    assert "SCANMILTER_TAG_TEST" in entry["rules"] and entry["direction"] == "inbound"

    table = cli(stack, "list").stdout
    assert entry["id"] in table and "spam" in table and f"{entry['score']:.1f}" in table and "Kbytes in" in table
    show = cli(stack, "show", entry["id"])
    assert show.returncode == 0
    assert "quarantine_level = 6.0 from [inbound]" in show.stdout
    assert f"Subject: scanmilter-tag-test {marker}" in show.stdout
    assert f"please hold {marker}." in show.stdout and "\x1b" not in show.stdout   # no escapes reach the terminal
    raw = cli(stack, "show", entry["id"], "--raw").stdout
    assert marker in raw and "X-Virus-Status" not in raw                          # as received

    before = actions(stack)
    rel = cli(stack, "release", entry["id"], "--by", "postmaster")
    assert rel.returncode == 0, rel.stderr
    d = delivered_with(stack, marker)
    assert d.recipients == ["bob@example.com"]
    assert header_lines(d.data, "X-Quarantine-Released")[0].startswith(
        f"X-Quarantine-Released: id={entry['id']}, by=postmaster, at=")
    assert header_lines(d.data, "Subject") == [f"Subject: scanmilter-tag-test {marker}"]
    assert body_of(d.data) == body_of(data)                                       # byte for byte

    again = cli(stack, "release", entry["id"])
    assert again.returncode == 3 and "already released" in again.stderr
    stack.wait_drained()
    assert len([x for x in stack.delivered() if marker.encode() in x.data]) == 1

    assert cli(stack, "delete", entry["id"]).returncode == 0
    assert cli(stack, "show", entry["id"]).returncode == 1
    assert entry["id"] not in cli(stack, "list").stdout
    # the refused second release counts nothing
    wait_actions(stack, {"release": before["release"] + 1, "delete": before["delete"] + 1,
                         "purge": before["purge"]})


def test_spamd_learns_from_release_and_confirm(stack):
    ham_marker, spam_marker = uuid.uuid4().hex, uuid.uuid4().hex
    for m in (ham_marker, spam_marker):
        assert hold(stack, m)[1]["code"] == 250
    ids = {m: next(e["id"] for e in entries(stack) if m in e["subject"]) for m in (ham_marker, spam_marker)}
    before = actions(stack)
    rel = cli(stack, "release", ids[ham_marker], "--learn-ham", "--by", "postmaster")
    assert rel.returncode == 0, rel.stderr
    assert rel.stdout.splitlines()[-1] == f"{ids[ham_marker]}: learned as ham"
    delivered_with(stack, ham_marker)
    first = cli(stack, "confirm", ids[spam_marker], "--by", "postmaster")
    assert first.returncode == 0 and first.stdout.strip() == f"{ids[spam_marker]}: learned as spam", first
    again = cli(stack, "confirm", ids[spam_marker])
    assert again.returncode == 0 and "spamd knew it already" in again.stdout, again
    shown = json.loads(cli(stack, "show", ids[spam_marker], "--json").stdout)
    assert [x["as"] for x in shown["learned"]] == ["spam", "spam"] and shown["learned"][0]["by"] == "postmaster"
    assert ids[spam_marker] in cli(stack, "list").stdout                 # a confirmed entry stays held
    # what spamd learned is in its Bayes database
    assert {"bayes_seen", "bayes_toks"} <= {p.name for p in (stack.root / "spamd/home/bayes").iterdir()}
    wait_actions(stack, {"learn_ham": before["learn_ham"] + 1, "learn_spam": before["learn_spam"] + 2})
    assert cli(stack, "confirm", "0" * 24).returncode == 1


def test_mixed_recipients_are_split_and_the_held_copy_kept(stack):
    marker = uuid.uuid4().hex
    _, r = hold(stack, marker, rcpts=("spamlover@example.com", "bob@example.com"))
    assert r["code"] == 250, r
    d = delivered_with(stack, marker)
    assert d.recipients == ["spamlover@example.com"]
    held = [e for e in entries(stack, "--to", "bob@") if e["all_recipients"] == ["spamlover@example.com", "bob@example.com"]]
    assert held and held[0]["recipients"] == ["bob@example.com"]


def test_bad_ids_are_refused(stack):
    for bad in ("../../etc/passwd", "0" * 23, "A" * 24, ""):
        r = cli(stack, "show", bad)
        assert r.returncode in (1, 2) and "Traceback" not in r.stderr
    assert cli(stack, "show", "0" * 24).returncode == 1


def test_purge_counts_and_deletes(stack):
    marker = uuid.uuid4().hex
    assert hold(stack, marker)[1]["code"] == 250
    assert entries(stack)
    dry = cli(stack, "purge", "--older-than", "0s", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.startswith("would delete ")
    assert entries(stack)
    done = cli(stack, "purge", "--older-than", "0s")
    assert done.returncode == 0 and done.stdout.startswith("deleted ")
    assert entries(stack) == []
    assert cli(stack, "stats").stdout.startswith("total")


def test_store_failure_tempfails_and_nothing_is_lost(stack):
    marker = uuid.uuid4().hex
    entries_dir = stack.root / "quarantine" / "entries"
    moved = entries_dir.with_name("entries.away")
    entries_dir.rename(moved)
    entries_dir.write_text("not a directory")       # the store cannot write: like a broken disk
    try:
        data, r = hold(stack, marker)
        assert r["code"] == 451 and "4.7.1" in r["reply"], r
        assert "quarantine store failed" in stack.logs["scanmilter"].read_text()
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=10).read()
        assert b"scanmilter_quarantine_store_failures_total 1.0" in metrics
    finally:
        entries_dir.unlink()
        moved.rename(entries_dir)
    r = stack.send(data, "alice@outside.test", ["bob@example.com"], xclient_addr=OUTSIDE)   # the retry
    assert r["code"] == 250
    assert any(e["reason"] == "spam" for e in entries(stack))
    assert not_delivered(stack, marker)


FORGED_HEADERS = (b"X-Spam-Flag: NO\r\n"
                  b"x-virus-status: clean\r\n"
                  b"X-Quarantine-Released: id=000000000000000000000000, by=postmaster, at=2026-01-01T00:00:00Z\r\n"
                  b"X-SPAM-STATUS: No, score=-100.0\r\n\trequired=5.0 tests=FORGED\r\n")


def test_release_delivers_without_the_senders_forged_verdict_headers(stack):
    marker = uuid.uuid4().hex
    data = FORGED_HEADERS + make(f"scanmilter-tag-test {marker}", body=f"forged verdicts {marker}\n")
    r = stack.send(data, "alice@outside.test", ["bob@example.com"], xclient_addr=OUTSIDE)
    assert r["code"] == 250, r
    [entry] = [e for e in entries(stack) if marker in e["subject"]]
    assert b"X-Spam-Flag: NO" in cli(stack, "show", entry["id"], "--raw").stdout.encode()   # held as received
    rel = cli(stack, "release", entry["id"], "--by", "postmaster")
    assert rel.returncode == 0, rel.stderr
    d = delivered_with(stack, marker)
    for name in ("X-Spam-Flag", "X-Virus-Status", "X-Spam-Status"):
        assert header_lines(d.data, name) == [], name
    [ours] = header_lines(d.data, "X-Quarantine-Released")
    assert ours.startswith(f"X-Quarantine-Released: id={entry['id']}, by=postmaster, at=")
    assert b"FORGED" not in d.data and b"score=-100" not in d.data
    assert body_of(d.data) == body_of(data)
    shown = json.loads(cli(stack, "show", entry["id"], "--json").stdout)
    assert shown["released"][0]["stripped"] == ["X-Spam-Flag", "x-virus-status", "X-Quarantine-Released",
                                                "X-SPAM-STATUS"]


def test_release_of_utf8_addresses_goes_out_with_smtputf8(stack):
    from scanmilter import quarantine as Q
    marker = uuid.uuid4().hex
    store = Q.FileStore(str(stack.root / "quarantine"))
    entry_id = store.put(io.BytesIO(make(f"utf8 {marker}")), {"sender": "jöran@outside.test",
                                                               "recipients": ["bob@example.com"], "reason": "spam"})
    rel = cli(stack, "release", entry_id, "--by", "postmaster")
    assert rel.returncode == 0, rel.stderr
    d = delivered_with(stack, marker)
    assert d.recipients == ["bob@example.com"] and b"with UTF8SMTP" in d.data      # Postfix's Received line
    assert d.sender == "j??ran@outside.test"     # smtp-sink's dump shows the two UTF-8 bytes of "ö" as "??"
    assert json.loads(cli(stack, "show", entry_id, "--json").stdout)["released"][0]["to"] == ["bob@example.com"]


def test_a_locked_index_is_counted_logged_and_repaired_by_the_daemon(stack):
    marker = uuid.uuid4().hex
    blocker = sqlite3.connect(str(stack.root / "quarantine" / "index.sqlite"), isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")          # the daemon's index write times out on this
        assert hold(stack, marker)[1]["code"] == 250
        line = stack.wait_logged("quarantine index not updated for")[-1]
        entry_id = re.search(r"not updated for ([0-9a-f]{24}):", line).group(1)
        text = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=10).read()
        assert b"scanmilter_quarantine_index_failures_total 1.0" in text
    finally:
        blocker.rollback()
        blocker.close()
    # the daemon's periodic check rebuilds the index; the entry is listed again
    stack.wait_logged("quarantine: index rebuilt from the entry files")
    assert (stack.root / "quarantine" / "index.stale").exists() is False
    r = cli(stack, "list", "--json")
    assert entry_id in r.stdout and marker in r.stdout
    assert cli(stack, "delete", entry_id).returncode == 0
