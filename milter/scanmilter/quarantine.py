"""The quarantine store: held mail on disk, written so that a crash never loses or half-writes it.

Layout under quarantine_directory (0700; files 0600):
  entries/ID.msg     the message exactly as received (headers as Postfix passed them, body unchanged)
  entries/ID.json    its metadata; an entry exists once this file exists (it is written last)
  index.sqlite       an index for fast listing (WAL); rebuilt from the .json files at any time
Every file is written as a temp file created exclusively in the same directory, fsynced, renamed
into place, and the directory fsynced: Postfix's own queue-file discipline. Nothing follows
symlinks. Ids are 24 random hex digits and every id from outside is validated.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
import stat
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

ID_PATTERN = re.compile(r"[0-9a-f]{24}")
TEMP_PREFIX = ".tmp-"
COPY_CHUNK = 256 * 1024
STALE_TEMP_SECONDS = 3600      # a temp file this old cannot belong to a writer still at work

_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY, time REAL, queue_id TEXT, sender TEXT, recipients TEXT, reason TEXT,
    score REAL, viruses TEXT, size INTEGER, direction TEXT, released_at REAL, meta TEXT);
CREATE INDEX IF NOT EXISTS entries_time ON entries(time);
CREATE TABLE IF NOT EXISTS tallies (action TEXT PRIMARY KEY, count INTEGER NOT NULL);
"""
# what the quarantine command counts, for the metrics
ACTIONS = ("release", "delete", "purge", "learn_ham", "learn_spam")


class StoreError(Exception):
    """The store cannot do what was asked (disk full, permissions, a broken directory)."""


class NotFound(StoreError):
    pass


def valid_id(text: str) -> bool:
    return bool(ID_PATTERN.fullmatch(text))


@dataclass
class Entry:
    meta: dict

    @property
    def id(self) -> str:
        return self.meta["id"]


class Store:
    """Directory backend. A shared-database backend would offer the same methods."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        self.entries_dir = os.path.join(self.directory, "entries")
        self._local = threading.local()
        for path in (self.directory, self.entries_dir):
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
            except OSError as e:
                raise StoreError(f"cannot create {path}: {e.strerror}") from None
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                raise StoreError(f"{path} is not a directory (symlinks are not followed)")

    # ---- low level: the entries directory, opened without following links

    def _dirfd(self) -> int:
        try:
            return os.open(self.entries_dir, os.O_RDONLY | os.O_DIRECTORY | _OPEN_FLAGS)
        except OSError as e:
            raise StoreError(f"cannot open {self.entries_dir}: {e.strerror}") from None

    def _write_file(self, dfd: int, name: str, chunks: Iterable[bytes]) -> int:
        temp = f"{TEMP_PREFIX}{name}.{secrets.token_hex(4)}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600, dir_fd=dfd)
        size = 0
        try:
            with os.fdopen(fd, "wb", closefd=True) as f:
                for chunk in chunks:
                    f.write(chunk)
                    size += len(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.rename(temp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(temp, dir_fd=dfd)
            except OSError:
                pass
            raise
        return size

    def _read(self, name: str) -> bytes:
        dfd = self._dirfd()
        try:
            fd = os.open(name, os.O_RDONLY | _OPEN_FLAGS, dir_fd=dfd)
        except FileNotFoundError:
            raise NotFound(name) from None
        except OSError as e:
            raise StoreError(f"cannot read {name}: {e.strerror}") from None
        finally:
            os.close(dfd)
        with os.fdopen(fd, "rb") as f:
            return f.read()

    # ---- the index

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(os.path.join(self.directory, "index.sqlite"), timeout=10)
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            self._local.db = db
        return db

    def _index(self, meta: dict) -> None:
        released = meta["released"][-1]["at"] if meta.get("released") else None
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                       (meta["id"], meta["time"], meta.get("queue_id", ""), meta.get("sender", ""),
                        json.dumps(meta.get("recipients", [])), meta.get("reason", ""), meta.get("score"),
                        json.dumps(meta.get("viruses", [])), meta.get("size", 0), meta.get("direction", ""),
                        released, json.dumps(meta)))

    # ---- operations

    def put(self, reader, meta: dict) -> str:
        """Store a message (read from `reader`) with its metadata; returns the new id.
        Raises StoreError when the entry could not be written completely."""
        entry_id = secrets.token_hex(12)
        meta = {**meta, "id": entry_id, "time": meta.get("time", time.time()), "released": []}
        try:
            dfd = self._dirfd()
            try:
                meta["size"] = self._write_file(dfd, f"{entry_id}.msg", iter(lambda: reader.read(COPY_CHUNK), b""))
                self._write_file(dfd, f"{entry_id}.json", [json.dumps(meta, indent=1).encode()])
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            self._discard_partial(entry_id)
            raise StoreError(f"cannot write quarantine entry: {e.strerror or e}") from None
        try:
            self._index(meta)
        except sqlite3.Error:
            pass    # the entry is safe on disk; `reindex` (or the next listing) puts it in the index
        return entry_id

    def _discard_partial(self, entry_id: str) -> None:
        for name in (f"{entry_id}.json", f"{entry_id}.msg"):
            try:
                os.unlink(os.path.join(self.entries_dir, name))
            except OSError:
                pass

    def get(self, entry_id: str) -> Entry:
        if not valid_id(entry_id):
            raise NotFound(f"{entry_id!r} is not a quarantine id")
        try:
            return Entry(json.loads(self._read(f"{entry_id}.json")))
        except NotFound:
            raise NotFound(f"no quarantine entry {entry_id}") from None

    def message(self, entry_id: str) -> bytes:
        self.get(entry_id)
        return self._read(f"{entry_id}.msg")

    def update(self, entry: Entry) -> None:
        dfd = self._dirfd()
        try:
            self._write_file(dfd, f"{entry.id}.json", [json.dumps(entry.meta, indent=1).encode()])
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._index(entry.meta)

    def delete(self, entry_id: str, action: str = "delete") -> None:
        """Remove an entry; `action` (delete or purge) is what gets counted."""
        self.get(entry_id)
        dfd = self._dirfd()
        try:
            os.unlink(f"{entry_id}.json", dir_fd=dfd)    # the entry is gone once this is
            try:
                os.unlink(f"{entry_id}.msg", dir_fd=dfd)
            except FileNotFoundError:
                pass
            os.fsync(dfd)
        finally:
            os.close(dfd)
        with self._db() as db:
            db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
        self.count(action)

    def count(self, action: str) -> None:
        """One more release, delete or purge. The commands run in their own processes: the tally
        lives in the index, where the daemon reads it for its metrics (a lost index restarts it
        from zero, which Prometheus treats as a counter reset)."""
        with self._db() as db:
            db.execute("INSERT INTO tallies VALUES (?, 1) ON CONFLICT(action) DO UPDATE SET count = count + 1",
                       (action,))

    def tallies(self) -> dict[str, int]:
        counts = dict.fromkeys(ACTIONS, 0)
        counts.update(self._db().execute("SELECT action, count FROM tallies").fetchall())
        return counts

    def select(self, reason: str = "", sender: str = "", recipient: str = "", since: float | None = None,
               before: float | None = None) -> list[Entry]:
        """Entries, newest first, from the index (rebuilt first if it is missing or empty)."""
        self._ensure_index()
        query, args = "SELECT meta FROM entries WHERE 1=1", []
        if reason:
            query += " AND reason = ?"
            args.append(reason)
        if sender:
            query += " AND lower(sender) LIKE ?"
            args.append(f"%{sender.lower()}%")
        if recipient:
            query += " AND lower(recipients) LIKE ?"
            args.append(f"%{recipient.lower()}%")
        if since is not None:
            query += " AND time >= ?"
            args.append(since)
        if before is not None:
            query += " AND time < ?"
            args.append(before)
        rows = self._db().execute(query + " ORDER BY time DESC", args).fetchall()
        return [Entry(json.loads(r[0])) for r in rows]

    def _ensure_index(self) -> None:
        count = self._db().execute("SELECT count(*) FROM entries").fetchone()[0]
        if count == 0 and any(n.endswith(".json") and not n.startswith(TEMP_PREFIX)
                              for n in os.listdir(self.entries_dir)):
            self.reindex()

    def ids_on_disk(self) -> Iterator[str]:
        for name in os.listdir(self.entries_dir):
            if name.endswith(".json") and valid_id(name[:-5]):
                yield name[:-5]

    def reindex(self) -> int:
        """Rebuild the index from the files; returns the number of entries."""
        metas = []
        for entry_id in self.ids_on_disk():
            try:
                metas.append(self.get(entry_id).meta)
            except (StoreError, ValueError):
                continue
        with self._db() as db:
            db.execute("DELETE FROM entries")
        for meta in metas:
            self._index(meta)
        return len(metas)

    def recover(self, min_age: float = STALE_TEMP_SECONDS) -> int:
        """Remove what a crashed writer left: temp files, and message files without metadata.
        The daemon calls this at start-up with min_age=0 (no writer of its own is running)."""
        removed, now = 0, time.time()
        names = set(os.listdir(self.entries_dir))
        for name in names:
            orphan = name.endswith(".msg") and f"{name[:-4]}.json" not in names
            if name.startswith(TEMP_PREFIX) or orphan:
                path = os.path.join(self.entries_dir, name)
                try:
                    if now - os.lstat(path).st_mtime >= min_age:
                        os.unlink(path)
                        removed += 1
                except OSError:
                    pass
        return removed

    def stats(self) -> dict:
        self._ensure_index()
        rows = self._db().execute("SELECT reason, count(*), sum(size), min(time) FROM entries GROUP BY reason")
        by_reason = {r[0]: {"entries": r[1], "bytes": r[2] or 0} for r in rows}
        oldest, released = self._db().execute(
            "SELECT min(time), count(released_at) FROM entries").fetchone()
        return {"by_reason": by_reason, "oldest": oldest, "released": released}


class ReleaseError(Exception):
    """A release did not happen; the entry is unchanged."""


def release(store: Store, entry_id: str, address: tuple[str, int], by: str, to: list[str] | None = None,
            force: bool = False, timeout: float = 60.0) -> list[str]:
    """Re-inject an entry over SMTP to its recipients (or the subset `to`), adding
    X-Quarantine-Released. Returns the recipients it went to. The release endpoint must be a
    Postfix service without scanmilter (smtpd_milters empty), or the copy would be held again."""
    import smtplib
    entry = store.get(entry_id)
    recipients = list(entry.meta.get("recipients", []))
    chosen = to or recipients
    strangers = [r for r in chosen if r.lower() not in {x.lower() for x in recipients}]
    if strangers:
        raise ReleaseError(f"{', '.join(strangers)} not among the entry's recipients ({', '.join(recipients)})")
    done = {r.lower() for rel in entry.meta.get("released", []) for r in rel.get("to", [])}
    again = [r for r in chosen if r.lower() in done]
    if again and not force:
        raise ReleaseError(f"already released to {', '.join(again)}; use --force to deliver again")
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    header = f"X-Quarantine-Released: id={entry_id}, by={_token(by)}, at={at}\r\n".encode()
    data = header + store.message(entry_id)
    try:
        with smtplib.SMTP(address[0], address[1], timeout=timeout) as smtp:
            smtp.ehlo()
            options = ["BODY=8BITMIME"] if smtp.has_extn("8bitmime") and any(b > 127 for b in data) else []
            refused = smtp.sendmail(entry.meta.get("sender", ""), chosen, data, mail_options=options)
    except (OSError, smtplib.SMTPException) as e:
        raise ReleaseError(f"release endpoint {address[0]}:{address[1]}: {e}") from None
    if refused:
        raise ReleaseError("refused: " + "; ".join(f"{r}: {c} {m.decode(errors='replace')}"
                                                   for r, (c, m) in refused.items()))
    entry.meta.setdefault("released", []).append({"at": time.time(), "by": by, "to": chosen})
    store.update(entry)
    store.count("release")
    return chosen


def learn(store: Store, entry_id: str, spamd, message_class: str, by: str) -> bool:
    """Tell spamd's Bayes filter that an entry is ham or spam and note it in the entry; True when
    spamd learned, False when it knew the message already. spamd's errors pass through
    (scanners.EngineError, OSError)."""
    entry = store.get(entry_id)
    learned = spamd.tell(store.message(entry_id), message_class)
    entry.meta.setdefault("learned", []).append({"at": time.time(), "by": by, "as": message_class})
    store.update(entry)
    store.count(f"learn_{message_class}")
    return learned


def _token(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]", "_", text)[:64] or "unknown"


def purge(store: Store, older_than: float, dry_run: bool = False) -> list[Entry]:
    """Delete entries older than `older_than` seconds; returns them."""
    old = store.select(before=time.time() - older_than)
    if not dry_run:
        for entry in old:
            store.delete(entry.id, action="purge")
    return old
