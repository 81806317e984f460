"""The hold store: Postfix's own hold queue as the quarantine (quarantine_backend = "hold").

The daemon records its verdict by Postfix queue id in a small index before it answers, then puts
the message on hold with the milter quarantine action (SMFIR_QUARANTINE) and lets Postfix accept
it. The message itself never leaves Postfix's queue: listing reads `postqueue -j`, showing and
learning read `postcat -q`, release is `postsuper -H` (the message goes on to delivery without
being scanned again) and delete is `postsuper -d`, all against the instance that
postfix_config_directory names.

Layout under quarantine_directory (0700; files 0600):
  hold.sqlite   one row per message the daemon held: the queue id, when, the verdict (the same
                metadata as entry.held_meta), and what became of it (held, released, deleted,
                purged, gone) with who and when; tallies of the quarantine command's actions
  locks/QID     one lock file per entry that a command acted on (an flock, released on exit)
An entry is listed while its row says held and Postfix has that queue id on hold. A row whose
message left Postfix's queue without scanmilter (postsuper by hand, or a message that was never
queued after the daemon answered) is marked gone after HOLD_GRACE_SECONDS and said so; rows of
finished entries are kept for `keep` seconds (quarantine_max_age) to tell who did what, then
dropped.

Release and delete hold the entry's lock from the check of its state to the record of what was
done: two releases, or a release and a delete, never both act, and the second is told who did
what and when. Postfix holds a whole message, not a recipient: release delivers to every
recipient still on it (docs/hold-queue.md says which those are).

SECURITY: queue ids from the command line are validated against Postfix's short and long queue
id alphabets before they reach any command; commands run without a shell, with a timeout, and
their arguments never start with "-" unless we wrote them. `postqueue -j` output carries the
sender's addresses: each line is parsed strictly and anything unexpected is skipped and noted,
never trusted. The message bytes come from `postcat` and are handed out only as bytes.
"""
from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from .entry import Entry
from .store import ACTIONS, NotFound, Store, StoreError

INDEX_NAME = "hold.sqlite"
LOCKS_NAME = "locks"
INDEX_TIMEOUT = 10.0            # seconds a writer waits for the index's write lock
# A row the daemon wrote can precede the queue file Postfix shows (the answer is still on its
# way, or a later milter refused the message and Postfix never queued it): only a row older than
# this whose queue id Postfix does not show is taken to be gone.
HOLD_GRACE_SECONDS = 600
# Postfix's arrival time is taken before our record; a queue entry that arrived later than our
# record (beyond this much clock adjustment) is another message that reuses a short queue id.
CLOCK_SLACK_SECONDS = 60
COPY_CHUNK = 256 * 1024

HELD, RELEASED, DELETED, PURGED, GONE = "held", "released", "deleted", "purged", "gone"
PROBE_ID = "000000"             # a short queue id of inode 0, which no queue file has

# Postfix's queue ids (src/global/mail_queue.h): short ids are five upper-case hex digits of
# microseconds and the inode number in hex; long ids (enable_long_queue_ids) are the time in a
# 52-character alphabet without vowels (six or more digits of seconds, four of microseconds), a
# "z", and the inode number in the same alphabet without "z". The bound on length is ours.
_SAFE52 = "0-9BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz"
_SAFE51 = "0-9BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxy"
QUEUE_ID = re.compile(rf"[0-9A-F]{{6,21}}|[{_SAFE52}]{{10,16}}z[{_SAFE51}]{{1,16}}")
QUEUE_NAME = re.compile(r"[a-z]{1,20}")


def valid_queue_id(text) -> bool:
    return isinstance(text, str) and bool(QUEUE_ID.fullmatch(text))


# ---------------------------------------------------------------- postqueue -j

@dataclass(frozen=True)
class Queued:
    """One message in Postfix's queue, as `postqueue -j` describes it."""
    queue_id: str
    queue_name: str             # maildrop, incoming, active, deferred, hold
    arrival_time: int
    size: int
    sender: str
    recipients: tuple[str, ...]


def _count(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 63 else None


def parse_line(line: str) -> Queued:
    """One line of `postqueue -j`; ValueError says what is wrong with it."""
    try:
        record = json.loads(line)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    qid, name = record.get("queue_id"), record.get("queue_name")
    if not valid_queue_id(qid):
        raise ValueError("no valid queue_id")
    if not isinstance(name, str) or not QUEUE_NAME.fullmatch(name):
        raise ValueError(f"{qid}: no valid queue_name")
    arrival, size = _count(record.get("arrival_time")), _count(record.get("message_size"))
    if arrival is None or size is None:
        raise ValueError(f"{qid}: arrival_time and message_size must be whole numbers")
    sender, recipients = record.get("sender", ""), record.get("recipients", [])
    if not isinstance(sender, str) or not isinstance(recipients, list) or \
            not all(isinstance(r, dict) and isinstance(r.get("address"), str) for r in recipients):
        raise ValueError(f"{qid}: sender or recipients malformed")
    return Queued(qid, name, arrival, size, sender, tuple(r["address"] for r in recipients))


def parse_queue(data: bytes) -> tuple[dict[str, Queued], list[str]]:
    """`postqueue -j` output: {queue id: Queued}, and one note per line that was skipped. A queue
    id seen twice (a message moving between queues while showq read them) keeps its entry that
    is not on hold: a command then refuses to act on it rather than act twice."""
    queue: dict[str, Queued] = {}
    problems = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            q = parse_line(raw.decode("utf-8", "surrogateescape"))
        except ValueError as e:
            problems.append(f"postqueue -j line {number}: {str(e)[:200]}")
            continue
        if q.queue_id in queue and queue[q.queue_id].queue_name != "hold":
            continue
        queue[q.queue_id] = q
    return queue, problems


# ---------------------------------------------------------------- the store

_SCHEMA = """
CREATE TABLE IF NOT EXISTS held (queue_id TEXT PRIMARY KEY, time REAL NOT NULL, state TEXT NOT NULL,
                                 done_at REAL, done_by TEXT, meta TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS held_state ON held(state, time);
CREATE TABLE IF NOT EXISTS tallies (action TEXT PRIMARY KEY, count INTEGER NOT NULL);
"""
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class _Row:
    queue_id: str
    time: float
    state: str
    done_at: float | None
    done_by: str
    meta: dict

    def what(self) -> str:
        """What became of the entry, for a command that finds it no longer held."""
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.done_at or 0))
        if self.state == GONE:
            return (f"left Postfix's hold queue without scanmilter (postsuper by hand, or never queued); "
                    f"noticed at {at}")
        return f"{self.state} by {self.done_by or 'unknown'} at {at}"


class HoldStore(Store):
    """Verdicts by queue id in an SQLite index; the messages stay on Postfix's hold queue."""

    in_postfix_queue = True         # the daemon holds with SMFIR_QUARANTINE and accepts

    def __init__(self, directory: str, postfix_config_directory: str = "", timeout: float = 60.0,
                 keep: float = 30 * 86400, index_timeout: float = INDEX_TIMEOUT):
        self.directory = os.path.abspath(directory)
        self.index_path = os.path.join(self.directory, INDEX_NAME)
        self.locks_dir = os.path.join(self.directory, LOCKS_NAME)
        self.postfix_config_directory = postfix_config_directory
        self.timeout, self.keep, self.index_timeout = timeout, keep, index_timeout
        self.notes: list[str] = []      # what the last listing noticed (entries gone, lines skipped)
        self._local = threading.local()
        self._snapshots: dict[str, bytes] = {}
        for path in (self.directory, self.locks_dir):
            self._make_directory(path)
        self._check_index_file()

    @classmethod
    def for_command(cls, directory: str, **kw) -> HoldStore:
        directory = os.path.abspath(directory)
        if os.path.isdir(directory) and not os.access(directory, os.R_OK | os.W_OK | os.X_OK):
            raise StoreError(f"{directory}: cannot open the quarantine index: Permission denied (run this as "
                             "root: postsuper and postcat need root too)")
        return cls(directory, **kw)

    # ---- files

    def _make_directory(self, path: str) -> None:
        try:
            os.mkdir(path, 0o700)
            os.chmod(path, 0o700)       # mkdir's mode passes through the umask
            if os.geteuid() == 0 and path != self.directory:
                top = os.stat(self.directory)
                os.chown(path, top.st_uid, top.st_gid)
        except FileExistsError:
            pass
        except OSError as e:
            raise StoreError(f"cannot create {path}: {e.strerror}") from None
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise StoreError(f"{path} is not a directory (symlinks are not followed)")

    def _own(self, fd: int) -> None:
        """Mode 0600, and the directory's owner (the daemon's user) when root made the file."""
        os.fchmod(fd, 0o600)
        if os.geteuid() == 0:
            top = os.stat(self.directory)
            os.fchown(fd, top.st_uid, top.st_gid)

    def _check_index_file(self) -> None:
        """The index and its WAL files are regular files, never followed symlinks."""
        for suffix in ("", "-wal", "-shm"):
            path = self.index_path + suffix
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if suffix == "":
                    try:
                        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600)
                    except FileExistsError:
                        continue
                    except OSError as e:
                        raise StoreError(f"cannot create {path}: {e.strerror}") from None
                    try:
                        self._own(fd)
                    finally:
                        os.close(fd)
                continue
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"{path} is not a regular file (symlinks are not followed)")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            self._check_index_file()
            try:
                db = sqlite3.connect(self.index_path, timeout=self.index_timeout)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")       # a row is on disk before the daemon answers
                db.executescript(_SCHEMA)
            except sqlite3.Error as e:
                raise StoreError(f"cannot open the index {self.index_path}: {e}") from None
            self._local.db = db
        return db

    def _write(self, sql: str, args: tuple) -> int:
        """One statement in its own transaction; the number of rows changed."""
        try:
            with self._db() as db:
                return db.execute(sql, args).rowcount
        except sqlite3.Error as e:
            raise StoreError(f"cannot write the index {self.index_path}: {e}") from None

    def _rows(self, where: str = "", args: tuple = ()) -> list[_Row]:
        try:
            found = self._db().execute(f"SELECT queue_id, time, state, done_at, done_by, meta FROM held {where}",
                                       args).fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"cannot read the index {self.index_path}: {e}") from None
        rows = []
        for qid, t, state, done_at, done_by, meta in found:
            try:
                meta = json.loads(meta)
            except ValueError:
                meta = {}
            rows.append(_Row(qid, t, state, done_at, done_by or "", meta if isinstance(meta, dict) else {}))
        return rows

    def _row(self, qid: str) -> _Row:
        if not valid_queue_id(qid):
            raise NotFound(f"{qid!r} is not a Postfix queue id")
        rows = self._rows("WHERE queue_id = ?", (qid,))
        if not rows:
            raise NotFound(f"no quarantine entry {qid} (scanmilter did not hold it)")
        return rows[0]

    # ---- Postfix's commands

    def _postfix(self, name: str, *args: str) -> subprocess.CompletedProcess:
        """Run a Postfix command against our instance, no shell; StoreError when it fails."""
        binary = shutil.which(name) or f"/usr/sbin/{name}"
        where = ["-c", self.postfix_config_directory] if self.postfix_config_directory else []
        try:
            out = subprocess.run([binary, *where, *args], capture_output=True, timeout=self.timeout,
                                 stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise StoreError(f"{name} did not finish within {self.timeout:.0f}s") from None
        except OSError as e:
            raise StoreError(f"cannot run {binary}: {e.strerror}") from None
        if out.returncode != 0:
            said = out.stderr.decode("utf-8", "replace").strip().splitlines()
            raise StoreError(f"{name} {' '.join(args[:1])} failed (status {out.returncode})"
                             + (f": {said[-1][:300]}" if said else ""))
        return out

    def queue(self) -> dict[str, Queued]:
        """Postfix's queue now, by queue id; skipped lines go to `notes`."""
        queue, problems = parse_queue(self._postfix("postqueue", "-j").stdout)
        self.notes += problems
        return queue

    def _queued(self, row: _Row, queue: dict[str, Queued] | None = None) -> Queued | None:
        """The message of a row in Postfix's queue, None when Postfix no longer has it (a queue
        id that arrived after our record belongs to another message)."""
        q = (self.queue() if queue is None else queue).get(row.queue_id)
        if q is None or q.arrival_time > row.time + CLOCK_SLACK_SECONDS:
            return None
        return q

    # ---- entry locks

    @contextlib.contextmanager
    def _lock(self, qid: str) -> Iterator[None]:
        """An flock on locks/QID, re-entrant in a thread. The file may be removed by whoever holds
        it (a dropped row): the lock then counts only once it is on the file the path names."""
        if not valid_queue_id(qid):
            raise NotFound(f"{qid!r} is not a Postfix queue id")
        held = self._local.__dict__.setdefault("held", set())
        if qid in held:
            yield
            return
        path = os.path.join(self.locks_dir, qid)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o600)
            except OSError as e:
                raise StoreError(f"cannot lock entry {qid}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    current = os.stat(path, follow_symlinks=False).st_ino
                except FileNotFoundError:
                    current = None
                if current == os.fstat(fd).st_ino:
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        try:
            if os.fstat(fd).st_size == 0 and os.geteuid() == 0:
                self._own(fd)
            held.add(qid)
            try:
                yield
            finally:
                held.discard(qid)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def locked(self, entry_id: str) -> Iterator[Entry]:
        with self._lock(entry_id):
            yield self.get(entry_id)

    # ---- the daemon's side

    def put(self, reader, meta: dict, index_failed=None) -> str:
        """Record the daemon's verdict for the message Postfix queues as meta["queue_id"]; the
        message itself stays with Postfix. Raises StoreError when the row is not safely written
        (the daemon then tempfails: nothing is lost)."""
        qid = meta.get("queue_id", "")
        if not qid:
            raise StoreError("no Postfix queue id: the hold backend needs the i macro at end of message "
                             "(milter_end_of_data_macros = i)")
        if not valid_queue_id(qid):
            raise StoreError(f"{str(qid)[:40]!r} is not a Postfix queue id")
        size = 0
        if reader is not None:
            for chunk in iter(lambda: reader.read(COPY_CHUNK), b""):
                size += len(chunk)
        now = time.time()
        meta = {**meta, "id": qid, "time": now, "size": size, "released": []}
        try:
            text = json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise StoreError(f"cannot record entry {qid}: {e}") from None
        # a row under the same id is of an earlier message whose short queue id Postfix reuses
        # now: that message has left the queue
        self._write("INSERT INTO held VALUES (?, ?, ?, NULL, NULL, ?) ON CONFLICT(queue_id) DO UPDATE SET "
                    "time = excluded.time, state = excluded.state, done_at = NULL, done_by = NULL, "
                    "meta = excluded.meta", (qid, now, HELD, text))
        return qid

    def probe(self) -> None:
        """Write, read and remove a row nobody else uses: the index takes writes (selftest)."""
        qid, now = PROBE_ID, time.time()
        self._write("INSERT OR REPLACE INTO held VALUES (?, ?, ?, ?, 'probe', '{}')", (qid, now, GONE, now))
        if not self._rows("WHERE queue_id = ?", (qid,)):
            raise StoreError("the index did not return the probe row it was given")
        self._write("DELETE FROM held WHERE queue_id = ?", (qid,))

    def check_postsuper(self) -> None:
        """Run `postsuper -H` on a queue id no message has: postsuper runs, as this user, against
        this instance, and changes nothing (postfix-check). StoreError says why not."""
        self._postfix("postsuper", "-H", PROBE_ID)

    # ---- reading

    def get(self, entry_id: str) -> Entry:
        """The verdict recorded for a queue id; NotFound once the entry is deleted, purged or gone,
        saying who did what and when."""
        row = self._row(entry_id)
        if row.state not in (HELD, RELEASED):
            raise NotFound(f"quarantine entry {entry_id}: {row.what()}")
        return Entry({**row.meta, "id": row.queue_id, "time": row.time})

    def message(self, entry_id: str) -> bytes:
        """The held message as Postfix keeps it (`postcat -h -b`: our header edits applied, LF
        line ends); after a release by this process, the copy read just before it."""
        if entry_id in self._snapshots:
            return self._snapshots[entry_id]
        row = self._row(entry_id)
        q = self._queued(row) if row.state == HELD else None
        if q is None or q.queue_name != "hold":
            raise NotFound(f"quarantine entry {entry_id}: no longer on Postfix's hold queue"
                           + (f" ({row.what()})" if row.state != HELD else ""))
        return self._postfix("postcat", "-h", "-b", "-q", entry_id).stdout

    def select(self, reason: str = "", sender: str = "", recipient: str = "", since: float | None = None,
               before: float | None = None) -> list[Entry]:
        """Entries on Postfix's hold queue that scanmilter held, newest first. Rows whose message
        left the queue without us are marked gone (and said so in `notes`)."""
        self.notes = []
        queue = self.queue()
        now, out = time.time(), []
        for row in self._rows("WHERE state = ?", (HELD,)):
            q = self._queued(row, queue)
            if q is None:
                if now - row.time > HOLD_GRACE_SECONDS and \
                        self._write("UPDATE held SET state = ?, done_at = ? WHERE queue_id = ? AND state = ?",
                                    (GONE, now, row.queue_id, HELD)):
                    self.notes.append(f"{row.queue_id}: left Postfix's queue without scanmilter (postsuper by hand, "
                                      "or never queued); no longer listed")
                continue
            if q.queue_name != "hold":
                continue        # released outside scanmilter and on its way
            entry = Entry({**row.meta, "id": row.queue_id, "time": row.time, "size": q.size,
                           "recipients": list(q.recipients)})
            if _matches(entry, reason, sender, recipient, since, before):
                out.append(entry)
        self._drop_finished(now)
        return sorted(out, key=lambda e: e.time, reverse=True)

    def _drop_finished(self, now: float) -> None:
        """Forget entries finished more than `keep` seconds ago, with their lock files."""
        for row in self._rows("WHERE state != ? AND done_at < ?", (HELD, now - self.keep)):
            with self._lock(row.queue_id):
                self._write("DELETE FROM held WHERE queue_id = ? AND state != ?", (row.queue_id, HELD))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.locks_dir, row.queue_id))

    # ---- acting on an entry

    def _on_hold(self, row: _Row, verb: str) -> Queued:
        """The row's message, which must be on hold now; else say why not (and mark it gone if
        Postfix has it no more)."""
        q = self._queued(row)
        if q is None:
            self._write("UPDATE held SET state = ?, done_at = ? WHERE queue_id = ? AND state = ?",
                        (GONE, time.time(), row.queue_id, HELD))
            raise NotFound(f"quarantine entry {row.queue_id}: not in Postfix's queue any more (delivered or deleted "
                           f"with postsuper outside scanmilter); not {verb}")
        if q.queue_name != "hold":
            raise StoreError(f"quarantine entry {row.queue_id} is in Postfix's {q.queue_name} queue, not on hold "
                             f"(released outside scanmilter?); not {verb}")
        return q

    def release(self, entry_id: str, by: str, to: list[str] | None = None, keep_message: bool = False) -> list[str]:
        """`postsuper -H`: the held message goes on to every recipient still on it, unscanned,
        and is scheduled at once (`postqueue -i`). Returns those recipients. keep_message: read
        the message first, so that `message()` can still give it (learning after a release).
        Raises ReleaseError when nothing was released."""
        from .release import ReleaseError
        if to:
            raise ReleaseError("Postfix holds and releases a whole message: --to cannot choose recipients with "
                               "quarantine_backend = \"hold\"")
        with self._lock(entry_id):
            row = self._row(entry_id)
            if row.state != HELD:
                raise ReleaseError(f"not released again: {row.what()}")
            try:
                q = self._on_hold(row, "released")
                data = self._postfix("postcat", "-h", "-b", "-q", entry_id).stdout if keep_message else None
                said = self._postfix("postsuper", "-H", entry_id).stderr
                after = self._queued(row)
            except StoreError as e:
                raise ReleaseError(str(e)) from None
            if after is not None and after.queue_name == "hold":
                raise ReleaseError("postsuper -H left the message on hold")
            if after is None and f"{entry_id}: released from hold".encode() not in said:
                raise ReleaseError("the message left Postfix's queue while it was being released (postsuper by "
                                   "hand?); this command released nothing")
            if data is not None:
                self._snapshots[entry_id] = data
            meta = row.meta
            meta.setdefault("released", []).append({"at": time.time(), "by": by, "to": list(q.recipients)})
            try:
                self._write("UPDATE held SET state = ?, done_at = ?, done_by = ?, meta = ? WHERE queue_id = ?",
                            (RELEASED, time.time(), by, json.dumps(meta), entry_id))
                self.count("release")
            except StoreError as e:
                raise ReleaseError(f"released to {', '.join(q.recipients)}, but the release was not recorded: "
                                   f"{e}") from None
        with contextlib.suppress(StoreError):
            self._postfix("postqueue", "-i", entry_id)      # else the deferred queue's next run takes it
        return list(q.recipients)

    def delete(self, entry_id: str, action: str = "delete", by: str = "") -> None:
        """`postsuper -d ID hold`: gone from Postfix's queue and marked deleted (or purged)."""
        with self._lock(entry_id):
            row = self._row(entry_id)
            if row.state != HELD:
                raise NotFound(f"quarantine entry {entry_id}: {row.what()}")
            self._on_hold(row, "deleted")
            said = self._postfix("postsuper", "-d", entry_id, "hold").stderr
            if self._queued(row) is not None:
                raise StoreError(f"postsuper -d left {entry_id} in Postfix's queue")
            if f"{entry_id}: removed".encode() not in said:
                self._write("UPDATE held SET state = ?, done_at = ? WHERE queue_id = ? AND state = ?",
                            (GONE, time.time(), entry_id, HELD))
                raise NotFound(f"quarantine entry {entry_id}: left Postfix's queue while it was being deleted "
                               "(postsuper by hand?); this command deleted nothing")
            self._write("UPDATE held SET state = ?, done_at = ?, done_by = ? WHERE queue_id = ?",
                        (PURGED if action == "purge" else DELETED, time.time(), by or _login(), entry_id))
        self.count(action)

    def update(self, entry: Entry) -> bool:
        """Write an entry's metadata back (learning); never brings back a deleted entry."""
        with self._lock(entry.id):
            if not self._write("UPDATE held SET meta = ? WHERE queue_id = ? AND state IN (?, ?)",
                               (json.dumps(entry.meta), entry.id, HELD, RELEASED)):
                raise NotFound(f"no quarantine entry {entry.id}")
        return True

    # ---- counts

    def count(self, action: str) -> None:
        self._write("INSERT INTO tallies VALUES (?, 1) ON CONFLICT(action) DO UPDATE SET count = count + 1",
                    (action,))

    def tallies(self) -> dict[str, int]:
        counts = dict.fromkeys(ACTIONS, 0)
        try:
            counts.update(self._db().execute("SELECT action, count FROM tallies").fetchall())
        except sqlite3.Error as e:
            raise StoreError(f"cannot read the index {self.index_path}: {e}") from None
        return counts

    def stats(self) -> dict:
        """As the Store says; from Postfix's queue, or, when postqueue cannot be run (the daemon
        under its sandbox), from the index alone (sizes unknown there: 0)."""
        try:
            entries = [(e.reason, e.size, e.time) for e in self.select()]
        except StoreError:
            entries = [(r.meta.get("reason", ""), 0, r.time) for r in self._rows("WHERE state = ?", (HELD,))]
        by_reason: dict[str, dict[str, int]] = {}
        for reason, size, _ in entries:
            v = by_reason.setdefault(reason, {"entries": 0, "bytes": 0})
            v["entries"] += 1
            v["bytes"] += size
        released = len(self._rows("WHERE state = ?", (RELEASED,)))
        return {"by_reason": by_reason, "oldest": min((t for _, _, t in entries), default=None),
                "released": released}

    def reindex(self, skipped: list | None = None) -> int:
        """Nothing to rebuild: Postfix's queue is the truth; the number of entries held."""
        return len(self.select())


def _matches(entry: Entry, reason: str, sender: str, recipient: str, since: float | None,
             before: float | None) -> bool:
    return ((not reason or entry.reason == reason)
            and (not sender or sender.lower() in entry.sender.lower())
            and (not recipient or any(recipient.lower() in r.lower() for r in entry.recipients))
            and (since is None or entry.time >= since)
            and (before is None or entry.time < before))


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"
