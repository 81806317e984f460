"""The PostgreSQL store (quarantine_backend = "postgresql"): one quarantine for every host of a site.

Tables (schema/0001_quarantine.sql): quarantine_entries, one row per held message with its bytes
zlib-compressed by the host that holds it; quarantine_events, who did what to which entry and when
(kept after the entry is gone); quarantine_tallies, the site's action counts.

Locking is the database's. A verb on one entry (release, learning, update) runs in one transaction
that holds the entry's row lock (SELECT ... FOR UPDATE) from reading it to writing it back; a
second admin on any host waits for that transaction (at most database_lock_timeout) and then sees
what the first did: "already released by alice at ..." or "deleted by bob on mx2 at ...". The lock
is held while a release delivers over SMTP (up to quarantine_release_timeout): it blocks only
other writers of that one row, never the daemons' inserts nor anyone's listing (PostgreSQL readers
do not wait for writers), and purge skips a locked row. A command that dies mid-way loses its
connection, so the server rolls back and the entry stays as it was; a session idle inside such a
transaction longer than database_lock_timeout is ended by the server (its lock with it). Purge
runs under an advisory lock: one host at a time, the others skip.

When the database cannot be reached the store says so at once for database_retry_interval
seconds (a circuit), instead of making every held message wait database_connect_timeout; the
daemon's check closes the circuit as soon as the database answers again.

SECURITY: every value reaches SQL as a bound parameter, never in the text of a statement; the
search filters are matched literally (LIKE's % and _ and the escape character are escaped).
Stored values are the sender's word, kept as given (`meta`, JSON text) and shown escaped by the
commands. The connection string's password never reaches a message (db.py).
"""
from __future__ import annotations

import contextlib
import getpass
import secrets
import socket
import threading
import time
import zlib
from typing import Iterator

from .. import db
from . import entry as E
from .entry import Entry, valid_id
from .store import ACTIONS, Busy, NotFound, Store, StoreError

COPY_CHUNK = 256 * 1024
COMPRESSION_LEVEL = 6            # zlib's default: most of the gain for a fraction of level 9's time
PURGE_BATCH = 1000               # entries deleted per transaction by purge
PURGE_LOCK = 0x5CA7_0002         # pg_try_advisory_xact_lock key: one purging host at a time
PROBE_ID = "f" * 24              # the id of the probe entry (written and rolled back by the checks)


def host_name(cfg) -> str:
    """This host's name in the shared database: database_host_name, or the machine's FQDN."""
    return cfg.database_host_name or socket.getfqdn()


def _text(value) -> str:
    """A value as PostgreSQL text can hold it: undecodable bytes as \\xNN (entry.index_text), NUL as
    \\x00 (text never holds NUL). The entry itself keeps the exact value in `meta`."""
    return E.index_text(value if isinstance(value, str) else str(value)).replace("\x00", "\\x00")


def _contains(value: str) -> str:
    """A LIKE pattern that matches `value` literally anywhere (ESCAPE '\\')."""
    text = _text(value).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{text}%"


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _when(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


def _row(meta: dict) -> dict:
    """The searchable columns of an entry, from its metadata; ValueError when unusable."""
    E.index_row(meta)               # a valid id and time, or ValueError
    recipients = meta.get("recipients")
    recipients = [_text(r) for r in recipients] if isinstance(recipients, list) else []
    released = meta.get("released") if isinstance(meta.get("released"), list) else []
    last = released[-1] if released and isinstance(released[-1], dict) else {}
    from psycopg.types.json import Json
    return {"id": meta["id"], "held_at": float(meta["time"]), "state": "released" if released else "held",
            "reason": _text(meta.get("reason", "")), "sender": _text(meta.get("sender", "")),
            "recipients": recipients, "recipients_search": "\n".join(recipients),
            "queue_id": _text(meta.get("queue_id", "")), "direction": _text(meta.get("direction", "")),
            "score": _number(meta.get("score")), "size": int(_number(meta.get("size")) or 0),
            "host": _text(meta.get("host", "")), "release_address": _text(meta.get("release_address", "")),
            "released_at": _number(last.get("at")), "meta": Json(meta)}


_INSERT = """INSERT INTO quarantine_entries (id, held_at, state, reason, sender, recipients, recipients_search,
    queue_id, direction, score, size, host, release_address, released_at, meta, compression, message)
VALUES (%(id)s, to_timestamp(%(held_at)s), %(state)s, %(reason)s, %(sender)s, %(recipients)s,
    %(recipients_search)s, %(queue_id)s, %(direction)s, %(score)s, %(size)s, %(host)s, %(release_address)s,
    to_timestamp(%(released_at)s), %(meta)s, 'zlib', %(message)s)
ON CONFLICT (id) DO NOTHING
RETURNING id"""

_UPDATE = """UPDATE quarantine_entries SET state = %(state)s, reason = %(reason)s, sender = %(sender)s,
    recipients = %(recipients)s, recipients_search = %(recipients_search)s, queue_id = %(queue_id)s,
    direction = %(direction)s, score = %(score)s, size = %(size)s, host = %(host)s,
    release_address = %(release_address)s, released_at = to_timestamp(%(released_at)s), meta = %(meta)s
WHERE id = %(id)s"""

_EVENT = "INSERT INTO quarantine_events (entry_id, host, actor, action, detail) VALUES (%s, %s, %s, %s, %s)"
_TALLY = """INSERT INTO quarantine_tallies (action, count) VALUES (%s, %s)
ON CONFLICT (action) DO UPDATE SET count = quarantine_tallies.count + excluded.count"""


def compress(reader) -> tuple[bytes, int]:
    """The message read from `reader`, compressed, and its size."""
    packer, parts, size = zlib.compressobj(COMPRESSION_LEVEL), [], 0
    for chunk in iter(lambda: reader.read(COPY_CHUNK), b""):
        size += len(chunk)
        parts.append(packer.compress(chunk))
    parts.append(packer.flush())
    return b"".join(parts), size


class PgStore(Store):
    """Held mail in PostgreSQL, shared by every host that names the same database."""

    def __init__(self, database: db.Database, host: str, release_address: str, actor: str = "",
                 lock_timeout: float = 120.0, retry_interval: float = 5.0):
        self.db, self.host, self.release_address = database, host, release_address
        self.actor = actor or getpass.getuser()
        self.lock_timeout, self.retry_interval = lock_timeout, retry_interval
        self._local = threading.local()        # the transaction of `locked`, per thread
        self._state = threading.Lock()
        self._down_until = 0.0                 # the circuit: fail at once until then
        self.problem = ""                      # why the database is not usable, "" when it is
        self.schema_version = 0                # checked before the first use, and by check_database()
        self.observe = None                    # observe(operation, seconds, ok): the daemon's metrics

    @classmethod
    def from_settings(cls, cfg, command: bool = False) -> "PgStore":
        host = host_name(cfg)
        actor = getpass.getuser() if command else "scanmilter"
        try:
            database = db.Database.from_settings(cfg, name=f"scanmilter {'command' if command else 'daemon'} "
                                                           f"{actor}@{host}"[:63])
        except db.DatabaseError as e:
            raise StoreError(str(e)) from None
        return cls(database, host, cfg.quarantine_release_address, actor, cfg.database_lock_timeout,
                   cfg.database_retry_interval)

    def describe(self) -> str:
        return f"PostgreSQL {self.db.redacted}"

    def close(self) -> None:
        self.db.close()

    # ---- connections, the circuit and the schema check

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    def _mark_down(self, problem: str) -> None:
        with self._state:
            self.problem = problem
            self._down_until = time.monotonic() + self.retry_interval

    def _mark_up(self) -> None:
        with self._state:
            self._down_until = 0.0
            if self.schema_version:
                self.problem = ""

    def _ensure(self) -> None:
        """Raise StoreError at once while the circuit is open or the schema is not the right one;
        check the schema before the first use."""
        if self.down:
            raise StoreError(f"{self.problem} (not tried again for {self._down_until - time.monotonic():.1f}s)")
        if not self.schema_version:
            self.check_database()
            if self.problem:
                raise StoreError(self.problem)

    @contextlib.contextmanager
    def _conn(self, operation: str = ""):
        """A connection in a transaction (committed when the block ends normally), or the one of
        `locked` when this thread holds an entry's lock. Database errors come out as StoreError."""
        current = getattr(self._local, "conn", None)
        if current is not None:
            yield current
            return
        self._ensure()
        conn, start, ok = None, time.monotonic(), False
        try:
            with self.db.connection() as conn:
                yield conn
            ok = True
        except db.DatabaseError as e:
            if conn is None or conn.broken:
                self._mark_down(str(e))
            raise StoreError(str(e)) from None
        finally:
            if operation and self.observe is not None:
                self.observe(operation, time.monotonic() - start, ok)

    def check_database(self) -> dict:
        """Reach the database and check its schema version, ignoring the circuit: {"up", "seconds",
        "version", "problem"}. The daemon's check calls this; so does the first use of the store."""
        start = time.monotonic()
        try:
            with self.db.connection() as conn:
                conn.execute("SELECT 1")
                seconds = time.monotonic() - start
                try:
                    version = db.check_schema(conn)
                except db.SchemaMismatch as e:
                    with self._state:
                        self.schema_version, self.problem = 0, f"{self.db.redacted}: {e}"
                    return {"up": True, "seconds": seconds, "version": 0, "problem": self.problem}
        except db.DatabaseError as e:
            self._mark_down(str(e))
            return {"up": False, "seconds": time.monotonic() - start, "version": 0, "problem": str(e)}
        with self._state:
            self.schema_version = version
        self._mark_up()
        if self.observe is not None:
            self.observe("probe", seconds, True)
        return {"up": True, "seconds": seconds, "version": version, "problem": ""}

    def check_write(self) -> float:
        """Write a probe entry, read it back and roll it back (nothing stays); the seconds it took.
        StoreError when any step fails: the checks of postfix-check and selftest."""
        start = time.monotonic()
        data = b"Subject: scanmilter probe\r\n\r\nprobe\r\n"
        meta = {"id": PROBE_ID, "time": time.time(), "reason": "probe", "sender": "probe@invalid",
                "recipients": ["probe@invalid"], "size": len(data), "host": self.host,
                "release_address": self.release_address, "released": []}
        with self._conn() as conn:
            with conn.transaction(force_rollback=True):
                conn.execute("DELETE FROM quarantine_entries WHERE id = %s", (PROBE_ID,))
                if not conn.execute(_INSERT, {**_row(meta), "message": zlib.compress(data)}).fetchone():
                    raise StoreError("the probe entry was not written")
                row = conn.execute("SELECT meta, message FROM quarantine_entries WHERE id = %s",
                                   (PROBE_ID,)).fetchone()
                if row is None or row[0].get("id") != PROBE_ID or zlib.decompress(row[1]) != data:
                    raise StoreError("the probe entry read back differs from what was written")
        return time.monotonic() - start

    # ---- writing

    def put(self, reader, meta: dict, index_failed=None) -> str:
        data, size = compress(reader)
        meta = {**meta, "id": secrets.token_hex(12), "time": meta.get("time", time.time()), "released": [],
                "size": size, "host": meta.get("host") or self.host,
                "release_address": meta.get("release_address") or self.release_address}
        try:
            row = _row(meta)
        except (ValueError, TypeError) as e:
            raise StoreError(f"cannot write quarantine entry: {e}") from None
        with self._conn("put") as conn:
            if not conn.execute(_INSERT, {**row, "message": data}).fetchone():
                raise StoreError(f"cannot write quarantine entry: id {meta['id']} is taken")    # 96 random bits
        return meta["id"]

    def put_entry(self, meta: dict, data: bytes, action: str) -> bool:
        """Keep an entry under its own id (a move or an import from a file store): True when it was
        written, False when the database has it already, or had it and it was deleted or purged
        there since (so that doing it again changes nothing, and a move cut short between the
        database's commit and the removal of the local copy never brings back an entry that an
        admin deleted)."""
        meta = {**meta, "host": meta.get("host") or self.host,
                "release_address": meta.get("release_address") or self.release_address}
        meta.setdefault("size", len(data))
        try:
            row = _row(meta)
        except (ValueError, TypeError) as e:
            raise StoreError(f"entry {meta.get('id')}: {e}") from None
        with self._conn(action) as conn:
            # the row lock first: a delete of this entry in progress commits its event before we look
            if conn.execute("SELECT 1 FROM quarantine_entries WHERE id = %s FOR UPDATE", (row["id"],)).fetchone():
                return False
            if conn.execute("SELECT 1 FROM quarantine_events WHERE entry_id = %s AND action IN ('delete', 'purge') "
                            "LIMIT 1", (row["id"],)).fetchone():
                return False
            written = conn.execute(_INSERT, {**row, "message": zlib.compress(data, COMPRESSION_LEVEL)}).fetchone()
            if written:
                conn.execute(_EVENT, (meta["id"], self.host, self.actor, action, None))
        return bool(written)

    def import_from(self, files, remove: bool = False, action: str = "import",
                    failed: list | None = None, done: list | None = None) -> tuple[int, int]:
        """Copy every entry of a file store (files.FileStore) into the database, keyed by its id:
        (written, there already or deleted there since). With `remove`, each entry leaves the file
        store once the database has (or had) it, so that nothing is lost, kept twice or brought
        back however often this runs or stops.
        An entry that cannot be copied is added to `failed` as (id, reason); an unreachable
        database ends the run (StoreError). Each entry done is added to `done` at once, so that a
        run cut short still tells what it did."""
        written = present = 0
        for entry_id in sorted(files.ids_on_disk()):
            try:
                with files.locked(entry_id) as entry:       # one mover per entry on this host
                    fresh = self.put_entry(entry.meta, files.message(entry_id), action)
                    if remove:                              # only once the database has it
                        files.delete(entry_id, action="moved")
                written, present = written + fresh, present + (not fresh)
                if done is not None:
                    done.append(entry_id)
            except NotFound:
                continue                                    # moved by another process meanwhile
            except StoreError as e:
                if self.down:
                    raise
                if failed is not None:
                    failed.append((entry_id, str(e)))
        return written, present

    # ---- reading

    def _gone(self, conn, entry_id: str) -> str:
        """"no quarantine entry ID", with who deleted it and when if the events say."""
        row = conn.execute("SELECT action, actor, host, extract(epoch FROM at) FROM quarantine_events "
                           "WHERE entry_id = %s AND action IN ('delete', 'purge') ORDER BY seq DESC LIMIT 1",
                           (entry_id,)).fetchone()
        if row is None:
            return f"no quarantine entry {entry_id}"
        verb = "deleted" if row[0] == "delete" else "purged"
        return f"no quarantine entry {entry_id}: {verb} by {row[1]} on {row[2]} at {_when(float(row[3]))}"

    def get(self, entry_id: str) -> Entry:
        if not valid_id(entry_id):
            raise NotFound(f"{entry_id!r} is not a quarantine id")
        with self._conn() as conn:
            row = conn.execute("SELECT meta FROM quarantine_entries WHERE id = %s", (entry_id,)).fetchone()
            if row is None:
                raise NotFound(self._gone(conn, entry_id))
        return Entry(row[0])

    def message(self, entry_id: str) -> bytes:
        if not valid_id(entry_id):
            raise NotFound(f"{entry_id!r} is not a quarantine id")
        with self._conn() as conn:
            row = conn.execute("SELECT compression, message FROM quarantine_entries WHERE id = %s",
                               (entry_id,)).fetchone()
            if row is None:
                raise NotFound(self._gone(conn, entry_id))
        try:
            return zlib.decompress(row[1])
        except zlib.error as e:
            raise StoreError(f"entry {entry_id}: the stored message is damaged ({e})") from None

    @staticmethod
    def _where(reason: str = "", sender: str = "", recipient: str = "", since: float | None = None,
               before: float | None = None) -> tuple[str, list]:
        """The WHERE clause of the filters, from fixed text only; every value is a parameter."""
        clauses, args = [], []
        if reason:
            clauses.append("reason = %s")
            args.append(_text(reason))
        if sender:
            clauses.append("sender ILIKE %s ESCAPE '\\'")
            args.append(_contains(sender))
        if recipient:
            # the trigram index finds candidates; the recipients themselves decide (a pattern
            # must match within one address, never across the line between two)
            clauses.append("recipients_search ILIKE %s ESCAPE '\\' "
                           "AND EXISTS (SELECT 1 FROM unnest(recipients) AS r WHERE r ILIKE %s ESCAPE '\\')")
            args += [_contains(recipient)] * 2
        if since is not None:
            clauses.append("held_at >= to_timestamp(%s)")
            args.append(float(since))
        if before is not None:
            clauses.append("held_at < to_timestamp(%s)")
            args.append(float(before))
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    def select(self, reason: str = "", sender: str = "", recipient: str = "", since: float | None = None,
               before: float | None = None) -> list[Entry]:
        return self.listing(reason=reason, sender=sender, recipient=recipient, since=since, before=before)[0]

    def listing(self, limit: int = 0, offset: int = 0, **filters) -> tuple[list[Entry], int, int]:
        where, args = self._where(**filters)
        page = " LIMIT %s" if limit else ""
        with self._conn("list") as conn:
            count, size = conn.execute(f"SELECT count(*), coalesce(sum(size), 0) FROM quarantine_entries{where}",
                                       args).fetchone()
            rows = conn.execute(f"SELECT meta FROM quarantine_entries{where} ORDER BY held_at DESC, id DESC"
                                f"{page} OFFSET %s", [*args, *([limit] if limit else []), offset]).fetchall()
        return [Entry(r[0]) for r in rows], count, int(size)

    # ---- one entry's lock

    @contextlib.contextmanager
    def locked(self, entry_id: str) -> Iterator[Entry]:
        """The entry's row lock, held until the block ends (its transaction commits then, or rolls
        back if the block raised). Waits at most database_lock_timeout for another holder."""
        if not valid_id(entry_id):
            raise NotFound(f"{entry_id!r} is not a quarantine id")
        if getattr(self._local, "conn", None) is not None:       # re-entrant in a thread
            yield self.get(entry_id)
            return
        with self._conn() as conn:
            row = self._lock_row(conn, "SELECT meta FROM quarantine_entries WHERE id = %s FOR UPDATE", entry_id)
            if row is None:
                raise NotFound(self._gone(conn, entry_id))
            self._local.conn = conn
            try:
                yield Entry(row[0])
            finally:
                self._local.conn = None

    def _lock_row(self, conn, statement: str, entry_id: str):
        """Run a statement that locks the entry's row, waiting at most database_lock_timeout for
        another transaction that has it; the row it returns. The transaction may then stay open
        (idle while a release delivers) for as long again before the server ends the session."""
        import psycopg
        wait = f"{int(self.lock_timeout * 1000)}ms"
        statement_timeout = conn.execute("SHOW statement_timeout").fetchone()[0]
        conn.execute("SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true), "
                     "set_config('idle_in_transaction_session_timeout', %s, true)", (wait, "0", wait))
        try:
            with conn.transaction():
                row = conn.execute(statement, (entry_id,)).fetchone()
        except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled):
            raise StoreError(f"entry {entry_id} is still being changed by {self._holder(conn, entry_id)} after "
                             f"{self.lock_timeout:.0f}s (database_lock_timeout); try again later") from None
        conn.execute("SELECT set_config('statement_timeout', %s, true)", (statement_timeout,))
        return row

    @staticmethod
    def _holder(conn, entry_id: str) -> str:
        """Who holds an entry's row lock, as far as the server shows it."""
        row = conn.execute("SELECT a.application_name, a.client_addr::text, a.xact_start FROM pg_stat_activity a "
                           "WHERE a.backend_xid = (SELECT xmax FROM quarantine_entries WHERE id = %s)",
                           (entry_id,)).fetchone()
        if row is None:
            return "another session"
        return f"{row[0] or 'another session'}{f' from {row[1]}' if row[1] else ''} since {row[2]:%H:%M:%S}"

    def update(self, entry: Entry) -> bool:
        """Write the metadata back (in the transaction of `locked` when this thread holds it). A new
        release or lesson is recorded as an event, with this host."""
        if not valid_id(entry.id):
            raise NotFound(f"{entry.id!r} is not a quarantine id")
        with self._conn("update") as conn:
            row = self._lock_row(conn, "SELECT meta FROM quarantine_entries WHERE id = %s FOR UPDATE", entry.id)
            if row is None:
                raise NotFound(self._gone(conn, entry.id))
            before = Entry(row[0])
            events = []
            for record in entry.released[len(before.released):]:
                record.setdefault("host", self.host)
                events.append((entry.id, self.host, str(record.get("by", self.actor)), "release",
                               {"to": record.get("to", [])}))
            for record in entry.learned[len(before.learned):]:
                events.append((entry.id, self.host, str(record.get("by", self.actor)),
                               f"learn_{record.get('as')}", None))
            try:
                row = _row(entry.meta)
            except (ValueError, TypeError) as e:
                raise StoreError(f"entry {entry.id}: {e}") from None
            conn.execute(_UPDATE, row)
            from psycopg.types.json import Json
            for event in events:
                conn.execute(_EVENT, (*event[:4], Json(event[4]) if event[4] is not None else None))
        return True

    def delete(self, entry_id: str, action: str = "delete", by: str = "") -> None:
        if not valid_id(entry_id):
            raise NotFound(f"{entry_id!r} is not a quarantine id")
        with self._conn(action) as conn:
            row = self._lock_row(conn, "DELETE FROM quarantine_entries WHERE id = %s RETURNING id", entry_id)
            if row is None:
                raise NotFound(self._gone(conn, entry_id))
            conn.execute(_EVENT, (entry_id, self.host, by or self.actor, action, None))
            conn.execute(_TALLY, (action, 1))

    # ---- counts

    def count(self, action: str) -> None:
        with self._conn() as conn:
            conn.execute(_TALLY, (action, 1))

    def tallies(self) -> dict[str, int]:
        counts = dict.fromkeys(ACTIONS, 0)
        with self._conn() as conn:
            counts.update((a, int(n)) for a, n in conn.execute("SELECT action, count FROM quarantine_tallies"))
        return counts

    def stats(self) -> dict:
        with self._conn("stats") as conn:
            by_reason = {r: {"entries": n, "bytes": int(b)} for r, n, b in conn.execute(
                "SELECT reason, count(*), coalesce(sum(size), 0) FROM quarantine_entries GROUP BY reason")}
            oldest, released = conn.execute(
                "SELECT extract(epoch FROM min(held_at)), count(*) FILTER (WHERE state = 'released') "
                "FROM quarantine_entries").fetchone()
        return {"by_reason": by_reason, "oldest": float(oldest) if oldest is not None else None,
                "released": released}

    def reindex(self, skipped: list | None = None) -> int:
        """Nothing to rebuild: the database's indexes are always current. The number of entries."""
        with self._conn() as conn:
            return conn.execute("SELECT count(*) FROM quarantine_entries").fetchone()[0]

    # ---- purge: one host at a time

    def purge_old(self, older_than: float, dry_run: bool = False, failed: list | None = None) -> list[Entry]:
        """Delete entries held more than `older_than` seconds ago, in batches, while holding the
        purge lock; Busy when another host holds it. Entries being released or deleted right now
        are skipped (the next purge takes them). Events older than the cut are trimmed too."""
        cutoff = time.time() - older_than
        if dry_run:
            return self.select(before=cutoff)
        gone: list[Entry] = []
        with self._conn("purge") as lock:
            if not lock.execute("SELECT pg_try_advisory_xact_lock(%s)", (PURGE_LOCK,)).fetchone()[0]:
                raise Busy(f"another host is purging the quarantine ({self._purger(lock)}); nothing done here")
            while True:
                with self._conn() as conn:
                    rows = conn.execute(
                        "WITH old AS (SELECT id FROM quarantine_entries WHERE held_at < to_timestamp(%s) "
                        "             ORDER BY held_at LIMIT %s FOR UPDATE SKIP LOCKED), "
                        "gone AS (DELETE FROM quarantine_entries q USING old WHERE q.id = old.id "
                        "         RETURNING q.id, q.meta), "
                        "logged AS (INSERT INTO quarantine_events (entry_id, host, actor, action) "
                        "           SELECT id, %s, %s, 'purge' FROM gone) "
                        "SELECT meta FROM gone", (cutoff, PURGE_BATCH, self.host, self.actor)).fetchall()
                    if rows:
                        conn.execute(_TALLY, ("purge", len(rows)))
                gone += [Entry(r[0]) for r in rows]
                if len(rows) < PURGE_BATCH:
                    break
            with self._conn() as conn:
                conn.execute("DELETE FROM quarantine_events WHERE at < to_timestamp(%s)", (cutoff,))
        return gone

    @staticmethod
    def _purger(conn) -> str:
        row = conn.execute(
            "SELECT a.application_name, a.xact_start FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s AND l.objsubid = 1",
            (PURGE_LOCK >> 32, PURGE_LOCK & 0xFFFFFFFF)).fetchone()
        return f"{row[0]} since {row[1]:%H:%M:%S}" if row else "a session that has just ended"
