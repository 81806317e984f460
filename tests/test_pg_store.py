"""The PostgreSQL quarantine (quarantine_backend = "postgresql") against a real PostgreSQL
(tools/pg.py): every verb of the command, filters, paging and --json, injection through every
filter, releases and deletes racing from two processes, purge from two hosts, import from a file
store, the start-up schema check, the backend checks of postfix-check and selftest, and the local
fallback while the database is down (a server of its own, stopped and started by the tests)."""
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import psycopg
import pytest

from conftest import ROOT, scratch
from fakes import Sink
from scanmilter import app, cli, config, db
from scanmilter import quarantine as Q
from scanmilter.commands import postfix_check, selftest
from scanmilter.commands import quarantine as QC
from scanmilter.quarantine import fallback as FB, postgres as PG, release as QR

pytestmark = pytest.mark.integration

MESSAGE = b"Subject: held\r\nFrom: a@b.test\r\n\r\n" + b"a line of a held message, much like the next\r\n" * 400


# ---------------------------------------------------------------- helpers

@pytest.fixture
def dsn(database):
    """A fresh database with the schema applied."""
    with psycopg.connect(database, autocommit=True) as conn:
        db.migrate(conn)
    return database


@pytest.fixture
def stores():
    """stores(dsn, host=..., actor=...): PgStore objects, closed after the test."""
    made = []

    def make(dsn, host="mx1.test", actor="alice", release="inet:127.0.0.1:10026", **kw):
        store = PG.PgStore(db.Database(dsn, connect_timeout=2), host, release, actor, **kw)
        made.append(store)
        return store
    yield make
    for store in made:
        store.close()


def put(store, data=MESSAGE, **meta):
    return store.put(io.BytesIO(data), {"sender": "a@b.test", "recipients": ["c@d.test"], "reason": "spam",
                                        "score": 9.0, "subject": "held", **meta})


def settings(directory, dsn, host="mx1.test", **extra) -> str:
    """A configuration file naming the database; its path."""
    path = Path(directory) / f"{host}.toml"
    values = {"quarantine_backend": "postgresql", "database_dsn": dsn, "database_host_name": host,
              "database_connect_timeout": 2.0, **extra}
    path.write_text("".join(f"{k} = {config.toml_value(v)}\n" for k, v in values.items()))
    return str(path)


def command(capsys, *argv):
    """(exit code, stdout, stderr) of `scanmilter ARGV` run in this process."""
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def process(*argv) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "milter"))
    return subprocess.Popen([sys.executable, "-m", "scanmilter", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def rows(dsn, sql, args=()):
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()


def waiting_locks(dsn) -> int:
    """Sessions waiting for a lock right now (a second release or delete of the same entry)."""
    return rows(dsn, "SELECT count(*) FROM pg_locks WHERE NOT granted")[0][0]


def wait_for(condition, timeout=20.0) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def sink():
    s = Sink(extensions=("8BITMIME",))
    yield s
    s.close()


# ---------------------------------------------------------------- what an entry keeps

def test_an_entry_keeps_everything_with_its_host_release_address_and_compressed_bytes(dsn, stores):
    mx1, mx2 = stores(dsn, "mx1.test"), stores(dsn, "mx2.test")
    hostile = {"sender": "a\udc80\x00\x1b[31m@b.test", "recipients": ["c@d.test", "\u202eevil@x.test"],
               "subject": "s\x00\x1b]0;title\x07\u2028", "client_name": "[192.0.2.1]", "rule": "r'; --"}
    entry_id = put(mx1, **hostile)
    meta = mx2.get(entry_id).meta                           # read from the other host
    for key, value in hostile.items():
        assert meta[key] == value, key                      # byte for byte, as given
    assert (meta["host"], meta["release_address"], meta["size"], meta["released"]) == \
        ("mx1.test", "inet:127.0.0.1:10026", len(MESSAGE), [])
    assert mx2.message(entry_id) == MESSAGE
    [(compression, stored, state, host, sender)] = rows(
        dsn, "SELECT compression, message, state, host, sender FROM quarantine_entries WHERE id = %s", (entry_id,))
    assert compression == "zlib" and zlib.decompress(stored) == MESSAGE and len(stored) < len(MESSAGE) / 10
    assert (state, host) == ("held", "mx1.test")
    assert sender == "a\\x80\\x00\x1b[31m@b.test"          # the searchable column: text PostgreSQL can hold


def test_filters_paging_order_and_stats(dsn, stores):
    store = stores(dsn)
    now = time.time()
    ids = [put(store, sender=f"a{k}@x.test", recipients=[f"r{k}@y.test", "Common@Example.com"],
               reason="spam" if k % 2 else "virus", time=now - k * 3600) for k in range(10)]
    assert [e.id for e in store.select()] == ids                                   # newest first
    assert [e.id for e in store.select(reason="spam")] == ids[1::2]
    assert [e.id for e in store.select(sender="A3@X")] == [ids[3]]                # any case
    assert [e.id for e in store.select(recipient="common@example")] == ids
    assert [e.id for e in store.select(recipient="r4@")] == [ids[4]]
    assert [e.id for e in store.select(since=now - 2.5 * 3600)] == ids[:3]
    assert [e.id for e in store.select(before=now - 7.5 * 3600)] == ids[8:]
    page, matching, size = store.listing(4, 4)
    assert ([e.id for e in page], matching, size) == (ids[4:8], 10, 10 * len(MESSAGE))
    assert store.listing(4, 8, reason="virus")[1:] == (5, 5 * len(MESSAGE))
    stats = store.stats()
    assert stats["by_reason"] == {"spam": {"entries": 5, "bytes": 5 * len(MESSAGE)},
                                  "virus": {"entries": 5, "bytes": 5 * len(MESSAGE)}}
    assert abs(stats["oldest"] - (now - 9 * 3600)) < 1 and stats["released"] == 0


# what a reason, sender or recipient filter may be given: SQL, LIKE's wildcards and escape, the
# placeholders of the driver, NUL, an undecodable byte
HOSTILE = ["' OR '1'='1", "'; DROP TABLE quarantine_entries; --", "%", "_", "\\", "%' --", "') OR true --",
           "$1", "%s", "%(id)s", "'", "--", ";", "\x00", "\udc80", "x' OR 'a'='a", "sp_m", "o'brien", "100%_"]
SENDERS = ["plain@example.org", "o'brien@example.org", "100%_off@spam.test", "back\\slash@x.test",
           "semi;colon--@x.test"]
REASONS = ["spam", "virus", "x' OR 'a'='a", "%", "sp_m"]


def test_injection_through_every_filter_matches_literally_and_leaves_the_rows_intact(dsn, stores, tmp_path,
                                                                                     capsys):
    store = stores(dsn)
    for sender, reason in zip(SENDERS, REASONS):
        put(store, sender=sender, recipients=[f"to-{sender}"], reason=reason)
    entries = {e.id: e.meta for e in store.select()}
    assert len(entries) == 5
    conf = settings(tmp_path, dsn)
    for value in HOSTILE:
        expected = {
            "reason": {i for i, m in entries.items() if m["reason"] == value},
            "sender": {i for i, m in entries.items() if value.lower() in m["sender"].lower()},
            "recipient": {i for i, m in entries.items() if any(value.lower() in r.lower() for r in m["recipients"])},
        }
        for name, want in expected.items():
            assert {e.id for e in store.select(**{name: value})} == want, (name, value)
        if "\x00" in value or "\udc80" in value or value == "--":
            continue                            # not something a command line can carry (argparse drops "--")
        for flag, name in (("--reason", "reason"), ("--from", "sender"), ("--to", "recipient")):
            rc, out, err = command(capsys, "quarantine", "list", "--json", f"{flag}={value}", "-c", conf)
            assert rc == 0, err
            assert {json.loads(line)["id"] for line in out.splitlines()} == expected[name], (flag, value)
    # the time filters take only durations and dates: anything else is refused before any query
    for flag, value in (("--since", "1d'; DROP TABLE quarantine_entries; --"),
                        ("--before", "2026-01-01' OR '1'='1")):
        rc, out, err = command(capsys, "quarantine", "list", f"{flag}={value}", "-c", conf)
        assert rc == QC.EXIT_USAGE and "is not a" in err, (flag, err)
    # every row as it was, the table still there
    assert {e.id: e.meta for e in store.select()} == entries
    assert rows(dsn, "SELECT count(*), to_regclass('quarantine_entries') IS NOT NULL FROM quarantine_entries") == \
        [(5, True)]


# ---------------------------------------------------------------- the command, verb by verb

class Engine:
    """A spam engine that learns whatever it is told."""
    told: list = []

    def tell(self, data, message_class):
        Engine.told.append((data, message_class))
        return True


def test_every_verb_from_the_command_line(dsn, stores, tmp_path, capsys, monkeypatch, sink):
    mx1 = stores(dsn, "mx1.test", release=sink.setting)            # the host that held the mail
    old = time.time() - 3 * 86400
    ids = [put(mx1, sender=f"s{k}@outside.test", reason="virus" if k == 3 else "spam",
               time=old if k >= 4 else time.time() - k) for k in range(6)]
    conf = settings(tmp_path, dsn, "mx2.test")                      # the commands run on another host
    monkeypatch.setattr(QC, "_learner", lambda cfg: ("engine", Engine))
    Engine.told = []

    rc, out, _ = command(capsys, "quarantine", "list", "-c", conf)
    assert rc == 0 and all(i in out for i in ids) and f"Kbytes in 6 entries." in out
    rc, out, _ = command(capsys, "quarantine", "list", "--limit", "4", "--page", "2", "-c", conf)
    assert rc == 0 and [i for i in ids if i in out] == ids[4:] and "Page 2 of 2: 2 shown." in out
    rc, out, _ = command(capsys, "quarantine", "list", "--limit", "4", "--page", "3", "-c", conf)
    assert rc == 0 and "No entries on page 3: 6 match, 4 a page" in out
    rc, out, _ = command(capsys, "quarantine", "list", "--json", "--limit", "2", "-c", conf)
    assert [json.loads(line)["id"] for line in out.splitlines()] == ids[:2]
    assert json.loads(out.splitlines()[0])["host"] == "mx1.test"

    rc, out, _ = command(capsys, "quarantine", "show", ids[0], "-c", conf)
    assert rc == 0 and "from:        <s0@outside.test>" in out and "a line of a held message" in out
    rc, out, _ = command(capsys, "quarantine", "show", ids[0], "--json", "-c", conf)
    assert json.loads(out)["release_address"] == sink.setting
    rc, out, _ = command(capsys, "quarantine", "show", ids[0], "--headers", "-c", conf)
    assert out.splitlines() == ["Subject: held", "From: a@b.test"]
    rc, out, _ = command(capsys, "quarantine", "show", ids[0], "--raw", "-c", conf)
    assert out.encode() == MESSAGE

    # release goes through the service the holding host recorded (quarantine_release_address of
    # mx2 is the default 127.0.0.1:10026, where nothing listens)
    rc, out, err = command(capsys, "quarantine", "release", ids[0], "--by", "carol", "-c", conf)
    assert rc == 0, err
    assert len(sink.messages) == 1 and f"id={ids[0]}, by=carol".encode() in sink.messages[0]["data"]
    [record] = mx1.get(ids[0]).released
    assert (record["by"], record["host"], record["to"]) == ("carol", "mx2.test", ["c@d.test"])
    rc, out, err = command(capsys, "quarantine", "release", ids[0], "-c", conf)
    assert rc == QC.EXIT_RELEASE_FAILED and "already released to c@d.test" in err
    assert f"{ids[0]} was released by carol on mx2.test at " in err and len(sink.messages) == 1
    assert rows(dsn, "SELECT state FROM quarantine_entries WHERE id = %s", (ids[0],)) == [("released",)]

    rc, out, err = command(capsys, "quarantine", "confirm", ids[1], "--by", "dave", "-c", conf)
    assert rc == 0 and f"{ids[1]}: learned as spam" in out, err
    rc, out, err = command(capsys, "quarantine", "release", ids[2], "--learn-ham", "-c", conf)
    assert rc == 0 and "learned as ham" in out, err
    assert [c for _, c in Engine.told] == ["spam", "ham"] and Engine.told[0][0] == MESSAGE
    assert mx1.get(ids[1]).learned[0]["by"] == "dave"

    rc, out, err = command(capsys, "quarantine", "delete", ids[1], "-c", conf)
    assert rc == 0 and "deleted 1 entry" in out
    rc, out, err = command(capsys, "quarantine", "show", ids[1], "-c", conf)
    assert rc == QC.EXIT_NOT_FOUND
    assert f"no quarantine entry {ids[1]}: deleted by {QC.getpass.getuser()} on mx2.test at" in err
    rc, out, err = command(capsys, "quarantine", "delete", "--all", "--reason", "virus", "-c", conf)
    assert rc == 0 and "deleted 1 entry" in out

    rc, out, _ = command(capsys, "quarantine", "stats", "--json", "-c", conf)
    assert json.loads(out)["by_reason"] == {"spam": {"entries": 4, "bytes": 4 * len(MESSAGE)}}
    rc, out, _ = command(capsys, "quarantine", "stats", "-c", conf)
    assert "total             4 entries" in out
    rc, out, _ = command(capsys, "quarantine", "purge", "--older-than", "2d", "--dry-run", "-c", conf)
    assert "would delete 2 entries" in out
    rc, out, _ = command(capsys, "quarantine", "purge", "--older-than", "2d", "-c", conf)
    assert rc == 0 and "deleted 2 entries" in out
    assert {e.id for e in mx1.select()} == {ids[0], ids[2]}
    rc, out, _ = command(capsys, "quarantine", "reindex", "-c", conf)
    assert rc == 0 and "indexed 2 entries" in out
    assert mx1.tallies() == {"release": 2, "delete": 2, "purge": 2, "learn_ham": 1, "learn_spam": 1}
    actions = [r[0] for r in rows(dsn, "SELECT action FROM quarantine_events ORDER BY seq")]
    assert actions == ["release", "learn_spam", "release", "learn_ham", "delete", "delete", "purge", "purge"]


def test_a_release_that_cannot_deliver_leaves_the_entry_held_and_unlocked(dsn, stores):
    store = stores(dsn)
    entry_id = put(store)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]          # nothing listens there once closed
    with pytest.raises(QR.ReleaseError, match="release endpoint"):
        QR.release(store, entry_id, ("127.0.0.1", port), "carol", timeout=5)
    assert store.get(entry_id).released == []
    assert rows(dsn, "SELECT state FROM quarantine_entries WHERE id = %s", (entry_id,)) == [("held",)]
    start = time.monotonic()
    with stores(dsn, "mx2.test").locked(entry_id) as entry:          # nobody holds the row any more
        assert entry.id == entry_id
    assert time.monotonic() - start < 2


# ---------------------------------------------------------------- two admins at once

def test_two_releases_from_two_processes_deliver_once_and_the_second_is_told_who_and_when(dsn, stores, tmp_path):
    entry_id = put(stores(dsn))
    seen = []

    def gate():
        # hold the first delivery until the other release waits for the entry's row lock
        if not seen:
            seen.append("waiting" if wait_for(lambda: waiting_locks(dsn) > 0) else "not waiting")
    sink = Sink(gate, extensions=("8BITMIME",))
    try:
        confs = {by: settings(tmp_path, dsn, host, quarantine_central_release_address=sink.setting)
                 for by, host in (("alice", "mx1.test"), ("bob", "mx2.test"))}
        procs = {by: process("quarantine", "release", entry_id, "--by", by, "-c", conf) for by, conf in confs.items()}
        results = {by: (p.wait(60), *p.communicate()) for by, p in procs.items()}
    finally:
        sink.close()
    assert seen == ["waiting"] and len(sink.messages) == 1
    [winner] = [by for by, r in results.items() if r[0] == 0]
    [loser] = [by for by, r in results.items() if r[0] != 0]
    host = {"alice": "mx1.test", "bob": "mx2.test"}[winner]
    rc, out, err = results[loser]
    assert rc == QC.EXIT_RELEASE_FAILED and "already released to c@d.test" in err
    assert f"{entry_id} was released by {winner} on {host} at " in err
    assert f"by={winner}".encode() in sink.messages[0]["data"]
    assert [r["by"] for r in stores(dsn, "mx3.test").get(entry_id).released] == [winner]


def test_a_delete_waits_for_a_release_in_progress_and_a_later_release_is_told_who_deleted(dsn, stores, tmp_path,
                                                                                          capsys):
    entry_id = put(stores(dsn))
    seen = []

    def gate():
        if not seen:
            seen.append("waiting" if wait_for(lambda: waiting_locks(dsn) > 0) else "not waiting")
    sink = Sink(gate, extensions=("8BITMIME",))
    try:
        mx1 = settings(tmp_path, dsn, "mx1.test", quarantine_central_release_address=sink.setting)
        mx2 = settings(tmp_path, dsn, "mx2.test")
        releasing = process("quarantine", "release", entry_id, "--by", "alice", "-c", mx1)
        assert wait_for(lambda: rows(dsn, "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                                          "WHERE c.relname = 'quarantine_entries' AND l.mode = 'RowShareLock'")[0][0])
        deleting = process("quarantine", "delete", entry_id, "-c", mx2)
        assert (releasing.wait(60), deleting.wait(60)) == (0, 0), (releasing.communicate(), deleting.communicate())
    finally:
        sink.close()
    assert seen == ["waiting"] and len(sink.messages) == 1
    assert [r[0] for r in rows(dsn, "SELECT action FROM quarantine_events WHERE entry_id = %s ORDER BY seq",
                               (entry_id,))] == ["release", "delete"]
    rc, out, err = command(capsys, "quarantine", "release", entry_id, "-c", mx1)
    assert rc == QC.EXIT_NOT_FOUND and f"deleted by {QC.getpass.getuser()} on mx2.test at " in err


# ---------------------------------------------------------------- purge: one host at a time

def old_entries(dsn, count, age=3 * 86400) -> list[str]:
    """`count` entries held `age` seconds ago, written in one go."""
    now = time.time() - age
    batch = []
    for k in range(count):
        meta = {"id": f"{k:024x}", "time": now + k * 0.001, "sender": f"s{k}@x.test", "recipients": ["c@d.test"],
                "reason": "spam", "size": 10, "released": [], "host": "mx1.test", "release_address": ""}
        batch.append({**PG._row(meta), "message": zlib.compress(b"x" * 10)})
    with psycopg.connect(dsn) as conn:
        conn.cursor().executemany(PG._INSERT, batch)
    return [b["id"] for b in batch]


def test_purge_runs_on_one_host_at_a_time_and_skips_an_entry_being_released(dsn, stores, tmp_path, capsys):
    old = old_entries(dsn, 2500)
    fresh = put(stores(dsn))
    conf = settings(tmp_path, dsn, "mx1.test")
    # another host is purging: this one says so and leaves everything as it is
    with psycopg.connect(dsn, application_name="scanmilter command root@mx9.test") as other:
        other.execute("SELECT pg_advisory_xact_lock(%s)", (PG.PURGE_LOCK,))
        rc, out, err = command(capsys, "quarantine", "purge", "--older-than", "1d", "-c", conf)
        assert rc == 0, err
        assert "another host is purging the quarantine (scanmilter command root@mx9.test since" in out
        assert rows(dsn, "SELECT count(*) FROM quarantine_entries")[0][0] == 2501
        other.rollback()
    # an entry being released (its row locked) is left for the next purge
    with psycopg.connect(dsn) as releasing:
        releasing.execute("SELECT 1 FROM quarantine_entries WHERE id = %s FOR UPDATE", (old[0],))
        # two hosts purge at once: each entry is deleted once, by one of them
        hosts, results, barrier = [stores(dsn, h) for h in ("mx1.test", "mx2.test")], {}, threading.Barrier(2)

        def purge(store):
            barrier.wait()
            try:
                results[store.host] = [e.id for e in Q.purge(store, 86400)]
            except Q.Busy as e:
                results[store.host] = str(e)
        threads = [threading.Thread(target=purge, args=(s,)) for s in hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        releasing.rollback()
    deleted = [i for r in results.values() if isinstance(r, list) for i in r]
    assert sorted(deleted) == sorted(old[1:]), {h: r if isinstance(r, str) else len(r) for h, r in results.items()}
    assert [r[0] for r in rows(dsn, "SELECT id FROM quarantine_entries ORDER BY id")] == sorted([old[0], fresh])
    assert rows(dsn, "SELECT count(*), count(DISTINCT entry_id) FROM quarantine_events WHERE action = 'purge'") == \
        [(2499, 2499)]
    assert stores(dsn).tallies()["purge"] == 2499
    rc, out, err = command(capsys, "quarantine", "purge", "--older-than", "1d", "-c", conf)
    assert rc == 0 and "deleted 1 entry" in out


# ---------------------------------------------------------------- from the file store

def test_import_is_idempotent_and_remove_moves_each_entry_once(dsn, stores, tmp_path, capsys):
    files = Q.FileStore(str(tmp_path / "q"))
    ids = [put(files, sender=s) for s in ("a@b.test", "b\udc80@c.test", "c@d.test")]
    with files.locked(ids[0]) as entry:
        entry.meta["released"].append({"at": time.time(), "by": "old", "to": ["c@d.test"]})
        files.update(entry)
    before = {i: files.get(i).meta for i in ids}
    conf = settings(tmp_path, dsn, "mx1.test", quarantine_directory=str(tmp_path / "q"))
    rc, out, err = command(capsys, "quarantine", "import", "-c", conf)
    assert rc == 0 and "imported 3 entries" in out and "0 were there already" in out, err
    rc, out, err = command(capsys, "quarantine", "import", "-c", conf)
    assert rc == 0 and "imported 0 entries" in out and "3 were there already" in out, err
    store = stores(dsn)
    for i in ids:
        assert store.get(i).meta == {**before[i], "host": "mx1.test", "release_address": "inet:127.0.0.1:10026"}
        assert store.message(i) == MESSAGE
    assert store.get(ids[0]).released[0]["by"] == "old"
    assert rows(dsn, "SELECT state FROM quarantine_entries WHERE id = %s", (ids[0],)) == [("released",)]
    rc, out, err = command(capsys, "quarantine", "import", "--from", str(tmp_path / "q"), "--remove", "-c", conf)
    assert rc == 0 and "3 were there already" in out and "removed from the directory" in out
    assert list(files.ids_on_disk()) == [] and len(store.select()) == 3
    assert rows(dsn, "SELECT count(*) FROM quarantine_events WHERE action = 'import'") == [(3,)]


# ---------------------------------------------------------------- the settings, the schema at start-up, migrate

def test_the_settings_say_what_a_postgresql_quarantine_needs(tmp_path):
    def load(**values):
        path = tmp_path / "s.toml"
        path.write_text("".join(f"{k} = {config.toml_value(v)}\n" for k, v in values.items()))
        return config.load(str(path))
    with pytest.raises(config.ConfigError, match="needs a database: set database_dsn_file"):
        load(quarantine_backend="postgresql")
    with pytest.raises(config.ConfigError, match="quarantine_fallback = \"local\" needs quarantine_directory"):
        load(quarantine_backend="postgresql", database_dsn="host=db", quarantine_fallback="local")
    with pytest.raises(config.ConfigError, match="quarantine_central_release_address"):
        load(quarantine_central_release_address="unix:/x")
    cfg = load(quarantine_backend="postgresql", database_dsn="host=db password=hunter2")
    assert "hunter2" not in Q.location(cfg) and Q.location(cfg).startswith("postgresql:")



def test_the_daemon_refuses_a_schema_behind_or_ahead_and_migrate_brings_it_up(database, tmp_path, capsys):
    conf = settings(tmp_path, database, "mx1.test")
    cfg = config.load(conf)
    with pytest.raises(config.ConfigError, match=r"version 0, this scanmilter needs \d+: run `scanmilter "
                                                 r"quarantine migrate`"):
        app.open_store(cfg)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "milter"))
    served = subprocess.run([sys.executable, "-m", "scanmilter", "serve", "-c", conf], capture_output=True,
                            text=True, env=env, timeout=60)
    assert served.returncode == 1 and "fatal: quarantine_backend postgresql:" in served.stderr
    assert "quarantine migrate" in served.stderr

    rc, out, err = command(capsys, "quarantine", "migrate", "-c", conf)
    assert rc == 0 and "applied 0001_quarantine" in out, err
    assert f"schema is at version {len(db.migrations())}" in out
    rc, out, err = command(capsys, "quarantine", "migrate", "-c", conf)
    assert rc == 0 and "nothing to do" in out
    app.open_store(cfg).close()

    rows(database, "INSERT INTO scanmilter_schema (version, name, applied_by) VALUES (99, 'future', 'mx9') "
                   "RETURNING version")
    with pytest.raises(config.ConfigError, match="newer than this scanmilter knows"):
        app.open_store(cfg)


def test_a_database_that_does_not_answer_at_start_up_is_no_reason_to_stay_down(tmp_path):
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    cfg = config.load(settings(tmp_path, f"host={nothing} dbname=x user=x", "mx1.test",
                               database_connect_timeout=1.0, database_retry_interval=30.0))
    store = app.open_store(cfg)
    try:
        assert store.problem and "host=" in store.problem
        start = time.monotonic()
        with pytest.raises(Q.StoreError):
            put(store)                          # the daemon tempfails this message
        assert time.monotonic() - start < 0.5   # at once: the circuit is open
    finally:
        store.close()


# ---------------------------------------------------------------- postfix-check and selftest

def test_postfix_check_and_selftest_check_the_database_and_leave_nothing_behind(dsn, database, tmp_path):
    cfg = config.load(settings(tmp_path, dsn, "mx1.test"))
    findings, passed = postfix_check.database_checks(cfg)
    assert findings == [] and len(passed) == 2
    assert f"schema version {len(db.migrations())}" in passed[0]
    assert "a probe entry was written, read back and rolled back" in passed[1]
    lines = []
    assert selftest.check_database(cfg, lines.append) == 0
    assert [line.split(":")[0] for line in lines] == ["PASS quarantine database",
                                                      "PASS quarantine database probe entry"]
    assert rows(dsn, "SELECT count(*) FROM quarantine_entries") == [(0,)]

    # a schema that is behind, and a database that does not answer
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM scanmilter_schema WHERE version = (SELECT max(version) FROM scanmilter_schema)")
    findings, _ = postfix_check.database_checks(cfg)
    assert [f.level for f in findings] == ["error"] and "quarantine migrate" in findings[0].fix
    lines = []
    assert selftest.check_database(cfg, lines.append) == 1 and lines[0].startswith("FAIL quarantine database:")
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    cfg = config.load(settings(tmp_path, f"host={nothing} dbname=x user=x password=hunter2", "mx2.test",
                               database_connect_timeout=1.0))
    findings, _ = postfix_check.database_checks(cfg)
    assert "does not answer" in findings[0].text and "hunter2" not in findings[0].text


# ---------------------------------------------------------------- PostgreSQL down: a server of our own

@pytest.fixture(scope="module")
def own_pg():
    import pg
    server = pg.PgServer(Path(scratch("scanmilter-pg-own-")) / "pg")
    server.start()
    yield server
    server.stop()


def test_while_postgresql_is_down_held_mail_waits_locally_and_is_moved_once(own_pg, tmp_path, monkeypatch):
    dsn = own_pg.create_database("fallback")
    with psycopg.connect(dsn, autocommit=True) as conn:
        db.migrate(conn)

    def fallback_store():
        return FB.FallbackStore(PG.PgStore(db.Database(dsn, connect_timeout=1), "mx1.test", "inet:127.0.0.1:10026",
                                           "scanmilter", retry_interval=60), str(tmp_path / "local"))
    store = fallback_store()
    try:
        first = put(store, subject="first")
        assert store.waiting() == 0 and store.pg.get(first).subject == "first"
        own_pg.stop()
        try:
            second = put(store, subject="second")
            start = time.monotonic()
            third = put(store, subject="third")
            assert time.monotonic() - start < 0.5          # the circuit: no wait for a dead server
            assert store.waiting() == 2 and store.fallback_puts == 2
            assert store.local().get(second).meta["host"] == "mx1.test"
            with pytest.raises(Q.StoreError):
                store.move_waiting()
            assert store.waiting() == 2
        finally:
            own_pg.start()
        # the daemon's check finds the database back (the pool reconnects), then the mover runs;
        # the first move is cut short between the database's commit and the local delete
        assert store.check_database()["problem"] == ""
        local = store.local()
        real_delete, cut = local.delete, []

        def cut_short(entry_id, action="delete"):
            if not cut:
                cut.append(entry_id)
                raise Q.StoreError("cut short")
            return real_delete(entry_id, action)
        monkeypatch.setattr(local, "delete", cut_short)
        failed = []
        assert store.move_waiting(failed) == 1 and [f[0] for f in failed] == cut and store.waiting() == 1
        assert store.move_waiting() == 1 and store.waiting() == 0
        subjects = sorted(e.subject for e in store.select())
        assert subjects == ["first", "second", "third"]                    # each once
        assert store.pg.message(third) == MESSAGE
        assert rows(dsn, "SELECT count(*), count(DISTINCT entry_id) FROM quarantine_events WHERE action = 'moved'") \
            == [(2, 2)]

        # the daemon's mover and the purge timer at once: each entry moved once
        waiting = [put(local, subject=f"w{k}", host="mx1.test") for k in range(20)]
        movers = [store, fallback_store()]
        moved = []
        threads = [threading.Thread(target=lambda s=s: moved.append(s.move_waiting())) for s in movers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        movers[1].close()
        assert sum(moved) == 20 and store.waiting() == 0
        assert rows(dsn, "SELECT count(*) FROM quarantine_entries WHERE id = ANY(%s)", (waiting,)) == [(20,)]
        assert len(store.select()) == 23
    finally:
        store.close()


def test_a_move_the_database_cuts_short_still_counts_what_it_moved(own_pg, tmp_path, monkeypatch):
    """The daemon's count of moved entries (scanmilter_quarantine_fallback_moved_total and its log
    line) takes in those a run moved before PostgreSQL went away in the middle of it."""
    dsn = own_pg.create_database("cut_short")
    with psycopg.connect(dsn, autocommit=True) as conn:
        db.migrate(conn)
    store = FB.FallbackStore(PG.PgStore(db.Database(dsn, connect_timeout=1), "mx1.test", "inet:127.0.0.1:10026",
                                        "scanmilter", retry_interval=60), str(tmp_path / "local"))
    told = []
    store.on_moved = told.append
    try:
        for k in range(3):
            put(store.local(), subject=f"w{k}", host="mx1.test")
        real_put, stopped = store.pg.put_entry, []

        def stop_after_the_first(meta, data, action):
            fresh = real_put(meta, data, action)
            if not stopped:
                own_pg.stop()
                stopped.append(meta["id"])
            return fresh
        monkeypatch.setattr(store.pg, "put_entry", stop_after_the_first)
        try:
            with pytest.raises(Q.StoreError):
                store.move_waiting()
        finally:
            own_pg.start()
        assert (store.moved, told, store.waiting()) == (1, [1], 2)
        assert store.check_database()["problem"] == ""
        assert store.move_waiting() == 2
        assert (store.moved, told, store.waiting()) == (3, [1, 2], 0)
        assert sorted(e.subject for e in store.select()) == ["w0", "w1", "w2"]
    finally:
        store.close()


def test_without_fallback_held_mail_fails_fast_while_down_and_the_pool_reconnects(own_pg):
    dsn = own_pg.create_database("tempfail")
    with psycopg.connect(dsn, autocommit=True) as conn:
        db.migrate(conn)
    store = PG.PgStore(db.Database(dsn, connect_timeout=1), "mx1.test", "inet:127.0.0.1:10026", "scanmilter",
                       retry_interval=1.0)
    try:
        put(store)
        own_pg.stop("immediate")                    # as at a crash: the pooled connections die
        try:
            with pytest.raises(Q.StoreError):
                put(store)                          # the daemon tempfails it: the sender retries
            start = time.monotonic()
            with pytest.raises(Q.StoreError, match="not tried again"):
                put(store)
            assert time.monotonic() - start < 0.5
        finally:
            own_pg.start()
        # once the retry interval passed, the next message tries again, on a new connection
        assert wait_for(lambda: not store.down, 5)
        put(store)
        assert len(store.select()) == 2
    finally:
        store.close()


# ---------------------------------------------------------------- figures (opt-in)

@pytest.mark.skipif(not os.environ.get("SCANMILTER_PG_FIGURES"),
                    reason="a measurement: SCANMILTER_PG_FIGURES=1 (docs/multi-host.md quotes it)")
def test_figures_hold_list_and_release_10000_entries(own_pg, tmp_path, capsys):
    """docs/multi-host.md's figures: 10,000 entries held through the store as the daemon holds
    them (one transaction each, fsync on), listed by the command, one released."""
    # the tests' server runs with fsync off; these figures are taken with it on, as in production
    own_pg.stop()
    own_pg._run([str(own_pg.bin / "pg_ctl"), "-D", str(own_pg.data), "-o",
                 f"-k {own_pg.root} -c listen_addresses='' -c fsync=on", "-l", str(own_pg.log), "-w", "start"])
    try:
        assert own_pg.psql("SHOW fsync") == "on"
        measure_figures(own_pg, tmp_path, capsys)
    finally:
        own_pg.stop()
        own_pg.start()


def measure_figures(own_pg, tmp_path, capsys):
    dsn = own_pg.create_database("figures")
    with psycopg.connect(dsn, autocommit=True) as conn:
        db.migrate(conn)
    message = (ROOT / "README.md").read_bytes()[:9000].replace(b"\n", b"\r\n")
    figures = {}
    store = PG.PgStore(db.Database(dsn, pool_size=8), "mx1.test", "inet:127.0.0.1:10026", "scanmilter")
    try:
        start = time.monotonic()
        for k in range(2000):
            put(store, message, sender=f"s{k}@outside.test", recipients=[f"u{k % 50}@example.com"])
        figures["hold 2,000, one thread"] = time.monotonic() - start
        start = time.monotonic()
        threads = [threading.Thread(target=lambda t=t: [put(store, message, sender=f"p{t}-{k}@outside.test")
                                                        for k in range(1000)]) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        figures["hold 8,000, 8 threads"] = time.monotonic() - start
    finally:
        store.close()
    sink = Sink(extensions=("8BITMIME",))
    conf = settings(tmp_path, dsn, "mx2.test", quarantine_central_release_address=sink.setting)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "milter"))

    def timed(*argv):
        start = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "scanmilter", *argv, "-c", conf], capture_output=True, env=env)
        assert r.returncode == 0, r.stderr
        return time.monotonic() - start, r.stdout
    figures["(a command's own start-up: stats of an empty database, for comparison)"] = 0.0
    empty = own_pg.create_database("empty")
    with psycopg.connect(empty, autocommit=True) as conn:
        db.migrate(conn)
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "scanmilter", "quarantine", "stats", "-c", settings(tmp_path, empty, "mx9")],
                   capture_output=True, env=env, check=True)
    figures["(a command's own start-up: stats of an empty database, for comparison)"] = time.monotonic() - start
    figures["list, first page of 50"], out = timed("quarantine", "list", "--limit", "50")
    assert b"Kbytes in 10000 entries" in out
    figures["list --json, all 10,000"], out = timed("quarantine", "list", "--json")
    assert out.count(b"\n") == 10000
    figures["list --from s1234@, all"], _ = timed("quarantine", "list", "--from", "s1234@")
    entry_id = json.loads(out.splitlines()[0])["id"]
    figures["release one, command to accepted"], _ = timed("quarantine", "release", entry_id)
    assert len(sink.messages) == 1
    sink.close()
    size = rows(dsn, "SELECT pg_total_relation_size('quarantine_entries')")[0][0]
    with capsys.disabled():
        print(f"\n10,000 entries of {len(message)} bytes: table {size / 2**20:.0f} MiB")
        for what, seconds in figures.items():
            print(f"  {what}: {seconds:.2f} s")


# ---------------------------------------------------------------- a deleted entry never comes back

def test_a_deleted_or_purged_entry_is_never_brought_back_by_a_later_move_or_import(dsn, stores, tmp_path):
    # the mover copies an entry and only then removes the local copy: a crash in between, or an
    # import run again without --remove, used to put back entries an admin had deleted (a virus)
    # or the purge had removed, held again and releasable
    files = Q.FileStore(str(tmp_path / "q"))
    ids = [put(files, sender=f"{n}@b.test") for n in "abc"]
    store = stores(dsn)
    assert store.import_from(files, action="moved") == (3, 0)     # the local copies stay, as after a crash
    store.delete(ids[0], by="bob")
    store.delete(ids[1], action="purge", by="timer")
    assert store.import_from(files, remove=True, action="moved") == (0, 3)
    assert list(files.ids_on_disk()) == []
    assert [e.id for e in store.select()] == [ids[2]]
    with pytest.raises(Q.NotFound, match="deleted by bob"):
        store.get(ids[0])
    with pytest.raises(Q.NotFound, match="purged by timer"):
        store.get(ids[1])
