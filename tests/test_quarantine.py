"""The quarantine store on its own: crash safety, index rebuild, ids, permissions, failures, locks,
release over SMTP (to a small SMTP server in a thread), what `show` lets reach a terminal."""
import errno
import io
import os
import pwd
import re
import sqlite3
import stat
import threading
import time

import pytest

from conftest import scratch
from fakes import Sink
from scanmilter import cli
from scanmilter import quarantine as Q
from scanmilter.commands import quarantine as QC
from scanmilter.quarantine import entry as QE, release as QR


def put(store, data=b"Subject: x\r\n\r\nbody\r\n", **meta):
    return store.put(io.BytesIO(data), {"sender": "a@b.test", "recipients": ["c@d.test"], "reason": "spam",
                                        "score": 9.0, **meta})


def test_put_get_message(tmp_path):
    store = Q.FileStore(str(tmp_path / "q"))
    entry_id = put(store)
    assert Q.valid_id(entry_id)
    assert store.message(entry_id) == b"Subject: x\r\n\r\nbody\r\n"
    meta = store.get(entry_id).meta
    assert meta["size"] == 20 and meta["reason"] == "spam" and meta["released"] == []


def modes(directory):
    return {name: stat.S_IMODE(os.lstat(os.path.join(directory, name)).st_mode) for name in os.listdir(directory)}


# 0117 is what milter_socket_mode 0660 gives the daemon around socket creation; 0777 takes everything
@pytest.mark.parametrize("umask", [0o022, 0o117, 0o777])
def test_directories_0700_and_files_0600_under_any_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        store = Q.FileStore(str(tmp_path / "q"))
        entry = store.get(put(store))
        entry.meta["learned"] = []
        store.update(entry)
        store.reindex()
        store._mark_stale()            # what a failed index write leaves
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "q").st_mode) == 0o700
    assert modes(tmp_path / "q") == {"entries": 0o700, "index.sqlite": 0o600, "index.sqlite-wal": 0o600,
                                     "index.sqlite-shm": 0o600, "index.stale": 0o600}
    assert modes(tmp_path / "q" / "entries") == {f"{entry.id}.msg": 0o600, f"{entry.id}.json": 0o600}


def test_an_index_left_group_readable_is_made_0600(tmp_path):
    store = Q.FileStore(str(tmp_path / "q"))
    put(store)
    for name in ("index.sqlite", "index.sqlite-wal"):
        os.chmod(tmp_path / "q" / name, 0o644)
    Q.FileStore(str(tmp_path / "q")).select()
    assert {n: m for n, m in modes(tmp_path / "q").items() if n.startswith("index")} == {
        "index.sqlite": 0o600, "index.sqlite-wal": 0o600, "index.sqlite-shm": 0o600}


@pytest.mark.parametrize("name", ["index.sqlite", "index.sqlite-wal"])
def test_a_symlinked_index_is_refused(tmp_path, name):
    (tmp_path / "q").mkdir()
    (tmp_path / "elsewhere").write_bytes(b"")
    os.symlink(tmp_path / "elsewhere", tmp_path / "q" / name)
    with pytest.raises(Q.StoreError, match="not a regular file"):
        Q.FileStore(str(tmp_path / "q"))
    assert (tmp_path / "elsewhere").read_bytes() == b""


def test_ids_are_random_and_validated(tmp_path):
    store = Q.FileStore(str(tmp_path / "q"))
    assert len({put(store) for _ in range(20)}) == 20
    for bad in ("../x", "0" * 23, "g" * 24, "0" * 24 + "/..", ""):
        with pytest.raises(Q.NotFound):
            store.get(bad)


def test_a_writer_killed_before_rename_leaves_no_entry_and_no_garbage(tmp_path, monkeypatch):
    store = Q.FileStore(str(tmp_path / "q"))
    real_rename = os.rename

    def crash(src, dst, **kw):
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt       # the process dies between writing and publishing
        return real_rename(src, dst, **kw)
    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        put(store)
    monkeypatch.setattr(os, "rename", real_rename)
    assert store.select() == [] and list(store.ids_on_disk()) == []
    left = os.listdir(tmp_path / "q" / "entries")
    assert left and all(n.endswith(".msg") for n in left)      # the unpublished message file
    # a temp file of a writer killed by SIGKILL mid-write
    (tmp_path / "q" / "entries" / ".tmp-abc.msg.1234").write_bytes(b"half")
    assert Q.FileStore(str(tmp_path / "q")).recover(min_age=0) == 2
    assert os.listdir(tmp_path / "q" / "entries") == []


def test_recover_spares_young_temp_files_of_a_running_writer(tmp_path):
    store = Q.FileStore(str(tmp_path / "q"))
    (tmp_path / "q" / "entries" / ".tmp-abc.msg.1234").write_bytes(b"being written")
    assert store.recover() == 0


@pytest.mark.parametrize("failing", [".msg", ".json"])
def test_disk_full_raises_and_leaves_nothing(tmp_path, monkeypatch, failing):
    """The disk fills while the message file or the metadata file is written: nothing may remain."""
    store = Q.FileStore(str(tmp_path / "q"))
    real_fsync = os.fsync
    failed = []

    def fsync(fd):
        # the temp file the entry's message or metadata is written to: .tmp-ID.msg.XXXXXXXX
        if re.search(rf"/\.tmp-[0-9a-f]{{24}}\{failing}\.[0-9a-f]{{8}}$", os.readlink(f"/proc/self/fd/{fd}")):
            failed.append(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(Q.StoreError, match="No space left"):
        put(store, data=b"Subject: x\r\n\r\n" + b"x" * 300_000)
    assert failed                                     # the write of the entry file failed, not the read
    assert os.listdir(tmp_path / "q" / "entries") == []
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert store.select() == []


def test_symlinked_entries_directory_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "q").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "q" / "entries")
    with pytest.raises(Q.StoreError, match="not a directory"):
        Q.FileStore(str(tmp_path / "q"))


def test_index_is_rebuilt_from_the_files(tmp_path):
    store = Q.FileStore(str(tmp_path / "q"))
    ids = {put(store, reason="virus"), put(store)}
    del store
    for name in os.listdir(tmp_path / "q"):
        if name.startswith("index.sqlite"):
            os.unlink(tmp_path / "q" / name)
    again = Q.FileStore(str(tmp_path / "q"))
    assert {e.id for e in again.select()} == ids           # rebuilt on first listing
    assert [e.meta["reason"] for e in again.select(reason="virus")] == ["virus"]
    assert again.reindex() == 2


@pytest.mark.parametrize("pattern", ["%", "_", "x%y", "a_b", "\\"])
def test_sender_and_recipient_filters_match_literally(tmp_path, pattern):
    """LIKE's wildcards in a filter are the characters themselves, as in the PostgreSQL store:
    `--from %` finds senders with a percent sign, not every entry."""
    store = Q.FileStore(str(tmp_path / "q"))
    plain = put(store, sender="plain@example.test", recipients=["r@example.test"])
    odd = put(store, sender=f"odd{pattern}@example.test", recipients=[f"r{pattern}@example.test"])
    assert [e.id for e in store.select(sender=pattern)] == [odd]
    assert [e.id for e in store.select(recipient=pattern)] == [odd]
    assert {e.id for e in store.select(sender="@example.test")} == {plain, odd}


def test_filters_delete_purge_and_stats(tmp_path):
    store = Q.FileStore(str(tmp_path / "q"))
    old = put(store, time=time.time() - 40 * 86400, sender="x@old.test")
    new = put(store, recipients=["boss@example.com"])
    assert [e.id for e in store.select()] == [new, old]                    # newest first
    assert [e.id for e in store.select(sender="OLD.test")] == [old]
    assert [e.id for e in store.select(recipient="boss@")] == [new]
    assert [e.id for e in store.select(since=time.time() - 86400)] == [new]
    assert [e.id for e in Q.purge(store, 30 * 86400, dry_run=True)] == [old]
    assert len(store.select()) == 2
    Q.purge(store, 30 * 86400)
    assert [e.id for e in store.select()] == [new]
    assert store.stats()["by_reason"]["spam"]["entries"] == 1
    store.delete(new)
    with pytest.raises(Q.NotFound):
        store.delete(new)
    # what the daemon exports as scanmilter_quarantine_actions_total; a failed delete counts nothing
    assert store.tallies() == {"release": 0, "delete": 1, "purge": 1, "learn_ham": 0, "learn_spam": 0}
    assert Q.FileStore(str(tmp_path / "q")).tallies()["delete"] == 1     # shared between processes


def test_tallies_survive_a_reindex(tmp_path):
    store = Q.FileStore(str(tmp_path / "q"))
    store.delete(put(store))
    store.reindex()
    assert store.tallies()["delete"] == 1


def test_release_failure_leaves_the_entry_intact(tmp_path):
    store = Q.FileStore(str(tmp_path / "q"))
    entry_id = put(store)
    with pytest.raises(QR.ReleaseError, match="release endpoint"):
        QR.release(store, entry_id, ("127.0.0.1", 9), "me", timeout=2)        # nothing listens on port 9
    assert store.get(entry_id).meta["released"] == []
    assert store.tallies()["release"] == 0
    with pytest.raises(QR.ReleaseError, match="not among the entry's recipients"):
        QR.release(store, entry_id, ("127.0.0.1", 9), "me", to=["stranger@x.test"])


@pytest.mark.parametrize("text, seconds", [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("2w", 1209600)])
def test_durations(text, seconds):
    assert QC.duration(text) == seconds


def test_cli_usage_errors_are_one_line(tmp_path, capsys):
    from scanmilter import cli
    conf = tmp_path / "s.toml"
    conf.write_text(f'quarantine_directory = "{tmp_path}/q"\n')
    assert cli.main(["quarantine", "purge", "--older-than", "soon", "-c", str(conf)]) == 2
    assert cli.main(["quarantine", "show", "../../etc/passwd", "-c", str(conf)]) == 1
    assert cli.main(["quarantine", "list", "-c", str(conf)]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "not a duration" in out.err and "not a quarantine id" in out.err
    assert "Quarantine is empty" in out.out


# ---- undecodable envelope addresses (pymilter hands raw bytes over surrogate-escaped)

def test_undecodable_addresses_are_held_listed_reindexed_and_purged(tmp_path, capsys):
    store = Q.FileStore(str(tmp_path / "q"))
    put(store, subject="first")                           # the index is not empty: no rebuild hides a gap
    entry_id = put(store, sender="a\udce9@x.test", recipients=["b\udcff@y.test"])
    assert store.get(entry_id).meta["sender"] == "a\udce9@x.test"        # kept exactly in the .json
    assert len(list(store.ids_on_disk())) == 2
    assert [e.meta["sender"] for e in store.select(sender="a\udce9")] == ["a\udce9@x.test"]
    conf = tmp_path / "s.toml"
    conf.write_text(f'quarantine_directory = "{tmp_path}/q"\n')
    assert cli.main(["quarantine", "list", "-c", str(conf)]) == 0
    assert cli.main(["quarantine", "show", entry_id, "-c", str(conf)]) == 0
    out = capsys.readouterr()
    assert "a\\xe9@x.test" in out.out and "b\\xff@y.test" in out.out and "Traceback" not in out.err
    assert store.reindex() == 2
    assert len(Q.purge(store, 0)) == 2 and os.listdir(tmp_path / "q" / "entries") == []


def test_put_removes_its_files_when_indexing_fails_unexpectedly(tmp_path, monkeypatch):
    store = Q.FileStore(str(tmp_path / "q"))

    class Broken:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def execute(self, *args):
            raise UnicodeEncodeError("utf-8", "a\udce9", 1, 2, "surrogates not allowed")
    monkeypatch.setattr(store, "_db", lambda: Broken())
    with pytest.raises(Q.StoreError):
        put(store)
    assert os.listdir(tmp_path / "q" / "entries") == []


def write_raw_entry(store, entry_id, meta_text: str, message=b"Subject: x\r\n\r\nbody\r\n"):
    """An entry as an older version or a broken disk left it."""
    (open(os.path.join(store.entries_dir, f"{entry_id}.msg"), "wb")).write(message)
    (open(os.path.join(store.entries_dir, f"{entry_id}.json"), "w")).write(meta_text)


def test_reindex_is_one_transaction_that_skips_and_reports_bad_entries(tmp_path, capsys):
    store = Q.FileStore(str(tmp_path / "q"))
    good = {put(store), put(store)}
    # an entry an older version wrote for a sender with a raw byte (its insert used to crash)
    old = "1" * 24
    write_raw_entry(store, old, '{"id": "%s", "time": 1.0, "sender": "a\\udce9@x.test", "recipients": '
                                '["c@d.test"], "reason": "spam", "released": []}' % old)
    broken = "2" * 24
    write_raw_entry(store, broken, '{"id": "%s", "time": ' % broken)          # cut short
    skipped = []
    assert store.reindex(skipped) == 3
    assert [i for i, _ in skipped] == [broken] and "unreadable metadata" in skipped[0][1]
    assert {e.id for e in store.select()} == good | {old}
    conf = tmp_path / "s.toml"
    conf.write_text(f'quarantine_directory = "{tmp_path}/q"\n')
    assert cli.main(["quarantine", "reindex", "-c", str(conf)]) == QC.EXIT_INCOMPLETE
    out = capsys.readouterr()
    assert f"skipped {broken}: entry {broken}: unreadable metadata" in out.err and "Traceback" not in out.err
    assert out.out.startswith("indexed 3 entries")
    # the broken entry can still be deleted; then purge sees everything
    assert cli.main(["quarantine", "delete", broken, "-c", str(conf)]) == 0
    assert len(Q.purge(store, 0)) == 3 and os.listdir(tmp_path / "q" / "entries") == []


def test_a_failed_rebuild_leaves_the_old_index(tmp_path, monkeypatch):
    store = Q.FileStore(str(tmp_path / "q"))
    ids = {put(store), put(store), put(store)}
    real_row, calls = QE.index_row, []

    def row(meta):
        calls.append(meta["id"])
        if len(calls) == 2:
            raise sqlite3.OperationalError("disk I/O error")
        return real_row(meta)
    monkeypatch.setattr(QE, "index_row", row)
    with pytest.raises(Q.StoreError, match="cannot rebuild the index"):
        store.reindex()
    monkeypatch.setattr(QE, "index_row", real_row)
    assert store.index_stale()                       # tried again at the next listing
    assert {e.meta["id"] for e in store.select()} == ids and not store.index_stale()


# ---- a failed index write is reported and repaired

def test_a_locked_index_is_reported_and_the_entry_listed_after_repair(tmp_path, capsys):
    store = Q.FileStore(str(tmp_path / "q"), index_timeout=0.1)
    first = put(store)
    blocker = sqlite3.connect(str(tmp_path / "q" / "index.sqlite"), isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    errors = []
    try:
        hidden = store.put(io.BytesIO(b"Subject: y\r\n\r\nbody\r\n"), {"sender": "e@f.test", "reason": "virus"},
                           index_failed=errors.append)
        assert [type(e) for e in errors] == [sqlite3.OperationalError] and "locked" in str(errors[0])
        assert store.index_stale()
        assert {f"{hidden}.msg", f"{hidden}.json"} <= set(os.listdir(tmp_path / "q" / "entries"))
    finally:
        blocker.rollback()
        blocker.close()
    # the next run of the command (another process: another Store) lists it again
    conf = tmp_path / "s.toml"
    conf.write_text(f'quarantine_directory = "{tmp_path}/q"\n')
    assert cli.main(["quarantine", "list", "-c", str(conf)]) == 0
    assert hidden in capsys.readouterr().out
    assert {e.id for e in store.select()} == {first, hidden} and not store.index_stale()


# ---- ownership when root runs the command

def run_as(user: str, argv: list[str], out_dir: str) -> tuple[int, str, str]:
    """cli.main(argv) in a child process that switched to `user` (the purge service's view)."""
    pw = pwd.getpwnam(user)
    out, err = os.path.join(out_dir, "out"), os.path.join(out_dir, "err")
    pid = os.fork()
    if pid == 0:        # the child: never return into pytest
        code = 99
        try:
            import sys
            import traceback
            with open(out, "w") as sys.stdout, open(err, "w") as sys.stderr:   # opened before the switch
                try:
                    os.setgroups([])
                    os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
                    os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
                    code = cli.main(argv)
                except BaseException:
                    traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), open(out).read(), open(err).read()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to change owners")
def test_root_keeps_owners_and_purge_goes_past_what_it_cannot_delete():
    top = scratch("scanmilter-q-owner-")
    os.chmod(top, 0o755)
    nobody = pwd.getpwnam("nobody")
    q = os.path.join(top, "q")
    Q.FileStore(q)
    for d in (q, os.path.join(q, "entries"), os.path.join(q, "index.sqlite")):
        os.chown(d, nobody.pw_uid, nobody.pw_gid)
    store = Q.FileStore(q)                                   # root, like `scanmilter quarantine release`
    old = time.time() - 40 * 86400
    ids = [put(store, time=old) for _ in range(3)]
    entry = store.get(ids[0])
    entry.meta["learned"] = [{"at": 1.0, "by": "root", "as": "ham"}]
    store.update(entry)
    store._mark_stale()
    for path in [os.path.join(q, n) for n in os.listdir(q)] + \
            [os.path.join(q, "entries", n) for n in os.listdir(os.path.join(q, "entries"))]:
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid), path
    # a message file root left behind in an older version: the purge service cannot open it
    os.chown(os.path.join(q, "entries", f"{ids[1]}.msg"), 0, 0)
    conf = os.path.join(top, "s.toml")
    with open(conf, "w") as f:
        f.write(f'quarantine_directory = "{q}"\n')
    os.chmod(conf, 0o644)
    code, out, err = run_as("nobody", ["quarantine", "purge", "--older-than", "30d", "-c", conf], top)
    assert code == QC.EXIT_INCOMPLETE, (out, err)
    assert f"scanmilter: purge {ids[1]}: cannot lock entry {ids[1]}: Permission denied" in err
    assert "Traceback" not in err and out.startswith("deleted 2 entries")
    assert sorted(os.listdir(os.path.join(q, "entries"))) == [f"{ids[1]}.json", f"{ids[1]}.msg"]


# ---- release, to a Sink (fakes.py)

@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.close()


def flock_waiters(path) -> int:
    """How many flock requests on `path` wait for the lock right now (from /proc/locks)."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as f:
        return sum(1 for line in f if re.search(rf"->\s+FLOCK\s.*\s{dev}\s", line))


def wait_for(condition, timeout=10.0):
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


FORGED = (b"X-Spam-Flag: NO\r\n"
          b"x-virus-status: clean\r\n"
          b"X-Quarantine-Released: id=000000000000000000000000, by=me\r\n"
          b"X-SPAM-Status: No, score=-100\r\n\tfolded=yes\r\n"
          b"X-Spamming-Is-Not-A-Verdict: kept\r\n"
          b"Subject: hello\r\n"
          b"x-Virus-Scanned:\n\tby the sender\r\n")


def test_release_strips_forged_verdict_headers_and_adds_ours_once(tmp_path, sink):
    store = Q.FileStore(str(tmp_path / "q"))
    body = b"X-Spam-Flag: in the body stays\r\nbody\r\n"
    entry_id = put(store, data=FORGED + b"\r\n" + body)
    assert QR.release(store, entry_id, sink.address, "postmaster") == ["c@d.test"]
    [got] = sink.messages
    head, _, rest = got["data"].partition(b"\r\n\r\n")
    assert rest == body                                     # the body byte for byte
    names = [line.split(b":")[0].lower() for line in head.split(b"\r\n") if line[:1] not in (b" ", b"\t")]
    assert names == [b"x-quarantine-released", b"x-spamming-is-not-a-verdict", b"subject"]
    assert head.startswith(f"X-Quarantine-Released: id={entry_id}, by=postmaster, at=".encode())
    assert b"folded" not in head and b"by the sender" not in head
    record = store.get(entry_id).meta["released"][0]
    assert record["stripped"] == ["X-Spam-Flag", "x-virus-status", "X-Quarantine-Released", "X-SPAM-Status",
                                  "x-Virus-Scanned"]


def test_release_uses_smtputf8_for_utf8_addresses(tmp_path, sink):
    store = Q.FileStore(str(tmp_path / "q"))
    entry_id = put(store, sender="jöran@bücher.test", recipients=["zoë@example.com"])
    assert QR.release(store, entry_id, sink.address, "me") == ["zoë@example.com"]
    [got] = sink.messages
    assert got["mail"].lower() == "mail from:<jöran@bücher.test> smtputf8".encode()      # bytes: ASCII only lowered
    assert [r.lower() for r in got["rcpt_lines"]] == ["rcpt to:<zoë@example.com>".encode()]


def release_cli(tmp_path, entry_id, address, capsys):
    conf = tmp_path / "s.toml"
    conf.write_text(f'quarantine_directory = "{tmp_path}/q"\n'
                    f'quarantine_release_address = "inet:{address[0]}:{address[1]}"\n'
                    'quarantine_release_timeout = 5.0\n')
    code = cli.main(["quarantine", "release", entry_id, "--by", "me", "-c", str(conf)])
    return code, capsys.readouterr()


def test_release_errors_are_one_line_with_exit_3(tmp_path, capsys):
    store = Q.FileStore(str(tmp_path / "q"))
    plain = Sink(extensions=("8BITMIME",))                # no SMTPUTF8
    try:
        utf8 = put(store, sender="jöran@bücher.test")
        code, out = release_cli(tmp_path, utf8, plain.address, capsys)
        assert code == 3 and out.err.count("\n") == 1 and "Traceback" not in out.err
        assert out.err.startswith(f"scanmilter: release {utf8}: ") and "SMTPUTF8" in out.err
        raw = put(store, sender="a\udce9@x.test")             # bytes that are no UTF-8 at all
        code, out = release_cli(tmp_path, raw, plain.address, capsys)
        assert code == 3 and out.err.count("\n") == 1 and "Traceback" not in out.err
        assert out.err.startswith(f"scanmilter: release {raw}: sender <a\\xe9@x.test> has bytes that are not UTF-8")
        assert plain.messages == []
        assert store.get(utf8).meta["released"] == [] and store.get(raw).meta["released"] == []
    finally:
        plain.close()


# ---- entry locks: each verb is atomic per entry

def test_two_concurrent_releases_deliver_once(tmp_path):
    store = Q.FileStore(str(tmp_path / "q"))
    entry_id = put(store)
    msg_file = os.path.join(store.entries_dir, f"{entry_id}.msg")
    held_until = []

    def gate():
        # hold the first delivery open until the second release either connected (no lock) or
        # waits for the entry's lock
        if not held_until:
            held_until.append("lock" if wait_for(lambda: sink.connections >= 2 or flock_waiters(msg_file))
                              and sink.connections < 2 else "second connection")
    sink = Sink(gate=gate)
    results = []

    def release():
        try:
            results.append(QR.release(Q.FileStore(str(tmp_path / "q")), entry_id, sink.address, "me", timeout=20))
        except QR.ReleaseError as e:
            results.append(str(e))
    try:
        threads = [threading.Thread(target=release) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        sink.close()
    assert len(sink.messages) == 1, held_until
    assert held_until == ["lock"]
    assert sorted(map(str, results)) == ["['c@d.test']", "already released to c@d.test; use --force to deliver again"]
    assert len(store.get(entry_id).meta["released"]) == 1


def test_delete_racing_update_never_leaves_metadata_without_message(tmp_path, monkeypatch):
    store = Q.FileStore(str(tmp_path / "q"))
    entry_id = put(store)
    entries = tmp_path / "q" / "entries"
    msg_file = entries / f"{entry_id}.msg"
    real_rename, waited = os.rename, []

    def rename(src, dst, **kw):
        # the update is about to publish its .json: let the delete run (without locks) or start
        # waiting for the entry's lock first
        if threading.current_thread().name == "update" and str(dst).endswith(".json"):
            started.set()
            waited.append(wait_for(lambda: not (entries / f"{entry_id}.json").exists() or flock_waiters(msg_file)))
        return real_rename(src, dst, **kw)
    monkeypatch.setattr(os, "rename", rename)
    started, errors = threading.Event(), []
    entry = store.get(entry_id)
    entry.meta["learned"] = [{"at": 1.0, "by": "me", "as": "spam"}]

    def run(call):
        try:
            call()
        except Q.NotFound as e:
            errors.append(e)
    update = threading.Thread(target=run, args=(lambda: store.update(entry),), name="update")
    update.start()
    assert started.wait(10)
    delete = threading.Thread(target=run, args=(lambda: Q.FileStore(str(tmp_path / "q")).delete(entry_id),))
    delete.start()
    update.join(20)
    delete.join(20)
    assert waited == [True] and errors == []
    assert os.listdir(entries) == []                        # updated, then deleted: nothing left


def test_update_after_delete_does_not_bring_the_entry_back(tmp_path):
    store = Q.FileStore(str(tmp_path / "q"))
    entry_id = put(store)
    entry = store.get(entry_id)
    store.delete(entry_id)
    entry.meta["learned"] = [{"at": 1.0, "by": "me", "as": "spam"}]
    with pytest.raises(Q.NotFound):
        store.update(entry)
    assert os.listdir(tmp_path / "q" / "entries") == [] and store.select() == []


# ---- what `show` lets reach a terminal

REORDERING = ["\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069", "\u200e",
              "\u200f", "\u061c", "\u2028", "\u2029", "\x1b", "\x9b", "\x07"]


def test_show_lets_no_reordering_or_control_character_through(tmp_path, capsys):
    import email.header
    store = Q.FileStore(str(tmp_path / "q"))
    nasty = "".join(REORDERING)
    subject = email.header.Header(f"invoice {nasty} cod.exe", "utf-8").encode()
    message = (f"From: evil{nasty}@x.test\r\nSubject: {subject}\r\nContent-Type: text/plain; charset=utf-8\r\n"
               f"Content-Transfer-Encoding: 8bit\r\n\r\nline one {nasty} end\r\nline two\u202egnp.exe\r\n").encode()
    entry_id = put(store, data=message, sender=f"evil{nasty}@x.test", recipients=[f"c{nasty}@d.test"],
                   subject=f"invoice {nasty}")
    conf = tmp_path / "s.toml"
    conf.write_text(f'quarantine_directory = "{tmp_path}/q"\n')
    for args in ([], ["--headers"]):
        assert cli.main(["quarantine", "show", entry_id, *args, "-c", str(conf)]) == 0
        shown = capsys.readouterr().out
        assert "line one" in shown or args, shown
        assert not [c for c in REORDERING if c in shown], shown
    assert cli.main(["quarantine", "list", "-c", str(conf)]) == 0
    assert not [c for c in REORDERING if c in capsys.readouterr().out]
    from scanmilter.logs import escape
    assert escape("a\u202eb\u2028c\u061cd\udce9") == "a\\u202eb\\u2028c\\u061cd\\xe9"
