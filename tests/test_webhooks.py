"""Webhooks without a mail stack: a receiver started by the tests (tests/receiver.py) gets the events,
signed as docs/webhooks.md says (checked with the snippet printed there), retried after a 500,
never redirected, given up at the deadline; a full queue drops and counts; a command's flush
at exit is bounded; hostile fields stay data. The events of the quarantine stores (files, hold,
postgresql), the handler, health and pools, and clamd's database age. Through real Postfix:
test_e2e_webhooks.py."""
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from conftest import ROOT
from fakes import CLEAN, HAM, Engine, feed, handler
from receiver import Receiver, documented_verify
from scanmilter import app, config, events, webhooks
from scanmilter import quarantine as Q
from scanmilter.health import Health
from scanmilter.metrics import Metrics
from scanmilter.quarantine import hold as H
from scanmilter.scanners import ERROR, ScanResult
from scanmilter.scanners.pool import Member, Pool

SECRET = "0123456789abcdef-test-secret"
EICAR = ScanResult("clamd", "found", viruses=("Eicar-Test-Signature",))


# ---------------------------------------------------------------- helpers

def load(tmp_path, tables: str = "", **flat):
    """config.load of a file with these flat settings and [[webhook]] tables."""
    path = tmp_path / "scanmilter.toml"
    path.write_text("".join(f"{k} = {config.toml_value(v)}\n" for k, v in flat.items()) + tables)
    return config.load(str(path))


def table(url, events=(), secret=SECRET, **keys):
    lines = ["[[webhook]]", f"url = {config.toml_value(url)}"]
    if secret:
        lines.append(f"secret = {config.toml_value(secret)}")
    if events:
        lines.append(f"events = {config.toml_value(list(events))}")
    lines += [f"{k} = {config.toml_value(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def start():
    """start(cfg): this process's sender for cfg's webhooks, with metrics; stopped after the test."""
    def make(cfg):
        metrics = Metrics(CollectorRegistry())
        webhooks.start(cfg, webhooks.hooks_from(cfg), metrics)
        return metrics
    yield make
    webhooks.finish(timeout=0)


def count(metrics, name, **labels) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


# ---------------------------------------------------------------- delivery and signature

def test_an_event_is_delivered_signed_and_the_documented_check_accepts_it(tmp_path, receiver, start):
    cfg = load(tmp_path, table(receiver.url("/in")))
    start(cfg)
    events.engine_changed("clamd", None, False, "refused: [Errno 111] Connection refused")
    request = receiver.wait_event(events.ENGINE_DOWN)
    h = request.headers
    assert request.path == "/in" and h["Content-Type"] == "application/json"
    assert h["User-Agent"].startswith("scanmilter/")
    document = request.json()
    assert document == {"version": events.VERSION, "event": "engine.down", "id": h["X-Scanmilter-Delivery"],
                        "time": document["time"], "host": document["host"],
                        "data": {"engine": "clamd", "member": None,
                                 "detail": "refused: [Errno 111] Connection refused"}}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", document["time"])
    assert re.fullmatch(r"[0-9a-f]{32}", document["id"])
    verify = documented_verify()
    assert verify(SECRET.encode(), h, request.body)
    # a wrong secret, a changed body, a changed timestamp, an old request: refused
    assert not verify(b"another secret", h, request.body)
    assert not verify(SECRET.encode(), h, request.body.replace(b"clamd", b"spamd"))
    later = dict(h, **{"X-Scanmilter-Timestamp": str(int(h["X-Scanmilter-Timestamp"]) + 1)})
    assert not verify(SECRET.encode(), later, request.body)
    assert not verify(SECRET.encode(), h, request.body, now=time.time() + 301)       # a replay, later
    assert not verify(SECRET.encode(), {}, request.body)
    # hostile headers are refused, never an exception in the receiver's code
    for bad in ({"X-Scanmilter-Timestamp": "9" * 5000}, {"X-Scanmilter-Signature-256": "sha256=\u00e9"},
                {"X-Scanmilter-Timestamp": "\u0661\u0662"}):
        assert not verify(SECRET.encode(), dict(h, **bad), request.body)


def test_only_the_webhooks_that_ask_for_an_event_get_it(tmp_path, receiver, start):
    other = Receiver()
    try:
        cfg = load(tmp_path, table(receiver.url(), events=[events.ENGINE_UP], name="ups")
                   + table(other.url(), secret_file=str(secret_file(tmp_path))))
        metrics = start(cfg)
        events.engine_changed("spamd", None, False, "timeout")
        events.engine_changed("spamd", None, True)
        other.wait(lambda: len(other.received()) == 2, "both events at the webhook that wants every event")
        receiver.wait_event(events.ENGINE_UP)
        assert [r.headers["X-Scanmilter-Event"] for r in receiver.received()] == ["engine.up"]
        # each signed with its own webhook's secret
        assert documented_verify()(b"from-a-file", other.received()[0].headers, other.received()[0].body)
        webhooks.finish(timeout=5)
        assert count(metrics, "scanmilter_webhook_sent_total", webhook="ups") == 1
        assert count(metrics, "scanmilter_webhook_sent_total", webhook="1") == 2
    finally:
        other.close()


def secret_file(tmp_path, text="from-a-file\n", mode=0o640):
    path = tmp_path / "secret"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_500_is_retried_with_the_same_body_until_accepted(tmp_path, receiver, start):
    receiver.answer(200, plan=[500, 503])
    cfg = load(tmp_path, table(receiver.url()), webhook_retry_interval=0.2)
    metrics = start(cfg)
    events.engine_changed("clamd", "unix:/run/clamd-2.ctl", True)
    receiver.wait(lambda: len(receiver.received()) == 3, "two retries")
    first, second, third = receiver.received()
    assert first.body == second.body == third.body
    assert len({r.headers["X-Scanmilter-Delivery"] for r in (first, second, third)}) == 1
    assert all(documented_verify()(SECRET.encode(), r.headers, r.body) for r in (first, second, third))
    assert webhooks.finish(timeout=5) == 0
    assert count(metrics, "scanmilter_webhook_retries_total", webhook="0") == 2
    assert count(metrics, "scanmilter_webhook_sent_total", webhook="0") == 1
    assert count(metrics, "scanmilter_webhook_failed_total", webhook="0") == 0


def test_backoff_doubles_and_the_deadline_gives_up(tmp_path, receiver, start, logged):
    receiver.answer(500)
    cfg = load(tmp_path, table(receiver.url()), webhook_retry_interval=0.2, webhook_deadline=2.5)
    metrics = start(cfg)
    began = time.monotonic()
    events.engine_changed("clamd", None, True)
    receiver.wait(lambda: count(metrics, "scanmilter_webhook_failed_total", webhook="0") == 1, "giving up", 10)
    took = time.monotonic() - began
    attempts = receiver.received()
    # attempts at about 0, 0.2, 0.6, 1.4 s; the next (3.0 s) would start past the deadline (2.5 s)
    assert len(attempts) == 4 and took < 2.5 + 1.0, (len(attempts), took)
    assert count(metrics, "scanmilter_webhook_retries_total", webhook="0") == 3
    assert "engine.up for webhook 0 not delivered after 4 attempt(s): answered 500" in logged.text
    assert receiver.url() not in logged.text and "/hook" not in logged.text


def test_an_unreachable_receiver_is_retried_and_logged_without_the_urls_token(tmp_path, start, logged):
    import stack as stacklib
    url = f"http://127.0.0.1:{stacklib.free_port()}/services/T0/tok3n?key=k3y"      # nothing listens there
    metrics = start(load(tmp_path, table(url), webhook_retry_interval=0.1, webhook_deadline=1.0))
    sender, pending_then = webhooks._sender, []

    class Watch(logging.Handler):
        def emit(self, record):
            if "not delivered" in record.getMessage():
                pending_then.append(sender.pending())
    watch = Watch()
    logging.getLogger("scanmilter").addHandler(watch)
    try:
        events.engine_changed("clamd", None, True)
        assert webhooks.finish(timeout=10) == 0
    finally:
        logging.getLogger("scanmilter").removeHandler(watch)
    # the line is out before the event stops being pending: finish() (a command's exit) waits for it
    assert pending_then == [1]
    assert count(metrics, "scanmilter_webhook_failed_total", webhook="0") == 1
    assert count(metrics, "scanmilter_webhook_retries_total", webhook="0") >= 2
    assert "Connection refused" in logged.text
    assert "tok3n" not in logged.text and "k3y" not in logged.text and "/services" not in logged.text


def test_other_refusals_are_not_retried_and_redirects_are_never_followed(tmp_path, receiver, start):
    elsewhere = Receiver()
    try:
        receiver.location = elsewhere.url("/stolen")
        receiver.answer(200, plan=[307, 404])
        cfg = load(tmp_path, table(receiver.url()), webhook_retry_interval=0.1)
        metrics = start(cfg)
        events.engine_changed("clamd", None, True)
        events.engine_changed("spamd", None, True)
        receiver.wait(lambda: count(metrics, "scanmilter_webhook_failed_total", webhook="0") == 2, "two refusals")
        assert len(receiver.received()) == 2
        assert webhooks.finish(timeout=5) == 0
        assert elsewhere.received() == []
    finally:
        elsewhere.close()


# ---------------------------------------------------------------- never waiting

def test_a_full_queue_drops_new_events_counts_and_logs_them_once(tmp_path, receiver, start, logged):
    receiver.answer("hang")
    cfg = load(tmp_path, table(receiver.url(), timeout=30.0), webhook_queue_size=2)
    metrics = start(cfg)
    events.engine_changed("clamd", None, True)
    receiver.wait(lambda: receiver.hanging == 1, "the first event held by the receiver")
    began = time.monotonic()
    for _ in range(6):              # 2 fit in the queue, 4 are dropped: none waits
        events.engine_changed("clamd", None, True)
    assert time.monotonic() - began < 1.0
    assert count(metrics, "scanmilter_webhook_dropped_total", reason="queue_full") == 4
    drops = [r for r in logged.records if "queue full" in r.getMessage()]
    assert len(drops) == 1 and drops[0].levelno == logging.WARNING     # logged once, not per event
    assert "webhook_queue_size = 2" in drops[0].getMessage()


def test_the_flush_at_exit_is_bounded_and_drops_the_rest(tmp_path, receiver, start, logged):
    receiver.answer("hang")
    cfg = load(tmp_path, table(receiver.url(), timeout=60.0), webhook_flush_timeout=0.5)
    metrics = start(cfg)
    events.engine_changed("clamd", None, False, "x")
    events.engine_changed("clamd", None, True)
    receiver.wait(lambda: receiver.hanging == 1, "a request held by the receiver")
    began = time.monotonic()
    assert webhooks.finish() == 2
    assert 0.4 < time.monotonic() - began < 2.0
    assert count(metrics, "scanmilter_webhook_dropped_total", reason="exit") == 2
    assert "2 event(s) not delivered within webhook_flush_timeout (0.5s) at exit: dropped" in logged.text
    webhooks.emit(events.ENGINE_UP, {})         # after finish: nothing, no error
    assert not webhooks.wanted(events.ENGINE_UP)


def test_the_quarantine_command_never_hangs_on_a_dead_receiver(tmp_path, receiver):
    """A real `scanmilter quarantine delete` against a receiver that never answers: it deletes, then
    exits within webhook_flush_timeout, saying what it dropped."""
    receiver.answer("hang")
    store = Q.FileStore(str(tmp_path / "q"))
    entry = hold(store)
    path = tmp_path / "scanmilter.toml"
    path.write_text(f'quarantine_directory = "{tmp_path / "q"}"\nwebhook_flush_timeout = 1.0\n'
                    + table(receiver.url(), timeout=60.0))
    began = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "scanmilter", "quarantine", "delete", entry, "-c", str(path)],
                         capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, PYTHONPATH=str(ROOT / "milter")))
    took = time.monotonic() - began
    assert out.returncode == 0 and "deleted 1 entry" in out.stdout, out
    assert "1 event(s) not delivered within webhook_flush_timeout (1.0s) at exit: dropped" in out.stderr
    assert took < 1.0 + 5.0, took
    [request] = receiver.received()
    assert request.json()["data"]["entry"] == entry and store.select() == []


# ---------------------------------------------------------------- hostile data

def test_hostile_fields_are_json_encoded_and_capped(tmp_path, receiver, start):
    cfg = load(tmp_path, table(receiver.url()), webhook_field_limit=50, webhook_list_limit=3)
    start(cfg)
    subject = '"}, "event": "forged", "x": "\r\nX-Injected: 1\r\n\x00\x1b[2J' + "A" * 5000
    recipients = [f"r{i}@example.com" for i in range(500)]
    sender = "caf\udce9\udc80@outside.test"         # undecodable bytes, as pymilter hands them over
    events.virus_found("4XQID1", ["Eicar</script>" * 20], "reject", "", "inbound", sender, recipients, subject,
                       "203.0.113.7")
    request = receiver.wait_event(events.VIRUS)
    document = request.json()
    assert document["event"] == "virus.found" and set(document) == {"version", "event", "id", "time", "host", "data"}
    data = document["data"]
    assert data["subject"] == subject[:50] and len(data["viruses"][0]) == 50
    assert data["recipients"] == recipients[:3] and data["recipient_count"] == 500
    assert data["sender"] == "caf\\xe9\\x80@outside.test"
    assert b"\r\n" not in request.body and b"X-Injected: 1\r\n" not in request.body


def test_numbers_json_cannot_carry_become_null():
    assert webhooks.capped({"score": float("nan"), "t": float("inf"), "n": 3, "b": True}, 10, 10) == \
        {"score": None, "t": None, "n": 3, "b": True}


# ---------------------------------------------------------------- configuration

@pytest.mark.parametrize("tables, error", [
    ('[[webhook]]\nurl = "ftp://example.org/x"\nsecret = "s"\n', ":2: url: expected an http:// or https:// URL"),
    ('[[webhook]]\nurl = "https://"\nsecret = "s"\n', ":2: url: expected an http:// or https:// URL"),
    ('[[webhook]]\nurl = "https://u:p@example.org/"\nsecret = "s"\n', ":2: url: no user or password"),
    ('[[webhook]]\nurl = "https://example.org/a b"\nsecret = "s"\n', ":2: url: white space"),
    ('[[webhook]]\nurl = "https://example.org/"\n', ":1: [[webhook]] needs secret_file (or secret)"),
    ('[[webhook]]\nsecret = "s"\n', ":1: [[webhook]] needs a url"),
    ('[[webhook]]\nurl = "https://example.org/"\nsecret = "s"\nevents = ["virus.fund"]\n',
     ":4: events: unknown event 'virus.fund' (did you mean virus.found?)"),
    ('[[webhook]]\nurl = "https://example.org/"\nsecret = "s"\ntimout = 3\n',
     ":4: unknown setting 'timout' (did you mean timeout?)"),
    ('[[webhook]]\nurl = "https://example.org/"\nsecret = "s"\ntimeout = 0\n', ":4: timeout must be more than 0"),
    ('[[webhook]]\nurl = "https://a.example/"\nsecret = "s"\n[[webhook]]\nurl = "https://b.example/"\nsecret = "s"\n'
     'name = "0"\n', ":4: two webhooks are named '0'"),
    ('[[webhook]]\nurl = "https://a.example/"\nsecret = "s"\n\n[[webhook]]\nurl = "https://b.example/"\n'
     'secret = "s"\nevents = "virus.found"\n', ":8: events must be a list of strings"),
    ('[webhook]\nurl = "https://a.example/"\n', ": webhook must be tables written [[webhook]]"),
])
def test_bad_webhook_tables_stop_start_up_naming_the_line(tmp_path, tables, error):
    with pytest.raises(config.ConfigError) as e:
        load(tmp_path, tables)
    assert error in str(e.value), str(e.value)


def test_check_config_shows_the_tables_never_the_secret_nor_the_url_path(tmp_path):
    cfg = load(tmp_path, table("https://chat.example.org/services/T0/B0/tok3n?key=k3y", events=["virus.found"])
               + table("http://127.0.0.1:8080/", secret="", secret_file="/etc/scanmilter/hook.secret",
                       name="alerts", timeout=2.5))
    out = config.render(cfg, only_changed=True)          # what `check-config -n` prints of the settings
    assert config.render(cfg, defaults=True).count("[[webhook]]") == 0
    assert SECRET not in out and "tok3n" not in out and "k3y" not in out
    assert '[[webhook]]\nurl = "https://chat.example.org/****"\nevents = ["virus.found"]\nsecret = "****"' in out
    assert 'url = "http://127.0.0.1:8080/"' in out and 'secret_file = "/etc/scanmilter/hook.secret"' in out
    assert 'name = "alerts"' in out and "timeout = 2.5" in out


def test_secret_files_are_read_and_checked(tmp_path):
    def cfg(path):
        return load(tmp_path, table("https://example.org/", secret="", secret_file=str(path)))
    assert webhooks.hooks_from(cfg(secret_file(tmp_path, "  s3cret  \nsecond line\n")))[0].secret == b"s3cret"
    for text, mode, error in (("s3cret\n", 0o644, "readable by every user"), ("\n", 0o600, r"secret_file \S+: empty$"),
                              ("s3cret\n", 0o602, "writable by every user")):
        with pytest.raises(config.ConfigError, match=error):
            webhooks.hooks_from(cfg(secret_file(tmp_path, text, mode)))
    with pytest.raises(config.ConfigError, match="cannot read"):
        webhooks.hooks_from(cfg(tmp_path / "missing"))
    assert "s3cret" not in repr(webhooks.hooks_from(cfg(secret_file(tmp_path, "s3cret\n")))[0])


def test_the_configuration_doc_lists_every_key_of_a_webhook_table():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert config.markdown_table(config.WEBHOOK_SETTINGS) in doc


def test_every_event_in_the_doc_has_an_example_with_exactly_its_fields(tmp_path, receiver, start):
    """docs/webhooks.md shows each event with an example; its fields are those the code sends."""
    doc = (ROOT / "docs" / "webhooks.md").read_text()
    examples = dict(re.findall(r"^### `([\w.]+)`\n.*?```json\n(.*?)```", doc, re.M | re.S))
    assert sorted(examples) == sorted(events.EVENTS)
    start(load(tmp_path, table(receiver.url())))
    meta = {"id": "5f2d0c9a1b7e4c3d2a1f0e9d", "time": time.time(), **held("4Xk2Lz1F3zQ")}
    events.quarantined(meta, meta["id"], "files", 4211)
    events.released(meta, ["bob@example.com"], "postmaster")
    events.deleted(meta, meta["id"], "delete", "root")
    events.deleted(meta, meta["id"], "purge", "root")
    events.virus_found("4Xk2Lz1F3zQ", ["V"], "reject", "", "inbound", "a@b", ["c@d"], "s", "203.0.113.7")
    events.engine_changed("clamd", "unix:/x", False, "refused")
    events.engine_changed("clamd", "unix:/x", True)
    events.DatabaseAge().observe(27000, time.time() - 5 * 86400, 3 * 86400)
    receiver.wait(lambda: len(receiver.received()) == len(events.EVENTS), "every event")
    for request in receiver.received():
        name = request.json()["event"]
        assert set(request.json()["data"]) == set(json.loads(examples[name])), name


# ---------------------------------------------------------------- the quarantine's events, every backend

def held(qid="4XQID1", reason="spam"):
    return Q.held_meta(queue_id=qid, sender="a@outside.test", recipients=["bob@example.com"], subject="held one",
                       all_recipients=["bob@example.com"], client_address="203.0.113.7", client_name="x",
                       auth_user="", direction="inbound", reason=reason, viruses=[], score=8.0, rules=["R"],
                       rule="quarantine_level = 6.0 from [inbound]")


def hold(store, qid="4XQID1"):
    return store.put(io.BytesIO(b"Subject: held one\r\n\r\nbody\r\n"), held(qid))


def names(receiver):
    return [r.json()["event"] for r in receiver.received()]


def test_file_store_delete_and_purge_are_announced_once_each(tmp_path, receiver, start):
    start(load(tmp_path, table(receiver.url())))
    store = Q.FileStore(str(tmp_path / "q"))
    first, second, third = hold(store), hold(store), hold(store)
    with events.acting_as("web:alice"):
        store.delete(first)
    request = receiver.wait_event(events.DELETED)
    assert request.json()["data"] == {"entry": first, "queue_id": "4XQID1", "reason": "spam",
                                      "sender": "a@outside.test", "recipients": ["bob@example.com"],
                                      "recipient_count": 1, "subject": "held one",
                                      "held_at": request.json()["data"]["held_at"], "by": "web:alice"}
    with pytest.raises(Q.NotFound):
        store.delete(first)                     # nothing done: nothing announced
    gone = Q.purge(store, 0)
    assert sorted(e.id for e in gone) == sorted([second, third])
    receiver.wait(lambda: len(receiver.received()) == 3, "two purge events")
    assert names(receiver) == ["message.deleted", "message.purged", "message.purged"]   # not also "deleted"
    assert sorted(r.json()["data"]["entry"] for r in receiver.received()[1:]) == sorted([second, third])
    assert Q.purge(store, 0, dry_run=True) == [] and webhooks.finish(timeout=5) == 0
    assert len(receiver.received()) == 3


class FakePostfix:
    """postqueue -j, postcat, postsuper -H / -d over a dict of queued messages (the hold backend)."""

    def __init__(self):
        self.queue: dict[str, dict] = {}

    def add(self, qid):
        self.queue[qid] = {"queue_name": "hold", "queue_id": qid, "arrival_time": int(time.time() - 1),
                           "message_size": 123, "sender": "a@outside.test",
                           "recipients": [{"address": "bob@example.com"}]}

    def __call__(self, name, *args):
        out, err = b"", b""
        if name == "postqueue" and args == ("-j",):
            out = b"".join(json.dumps(m).encode() + b"\n" for m in self.queue.values())
        elif name == "postcat":
            out = b"Subject: held one\n\nbody\n"
        elif name == "postsuper" and args[0] == "-H" and args[1] in self.queue:
            self.queue[args[1]]["queue_name"] = "deferred"
            err = f"postsuper: {args[1]}: released from hold\n".encode()
        elif name == "postsuper" and args[0] == "-d" and args[1] in self.queue:
            del self.queue[args[1]]
            err = f"postsuper: {args[1]}: removed\n".encode()
        return subprocess.CompletedProcess([name, *args], 0, out, err)


def test_hold_queue_release_and_delete_are_announced(tmp_path, receiver, start):
    start(load(tmp_path, table(receiver.url())))
    store = H.HoldStore(str(tmp_path / "q"), keep=3600)
    store._postfix = postfix = FakePostfix()
    for qid in ("B185821E096", "C185821E096"):
        hold(store, qid)
        postfix.add(qid)
    assert store.release("B185821E096", "postmaster") == ["bob@example.com"]
    request = receiver.wait_event(events.RELEASED)
    assert request.json()["data"]["entry"] == "B185821E096" and request.json()["data"]["by"] == "postmaster"
    assert request.json()["data"]["recipients"] == ["bob@example.com"]
    store.delete("C185821E096", by="carol")
    assert receiver.wait_event(events.DELETED).json()["data"]["by"] == "carol"
    assert webhooks.finish(timeout=5) == 0 and names(receiver) == ["message.released", "message.deleted"]


@pytest.mark.integration
def test_postgresql_and_its_fallback_store_announce_delete_and_purge_once(tmp_path, receiver, start, database):
    """A real PostgreSQL (conftest's): PgStore, and FallbackStore around it (which delegates)."""
    import psycopg
    from scanmilter import db
    from scanmilter.quarantine import fallback as FB, postgres as PG
    with psycopg.connect(database, autocommit=True) as conn:
        db.migrate(conn)
    start(load(tmp_path, table(receiver.url())))
    pg = PG.PgStore(db.Database(database, connect_timeout=2), "mx1.test", "inet:127.0.0.1:10026", "alice")
    try:
        store = FB.FallbackStore(pg, str(tmp_path / "local"))
        ids = [hold(store) for _ in range(3)]
        store.delete(ids[0])
        assert receiver.wait_event(events.DELETED).json()["data"]["entry"] == ids[0]
        pg.delete(ids[1])
        receiver.wait(lambda: len(receiver.received(events.DELETED)) == 2, "the second deletion")
        assert {e.id for e in Q.purge(store, 0)} == {ids[2]}
        assert receiver.wait_event(events.PURGED).json()["data"]["subject"] == "held one"
        assert webhooks.finish(timeout=5) == 0
        assert names(receiver) == ["message.deleted", "message.deleted", "message.purged"]
    finally:
        pg.close()


# ---------------------------------------------------------------- the daemon's events

def test_the_handler_announces_a_virus_and_a_held_message(tmp_path, receiver, start):
    start(load(tmp_path, table(receiver.url())))
    h = handler(Engine("spamd", HAM), Engine("clamd", EICAR))
    feed(h, [("Subject", b" an invoice")], rcpts=("<u@example.com>", "<v@example.com>"))
    data = receiver.wait_event(events.VIRUS).json()["data"]
    assert data == {"queue_id": "4XQID1", "viruses": ["Eicar-Test-Signature"], "action": "reject", "entry": None,
                    "direction": "inbound", "sender": "a@example.org", "recipients": ["u@example.com", "v@example.com"],
                    "recipient_count": 2, "subject": "an invoice", "client_address": "192.0.2.1"}
    # held: both events, the virus naming the entry
    h = handler(Engine("spamd", HAM), Engine("clamd", EICAR), daemon={"quarantine_directory": str(tmp_path / "q")},
                virus_action="quarantine")
    h.rt.store = store = Q.FileStore(str(tmp_path / "q"))
    feed(h, [("Subject", b" held")])
    [entry] = store.select()
    quarantined = receiver.wait_event(events.QUARANTINED).json()["data"]
    assert quarantined["entry"] == entry.id and quarantined["backend"] == "files"
    assert quarantined["reason"] == "virus" and quarantined["viruses"] == ["Eicar-Test-Signature"]
    assert quarantined["subject"] == "held" and quarantined["size"] == entry.size
    receiver.wait_event(events.VIRUS, lambda d: d["entry"] == entry.id and d["action"] == "quarantine")
    # clean mail: nothing
    feed(handler(Engine("spamd", HAM), Engine("clamd", CLEAN)), [("Subject", b" fine")])
    assert webhooks.finish(timeout=5) == 0 and len(receiver.received()) == 3


def test_engine_events_are_sent_on_changes_of_state_only(tmp_path, receiver, start):
    start(load(tmp_path, table(receiver.url())))
    health = Health(None, failure_threshold=1, retry_interval=60)
    health.mark("spamd", True)                  # first word: up; nothing changed
    health.mark("spamd", False, "timeout")
    health.mark("spamd", False, "timeout")      # still down
    health.mark("spamd", True)
    health.mark("spamd", True)
    health.mark("clamd", False, "refused")      # down from the start: said
    health.member_mark("clamd", "unix:/b.sock", False, "refused")
    health.member_mark("clamd", "unix:/b.sock", True)
    receiver.wait(lambda: len(receiver.received()) == 5, "five changes")
    assert webhooks.finish(timeout=5) == 0
    assert [(r.json()["event"], r.json()["data"]) for r in receiver.received()] == [
        ("engine.down", {"engine": "spamd", "member": None, "detail": "timeout"}),
        ("engine.up", {"engine": "spamd", "member": None}),
        ("engine.down", {"engine": "clamd", "member": None, "detail": "refused"}),
        ("engine.down", {"engine": "clamd", "member": "unix:/b.sock", "detail": "refused"}),
        ("engine.up", {"engine": "clamd", "member": "unix:/b.sock"})]


class Scanner:
    """A pool member's client that fails while `down` is set."""

    def __init__(self):
        self.down, self.timeout = False, 5.0

    def scan(self, spool):
        return ScanResult("clamd", ERROR, "refused: dead") if self.down else ScanResult("clamd", "clean")

    def ping(self):
        return "refused: dead" if self.down else ""


def test_a_pool_member_going_down_and_up_is_announced_and_the_engine_stays_up(tmp_path, receiver, start):
    start(load(tmp_path, table(receiver.url())))
    a, b = Scanner(), Scanner()
    pool = Pool("clamd", [Member("unix:/a.sock", a), Member("unix:/b.sock", b)], 5.0,
                Health(None, failure_threshold=1, retry_interval=60))
    assert pool.ping() == ""
    b.down = True
    for _ in range(3):
        assert pool.scan(None).outcome == "clean"       # a takes the mail
    assert pool.ping() == ""                            # the engine as a whole answers
    b.down = False
    assert pool.ping() == ""
    receiver.wait(lambda: len(receiver.received()) == 2, "down and up")
    assert webhooks.finish(timeout=5) == 0
    assert [(r.json()["event"], r.json()["data"]["member"]) for r in receiver.received()] == [
        ("engine.down", "unix:/b.sock"), ("engine.up", "unix:/b.sock")]


class OldClamd:
    name = "clamd"

    def __init__(self, built):
        self.built = built

    def ping(self):
        return ""

    def version(self):
        return 27000, self.built


def test_an_old_clamd_database_is_announced_once_per_crossing(tmp_path, receiver, start, logged):
    from fakes import POOL
    from scanmilter.handler import Runtime
    from scanmilter.pipeline import Pipeline
    cfg = load(tmp_path, table(receiver.url()), clamd_database_age_limit=86400.0)
    start(cfg)
    clamd = OldClamd(time.time() - 2 * 86400)
    runtime = Runtime(cfg, None, Pipeline([clamd], POOL, Health()), None, Metrics(CollectorRegistry()))
    app.check(runtime)
    app.check(runtime)                                  # still old: not again
    data = receiver.wait_event(events.DATABASE_OLD).json()["data"]
    assert data["version"] == 27000 and data["limit_seconds"] == 86400
    assert 2 * 86400 <= data["age_seconds"] < 2 * 86400 + 60
    assert "clamd's signature database 27000 was built 2.0 days ago" in logged.text
    clamd.built = time.time()                           # freshclam ran
    app.check(runtime)
    clamd.built = time.time() - 3 * 86400               # and stopped again
    app.check(runtime)
    receiver.wait(lambda: len(receiver.received()) == 2, "the second crossing")
    assert webhooks.finish(timeout=5) == 0 and names(receiver) == ["clamd.database_old"] * 2


def test_database_age_limit_zero_and_unknown_build_times_say_nothing():
    age = events.DatabaseAge()
    assert not age.observe(1, time.time() - 10 * 86400, 0)
    assert not age.observe(1, float("nan"), 86400)
    assert age.observe(1, time.time() - 10 * 86400, 86400)


def test_without_webhooks_nothing_is_built_or_queued(monkeypatch):
    """No [[webhook]]: the events' data is not even assembled."""
    assert not webhooks.wanted(events.VIRUS)
    monkeypatch.setattr(events, "_emit", lambda *a: pytest.fail("emitted without a webhook"))
    events.virus_found("Q", ["V"], "reject", "", "inbound", "a@b", ["c@d"], "s", "192.0.2.1")
    events.deleted(None, "x", "delete", "me")


def test_an_event_that_cannot_be_built_never_reaches_the_caller(tmp_path, receiver, start, logged):
    start(load(tmp_path, table(receiver.url())))
    events.quarantined(None, "x", "files", 1)          # a bug's input: logged, not raised
    assert "could not announce quarantined" in logged.text
    events.engine_changed("clamd", None, True)
    receiver.wait_event(events.ENGINE_UP)


def test_emitting_from_many_threads_never_blocks_while_the_receiver_hangs(tmp_path, receiver, start):
    receiver.answer("hang")
    metrics = start(load(tmp_path, table(receiver.url(), timeout=30.0), webhook_queue_size=50))
    took = []

    def mail_thread():
        began = time.monotonic()
        for _ in range(50):
            events.virus_found("Q", ["V"], "reject", "", "inbound", "a@b", ["c@d"], "s", "192.0.2.1")
        took.append(time.monotonic() - began)
    threads = [threading.Thread(target=mail_thread) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(took) == 8 and max(took) < 2.0, took
    receiver.wait(lambda: receiver.hanging == 1, "the receiver holding one request")
    dropped = count(metrics, "scanmilter_webhook_dropped_total", reason="queue_full")
    assert dropped >= 400 - 51 and webhooks.wanted(events.VIRUS)


class Dribbler:
    """A receiver that reads the request, then answers its status line a byte every 50 ms for ever:
    every read of the answer gets a byte well within the webhook's timeout."""

    def __init__(self):
        import socket
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stop, self.cut = threading.Event(), threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._dribble, args=(conn,), daemon=True).start()

    def _dribble(self, conn):
        with conn:
            conn.recv(65536)
            try:
                conn.sendall(b"HTTP/1.1 200 ")
                while not self.stop.wait(0.05):
                    conn.sendall(b"O")
            except OSError:                 # the sender gave up on this answer
                self.cut.set()

    def close(self):
        self.stop.set()
        self.listener.close()


def test_a_receiver_dribbling_its_answer_is_cut_at_the_timeout_and_delays_no_other_webhook(
        tmp_path, receiver, start):
    """requests' timeout bounds each read, not the answer: a receiver sending a byte every 50 ms
    held the one sending thread (every webhook's events) for as long as it liked. Each attempt is
    now cut at the webhook's timeout, so the next webhook gets its event within seconds."""
    slow = Dribbler()
    try:
        cfg = load(tmp_path, table(slow.url(), name="slow", timeout=1.0) + table(receiver.url(), name="fine"),
                   webhook_retry_interval=30.0)
        metrics = start(cfg)
        began = time.monotonic()
        events.engine_changed("clamd", None, True)
        receiver.wait_event(events.ENGINE_UP, timeout=15)
        assert time.monotonic() - began < 15
        assert slow.cut.wait(10), "the dribbling answer was never cut"
        receiver.wait(lambda: count(metrics, "scanmilter_webhook_retries_total", webhook="slow") == 1,
                      "the cut attempt counted for a retry", 10)
    finally:
        slow.close()


def test_a_url_path_that_requests_re_encodes_never_reaches_the_log(tmp_path, start, logged):
    """requests names the URL in its errors as it sent it, percent-encoded: a path or query with
    a character it encodes (or a %XX it decodes) must be hidden in that form too."""
    import stack as stacklib
    url = f"http://127.0.0.1:{stacklib.free_port()}/services/t\u00f6k3n|x?key=%41k3y|z"      # nothing listens there
    start(load(tmp_path, table(url), webhook_retry_interval=0.1, webhook_deadline=0.5))
    events.engine_changed("clamd", None, True)
    assert webhooks.finish(timeout=10) == 0
    assert "Connection refused" in logged.text
    for secret in ("k3n", "%C3%B6", "k3y", "services"):
        assert secret not in logged.text, secret
