"""quarantine_backend = "hold" without Postfix: queue ids, `postqueue -j` parsing (fed hostile
lines), the index and its states behind a stand-in for Postfix's commands, and what the daemon
asks of Postfix for a held message. The real thing is in test_e2e_hold.py."""
import dataclasses
import io
import json
import subprocess
import threading
import time
from pathlib import Path

import Milter
import pytest

from fakes import CLEAN, Engine, feed, handler
from scanmilter import config, quarantine as Q
from scanmilter.handler import STORE_FAILED_REPLY
from scanmilter.quarantine import hold as H
from scanmilter.quarantine.release import ReleaseError
from scanmilter.scanners import ScanResult

SHORT, LONG = "B185821E096", "4dXRnh0GbFzJ2q"
SPAM8 = ScanResult("spamd", "found", score=8.0, required=5.0, rules=("SCANMILTER_TAG_TEST",))
EICAR = ScanResult("clamd", "found", viruses=("Eicar-Test-Signature",))


# ---------------------------------------------------------------- queue ids

@pytest.mark.parametrize("good", [SHORT, "0123456789ABCDEF", "ABCDEF", LONG, "4dXRnh0GbFzz1", "zzzzzzzzzzz1"])
def test_postfix_queue_ids_are_valid(good):
    assert H.valid_queue_id(good)


@pytest.mark.parametrize("bad", [
    "", "ALL",                  # postsuper -d ALL deletes every message
    "-d", "-H", "--", "../../etc/passwd", "B185821E096 ALL", "B185821E096\n", "B185821E096\0", " B185821E096",
    "b185821e096",              # lower-case hex is neither form (and "e" is a vowel)
    "ABCDE",                    # shorter than five digits of microseconds and one of inode
    "4dXRnh0GbFzJ2a",           # a vowel in a long id
    "4dXRnh0GbF",               # a long id without its "z" and inode
    "4dXRnhzJ2q",               # too short a time part before the "z"
    "4dXRnh0GbFzJ2z",           # the inode part never has a "z"
    "A" * 22, "B" * 40 + "z1", "B185821E096/../x", "B185821E096*", "ＡＢＣＤＥＦ", 123, None,
])
def test_anything_else_is_refused(bad):
    assert not H.valid_queue_id(bad)


# ---------------------------------------------------------------- postqueue -j

def line(**over):
    record = {"queue_name": "hold", "queue_id": SHORT, "arrival_time": 1700000000, "message_size": 3324,
              "forced_expire": False, "sender": "a@outside.test",
              "recipients": [{"address": "bob@example.com"}, {"address": "carol@example.com", "delay_reason": "x"}]}
    record.update(over)
    return json.dumps(record).encode()


def test_a_line_of_postqueue_j_is_read():
    queue, problems = H.parse_queue(line() + b"\n")
    assert problems == []
    assert queue == {SHORT: H.Queued(SHORT, "hold", 1700000000, 3324, "a@outside.test",
                                     ("bob@example.com", "carol@example.com"))}


HOSTILE = [
    b"not json", b"[1, 2]", b'"hold"', b"null", b"{", b"[" * 100000 + b"]" * 100000, b'{"queue_id": "' + b"A" * 10 ** 6,
    line(queue_id="ALL"), line(queue_id="-d"), line(queue_id="../../etc/passwd"), line(queue_id=None),
    line(queue_id=["B185821E096"]), line(queue_name="hold queue"), line(queue_name=7), line(queue_name="HOLD"),
    line(arrival_time=True), line(arrival_time=1.5), line(arrival_time="1700000000"), line(arrival_time=-1),
    line(arrival_time=2 ** 70), line(message_size=None), line(sender=["a"]), line(recipients="bob@example.com"),
    line(recipients=[{"address": 7}]), line(recipients=["bob@example.com"]), line(recipients=[{}]),
]


@pytest.mark.parametrize("bad", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_lines_are_skipped_and_noted_never_trusted(bad):
    good = line(queue_id="ABCDEF", queue_name="deferred")
    queue, problems = H.parse_queue(bad + b"\n" + good + b"\n")
    assert list(queue) == ["ABCDEF"] and len(problems) == 1
    assert problems[0].startswith("postqueue -j line 1: ") and len(problems[0]) < 300


def test_addresses_keep_what_the_sender_sent_for_display_to_escape():
    raw = line(sender="\x1b[2Jevil\r\n@outside.test").replace(b"a@outside.test", b"") + b"\n"
    data = raw.replace(b'"recipients": [', b'"recipients": [{"address": "b\xff\xfe@example.com"}, ')
    queue, problems = H.parse_queue(data)
    assert problems == []
    q = queue[SHORT]
    assert q.sender == "\x1b[2Jevil\r\n@outside.test"
    assert q.recipients[0] == "b\udcff\udcfe@example.com"             # undecodable bytes kept as surrogates


def test_a_message_seen_twice_while_moving_counts_as_not_held():
    for first, second in (("hold", "deferred"), ("deferred", "hold")):
        queue, _ = H.parse_queue(line(queue_name=first) + b"\n" + line(queue_name=second) + b"\n")
        assert queue[SHORT].queue_name == "deferred"


def test_blank_lines_and_an_empty_queue():
    assert H.parse_queue(b"") == ({}, [])
    assert H.parse_queue(b"\n\n  \n") == ({}, [])


# ---------------------------------------------------------------- the store behind a stand-in Postfix

class FakePostfix:
    """postqueue -j, postcat, postsuper -H / -d over a dict of queued messages; every call kept."""

    def __init__(self):
        self.queue: dict[str, dict] = {}
        self.calls: list[tuple] = []
        self.lock = threading.Lock()

    def add(self, qid, name="hold", arrival=None, recipients=("bob@example.com",)):
        self.queue[qid] = {"queue_name": name, "queue_id": qid, "arrival_time": int(arrival or time.time() - 1),
                           "message_size": 123, "sender": "a@outside.test",
                           "recipients": [{"address": r} for r in recipients]}

    def __call__(self, name, *args):
        with self.lock:
            self.calls.append((name, *args))
            out, err = b"", b""
            if name == "postqueue" and args == ("-j",):
                out = b"".join(json.dumps(m).encode() + b"\n" for m in self.queue.values())
            elif name == "postcat":
                out = f"Subject: held {args[-1]}\n\nbody\n".encode()
            elif name == "postsuper" and args[0] == "-H":
                if self.queue.get(args[1], {}).get("queue_name") == "hold":
                    self.queue[args[1]]["queue_name"] = "deferred"
                    err = f"postsuper: {args[1]}: released from hold\n".encode()
            elif name == "postsuper" and args[0] == "-d":
                if self.queue.get(args[1], {}).get("queue_name") == args[2]:
                    del self.queue[args[1]]
                    err = f"postsuper: {args[1]}: removed\n".encode()
            return subprocess.CompletedProcess([name, *args], 0, out, err)


@pytest.fixture
def store(tmp_path):
    s = Q.hold.HoldStore(str(tmp_path / "q"), keep=3600)
    s.postfix = FakePostfix()
    s._postfix = s.postfix
    return s


def hold(store, qid=SHORT, reason="spam", **queued):
    meta = Q.held_meta(queue_id=qid, sender="a@outside.test", recipients=["bob@example.com"], subject="s",
                       all_recipients=["bob@example.com"], client_address="203.0.113.7", client_name="x",
                       auth_user="", direction="inbound", reason=reason, viruses=[], score=8.0, rules=["R"],
                       rule="quarantine_level = 6.0 from [inbound]")
    assert store.put(io.BytesIO(b"Subject: s\r\n\r\nbody\r\n"), meta) == qid
    store.postfix.add(qid, **queued)


def test_only_held_messages_scanmilter_recorded_are_listed(store):
    hold(store)
    store.postfix.add("ABCDEF")                                  # held by someone else (postsuper -h)
    hold(store, "BCDEF0", reason="virus", name="deferred")       # released outside scanmilter: on its way
    [entry] = store.select()
    assert (entry.id, entry.reason, entry.size, entry.recipients) == (SHORT, "spam", 123, ["bob@example.com"])
    assert store.get(SHORT).rule == "quarantine_level = 6.0 from [inbound]"
    assert [e.id for e in store.select(reason="virus")] == [] and store.select(sender="OUTSIDE")
    assert store.message(SHORT) == b"Subject: held B185821E096\n\nbody\n"


def test_a_reused_short_queue_id_is_not_taken_for_the_held_message(store):
    hold(store)
    store.postfix.add(SHORT, arrival=time.time() + H.CLOCK_SLACK_SECONDS + 60)   # a later message, same id
    assert store.select() == []
    with pytest.raises(ReleaseError):
        store.release(SHORT, "root")
    assert ("postsuper", "-H", SHORT) not in store.postfix.calls


def test_an_entry_that_left_the_queue_without_us_is_noted_and_then_told(store, monkeypatch):
    hold(store)
    del store.postfix.queue[SHORT]                               # postsuper -d by hand
    assert store.select() == [] and store.notes == []            # within the grace period: maybe not queued yet
    monkeypatch.setattr(H, "HOLD_GRACE_SECONDS", -1)
    assert store.select() == [] and len(store.notes) == 1 and "left Postfix's queue" in store.notes[0]
    with pytest.raises(Q.NotFound, match="left Postfix's hold queue without scanmilter"):
        store.get(SHORT)


def test_release_once_then_everyone_is_told_who_did_it(store):
    hold(store)
    assert store.release(SHORT, "alice") == ["bob@example.com"]
    assert store.postfix.queue[SHORT]["queue_name"] == "deferred"
    assert ("postqueue", "-i", SHORT) in store.postfix.calls     # scheduled now, not at the next deferred run
    with pytest.raises(ReleaseError, match="not released again: released by alice at "):
        store.release(SHORT, "bob")
    with pytest.raises(Q.NotFound, match="no longer on Postfix's hold queue"):
        store.message(SHORT)
    with pytest.raises(Q.NotFound, match="released by alice"):
        store.delete(SHORT, by="bob")
    assert [c for c in store.postfix.calls if c[0] == "postsuper"] == [("postsuper", "-H", SHORT)]
    assert store.get(SHORT).released[0]["by"] == "alice" and store.tallies()["release"] == 1


def test_delete_then_release_is_refused_with_who_deleted(store):
    hold(store)
    store.delete(SHORT, by="alice")
    assert SHORT not in store.postfix.queue and store.tallies()["delete"] == 1
    with pytest.raises(ReleaseError, match="deleted by alice"):
        store.release(SHORT, "bob")
    with pytest.raises(Q.NotFound, match="deleted by alice"):
        store.get(SHORT)


def test_a_release_of_some_recipients_is_refused(store):
    hold(store)
    with pytest.raises(ReleaseError, match="whole message"):
        store.release(SHORT, "root", to=["bob@example.com"])
    assert store.postfix.calls == []


def test_concurrent_releases_act_once(store):
    hold(store)
    results = []

    def release():
        try:
            results.append(store.release(SHORT, threading.current_thread().name))
        except ReleaseError as e:
            results.append(str(e))
    threads = [threading.Thread(target=release, name=f"admin{i}") for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(["bob@example.com"]) == 1
    assert sum("not released again: released by admin" in str(r) for r in results) == 7
    assert [c for c in store.postfix.calls if c[0] == "postsuper"] == [("postsuper", "-H", SHORT)]


@pytest.mark.parametrize("bad", ["ALL", "-d", "../../etc/passwd", "B185821E096 hold", ""])
def test_hostile_ids_never_reach_a_command(store, bad):
    hold(store)
    for call in (store.get, store.message, store.delete, lambda i: store.release(i, "root"),
                 lambda i: store.locked(i).__enter__()):
        with pytest.raises((Q.NotFound, ReleaseError)):
            call(bad)
    assert store.postfix.calls == []
    assert list(Path(store.locks_dir).iterdir()) == []          # no lock file named after it either


def test_learning_after_release_reads_the_copy_taken_before_it(store):
    hold(store)
    store.release(SHORT, "root", keep_message=True)
    assert store.message(SHORT) == b"Subject: held B185821E096\n\nbody\n"
    with store.locked(SHORT) as entry:
        entry.meta.setdefault("learned", []).append({"as": "ham"})
        store.update(entry)
    assert store.get(SHORT).learned == [{"as": "ham"}]


def test_purge_deletes_through_postsuper_and_finished_rows_are_dropped_later(store, monkeypatch):
    hold(store)
    hold(store, "ABCDEF")
    assert {e.id for e in Q.purge(store, -1)} == {SHORT, "ABCDEF"}
    assert store.postfix.queue == {} and store.tallies()["purge"] == 2
    with pytest.raises(Q.NotFound, match="purged by "):
        store.get(SHORT)
    store.keep = -1
    store.select()
    with pytest.raises(Q.NotFound, match="did not hold it"):
        store.get(SHORT)
    assert list(Path(store.locks_dir).iterdir()) == []


def test_put_needs_a_queue_id_and_writes_the_row_before_returning(store):
    with pytest.raises(Q.StoreError, match="milter_end_of_data_macros"):
        store.put(None, {"queue_id": "", "reason": "spam"})
    with pytest.raises(Q.StoreError):
        store.put(None, {"queue_id": "ALL", "reason": "spam"})
    hold(store)
    other = H.HoldStore(store.directory)                     # another process sees it at once
    assert other.get(SHORT).reason == "spam"


def test_stats_fall_back_to_the_index_when_postqueue_cannot_run(store):
    hold(store)

    def broken(name, *args):
        raise Q.StoreError("postqueue -j failed (status 69)")
    store._postfix = broken
    s = store.stats()
    assert s["by_reason"] == {"spam": {"entries": 1, "bytes": 0}} and s["released"] == 0


def test_the_probe_leaves_nothing(store):
    store.probe()
    assert store._rows() == []


# ---------------------------------------------------------------- settings

def test_backend_setting_and_its_choices():
    cfg = config.parse(config.DAEMON_SETTINGS, {}, "test")
    assert cfg.quarantine_backend == "files" and "hold" in config.QUARANTINE_BACKENDS
    with pytest.raises(config.ConfigError, match="quarantine_backend must be one of files, hold"):
        config.parse(config.DAEMON_SETTINGS, {"quarantine_backend": "queue"}, "test")
    with pytest.raises(config.ConfigError, match="absolute path"):
        config.parse(config.DAEMON_SETTINGS, {"postfix_config_directory": "etc/postfix"}, "test")


def test_open_store_gives_the_hold_store(tmp_path):
    cfg = config.parse(config.DAEMON_SETTINGS, {"quarantine_backend": "hold", "quarantine_directory": str(tmp_path),
                                                "postfix_config_directory": "/etc/postfix-out"}, "test")
    store = Q.open_store(cfg)
    assert isinstance(store, H.HoldStore) and store.postfix_config_directory == "/etc/postfix-out"
    files = config.parse(config.DAEMON_SETTINGS, {"quarantine_directory": str(tmp_path)}, "test")
    assert Q.location(cfg) != Q.location(files)              # a reload that switches backend reopens the store


# ---------------------------------------------------------------- the daemon's side

def held_handler(tmp_path, *engines, recipients=None, **inbound):
    h = handler(*engines, **inbound)
    policy = h.rt.policy
    if recipients:
        policy = dataclasses.replace(policy, recipients={"inbound": recipients})
    h.rt.policy = dataclasses.replace(policy, quarantine_available=True)
    h.rt.store = H.HoldStore(str(tmp_path / "q"))
    h._ctx.macros["i"] = SHORT
    h._actions |= Milter.QUARANTINE | Milter.DELRCPT
    order = []
    h._ctx.quarantine = lambda reason: (order.append(h.rt.store._rows()), h._ctx.calls.append(("hold", reason)))
    return h, order


def test_a_held_message_goes_on_hold_after_its_verdict_is_recorded(tmp_path):
    h, order = held_handler(tmp_path, Engine("spamd", SPAM8), Engine("clamd", CLEAN), quarantine_level=6.0)
    rc = feed(h, [("Subject", b" hi"), ("X-Spam-Flag", b" NO"), ("x-virus-status", b" clean")])
    assert rc == Milter.ACCEPT                                   # Postfix holds it; nothing is discarded
    [rows] = order
    assert [r.queue_id for r in rows] == [SHORT]              # recorded before the hold was asked for
    assert ("hold", "scanmilter: spam: quarantine_level = 6.0 from [inbound]") in h._ctx.calls
    # the verdict headers it arrived with go now: a release cannot edit it any more
    assert ("chg", "X-Spam-Flag", 1, None) in h._ctx.calls and ("chg", "x-virus-status", 1, None) in h._ctx.calls
    assert not [c for c in h._ctx.calls if c[0] == "add"] and h._ctx.reply is None
    assert h.rt.store.get(SHORT).recipients == ["u@example.com"]


def test_mixed_recipients_the_whole_message_is_held_and_discards_are_removed(tmp_path):
    recipients = {"spamlover@example.com": {"quarantine_level": float("inf"), "reject_level": 1000.0},
                  "strict@example.com": {"reject_level": 7.0}}
    h, _ = held_handler(tmp_path, Engine("spamd", SPAM8), Engine("clamd", CLEAN), recipients=recipients,
                        quarantine_level=6.0)
    rc = feed(h, [("Subject", b" hi")],
              rcpts=("<spamlover@example.com>", "<bob@example.com>", "<strict@example.com>"))
    assert rc == Milter.ACCEPT and not [c for c in h._ctx.calls if c[0] == "delrcpt"]
    entry = h.rt.store.get(SHORT)
    assert entry.recipients == ["spamlover@example.com", "bob@example.com", "strict@example.com"]
    # the accepting recipient's header edits apply to the one message that is held
    assert ("add", "X-Spam-Flag", " YES") in h._ctx.calls
    h, _ = held_handler(tmp_path, Engine("spamd", CLEAN), Engine("clamd", EICAR), virus_action="quarantine",
                        recipients={"dropper@example.com": {"virus_action": "discard"}})
    assert feed(h, [("Subject", b" v")], rcpts=("<bob@example.com>", "<dropper@example.com>")) == Milter.ACCEPT
    assert ("delrcpt", "<dropper@example.com>") in h._ctx.calls
    assert h.rt.store.get(SHORT).recipients == ["bob@example.com"]


def test_quarantine_action_reject_cannot_apply_and_the_message_is_held(tmp_path, caplog):
    h, _ = held_handler(tmp_path, Engine("spamd", SPAM8), Engine("clamd", CLEAN), quarantine_level=6.0,
                        quarantine_action="reject")
    assert feed(h, [("Subject", b" hi")]) == Milter.ACCEPT and h._ctx.reply is None
    assert "cannot apply on Postfix's hold queue" in caplog.text


@pytest.mark.parametrize("fault", ["index", "action", "queue id"])
def test_no_record_or_no_hold_means_tempfail(tmp_path, fault):
    h, order = held_handler(tmp_path, Engine("spamd", SPAM8), Engine("clamd", CLEAN), quarantine_level=6.0)
    if fault == "index":
        (tmp_path / "q" / "hold.sqlite").unlink()
        (tmp_path / "q" / "hold.sqlite").mkdir()                # the index cannot be written
    elif fault == "action":
        h._actions &= ~Milter.QUARANTINE                        # an MTA that does not grant it
    else:
        h._ctx.macros["i"] = ""
    assert feed(h, [("Subject", b" hi")]) == Milter.TEMPFAIL
    assert h._ctx.reply == STORE_FAILED_REPLY and order == []
    assert not [c for c in h._ctx.calls if c[0] in ("hold", "chg", "add")]


# ---------------------------------------------------------------- selftest and postfix-check

def report_answer(action, **report):
    from scanmilter.commands.miltertalk import Answer
    from scanmilter.commands.selftest import REPORT_HEADER
    base = {"viruses": ["Eicar"], "score": 1.0, "required": 5.0, "rules": [], "clamd": "clean", "spamd": "clean",
            "failed": [], "skipped": [], "decision": "quarantine", "reason": "virus", "rule": "V",
            "answer": action, "held": "not stored: self test"}
    return Answer(action, "", [(REPORT_HEADER, json.dumps(base | report))])


def test_selftest_passes_a_message_held_on_the_queue_and_accepted_only_with_the_hold():
    from scanmilter.commands import selftest
    eicar_case = next(c for c in selftest.cases() if c.name == "eicar")
    problem, shown = selftest.judge(eicar_case, report_answer("accept"), hold="scanmilter: virus: V")
    assert problem == "" and "held on Postfix's hold queue (SMFIR_QUARANTINE: scanmilter: virus: V)" in shown
    # accepted without the hold: the message would be delivered
    assert "the policy decides quarantine" in selftest.judge(eicar_case, report_answer("accept"))[0]
    # a hold asked for a message the policy does not hold
    problem, _ = selftest.judge(eicar_case, report_answer("accept", decision="accept", reason="virus", held=""),
                                hold="x")
    assert "does not hold" in problem


def test_postfix_check_wants_the_queue_id_and_warns_of_a_reject_it_cannot_give(tmp_path):
    from scanmilter import policyfile
    from scanmilter.commands.postfix_check import hold_checks
    cfg = config.parse(config.DAEMON_SETTINGS, {"quarantine_backend": "hold", "quarantine_directory": str(tmp_path)},
                       "test")
    policy = policyfile.load("", quarantine_available=True)
    policy = dataclasses.replace(policy, recipients={"inbound": {"a@example.com": {"quarantine_action": "reject"}}})
    findings, passed = hold_checks(cfg, policy, {"milter_end_of_data_macros": "{msg_id}"}, live=False)
    assert [(f.level, f.fix) for f in findings] == [
        ("error", "postconf -e 'milter_end_of_data_macros = i'"),
        ("warning", 'quarantine_action = "discard" there, or quarantine_backend = "files"')]
    assert '[inbound.recipients."a@example.com"]' in findings[1].text and passed == []
    assert hold_checks(cfg, policyfile.load(""), {}, live=False) == ([], [])      # Postfix's default: i
    files = config.parse(config.DAEMON_SETTINGS, {"quarantine_directory": str(tmp_path)}, "test")
    assert hold_checks(files, policy, {"milter_end_of_data_macros": ""}, live=False) == ([], [])


@pytest.mark.skipif(not __import__("shutil").which("postqueue"), reason="Postfix is not installed")
def test_postfix_check_says_when_postqueue_cannot_reach_the_instance(tmp_path):
    from scanmilter.commands.postfix_check import hold_checks
    cfg = config.parse(config.DAEMON_SETTINGS, {"quarantine_backend": "hold", "quarantine_directory": str(tmp_path / "q"),
                                                "postfix_config_directory": str(tmp_path / "no-such-instance"),
                                                "milter_socket": f"unix:{tmp_path}/none.sock"}, "test")
    findings, passed = hold_checks(cfg, None, None, live=True, timeout=1.0)
    [finding] = findings
    assert finding.level == "error" and "postqueue -j failed" in finding.text and "as root" in finding.fix
    assert passed == []
