"""The quarantine store: held mail on disk, written so that a crash never loses or half-writes it.

Layout under quarantine_directory (0700; files 0600, whatever the process umask):
  entries/ID.msg     the message exactly as received (headers as Postfix passed them, body unchanged)
  entries/ID.json    its metadata; an entry exists once this file exists (it is written last)
  index.sqlite       an index for fast listing (WAL); rebuilt from the .json files at any time
  index.stale        present when a write to the index failed: the next listing or health check
                     rebuilds the index, so an entry is never hidden from `list` and `purge` for good
Every file is written as a temp file created exclusively in the same directory, fsynced, renamed
into place, and the directory fsynced: Postfix's own queue-file discipline. Nothing follows
symlinks. Ids are 24 random hex digits and every id from outside is validated.

Verbs on one entry (release, learn, update, delete) hold the entry's lock, an flock on its .msg
file (never replaced while the entry exists, unlike the .json), from reading the metadata to
writing it back: two releases cannot both deliver, and an update never brings back a deleted
entry. Run as root (the quarantine command), files keep the owner and group of their directory,
so the daemon and the purge service can still read and replace them.

Envelope addresses with bytes that are not UTF-8 arrive surrogate-escaped (pymilter); the .json
keeps them exactly (JSON escapes them), the index and every display show them as \\xNN.
"""
from __future__ import annotations

import contextlib
import fcntl
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
INDEX_NAME = "index.sqlite"
STALE_MARKER = "index.stale"
INDEX_TIMEOUT = 10.0           # seconds a writer waits for a lock on the index before giving up
MAX_STRIPPED_NAMES = 20        # forged header names recorded per release
# headers that carry a verdict: a held copy's own are removed before release (any case)
VERDICT_PREFIXES = (b"x-spam-", b"x-virus-", b"x-quarantine-")

_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY, time REAL, queue_id TEXT, sender TEXT, recipients TEXT, reason TEXT,
    score REAL, viruses TEXT, size INTEGER, direction TEXT, released_at REAL, meta TEXT);
CREATE INDEX IF NOT EXISTS entries_time ON entries(time);
CREATE TABLE IF NOT EXISTS tallies (action TEXT PRIMARY KEY, count INTEGER NOT NULL);
"""
_INSERT = "INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
_SURROGATE = re.compile("[\ud800-\udfff]")
# what the quarantine command counts, for the metrics
ACTIONS = ("release", "delete", "purge", "learn_ham", "learn_spam")


class StoreError(Exception):
    """The store cannot do what was asked (disk full, permissions, a broken directory)."""


class NotFound(StoreError):
    pass


def valid_id(text: str) -> bool:
    return bool(ID_PATTERN.fullmatch(text))


def _text(value) -> str:
    """Text SQLite can store: undecodable bytes (lone surrogates) as \\xNN or \\uNNNN."""
    def hexed(m: re.Match) -> str:
        code = ord(m.group())
        return f"\\x{code - 0xdc00:02x}" if 0xdc80 <= code <= 0xdcff else f"\\u{code:04x}"
    return _SURROGATE.sub(hexed, value if isinstance(value, str) else str(value))


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _row(meta) -> tuple:
    """The index row of an entry's metadata; ValueError when the metadata is unusable."""
    if not isinstance(meta, dict) or not valid_id(str(meta.get("id", ""))) or _number(meta.get("time")) is None:
        raise ValueError("metadata without a valid id and time")
    released = meta.get("released")
    last = released[-1] if isinstance(released, list) and released else None
    at = last.get("at") if isinstance(last, dict) else None
    recipients = meta.get("recipients")
    return (meta["id"], meta["time"], _text(meta.get("queue_id", "")), _text(meta.get("sender", "")),
            json.dumps([_text(r) for r in recipients] if isinstance(recipients, list) else [], ensure_ascii=False),
            _text(meta.get("reason", "")), _number(meta.get("score")), json.dumps(meta.get("viruses", [])),
            _number(meta.get("size")) or 0, _text(meta.get("direction", "")), _number(at), json.dumps(meta))


@dataclass
class Entry:
    meta: dict

    @property
    def id(self) -> str:
        return self.meta["id"]


class Store:
    """Directory backend. A shared-database backend would offer the same methods."""

    def __init__(self, directory: str, index_timeout: float = INDEX_TIMEOUT):
        self.directory = os.path.abspath(directory)
        self.entries_dir = os.path.join(self.directory, "entries")
        self.index_path = os.path.join(self.directory, INDEX_NAME)
        self.index_timeout = index_timeout
        self._local = threading.local()
        for path in (self.directory, self.entries_dir):
            try:
                os.mkdir(path, 0o700)
                created = True
            except FileExistsError:
                created = False
            except OSError as e:
                raise StoreError(f"cannot create {path}: {e.strerror}") from None
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                raise StoreError(f"{path} is not a directory (symlinks are not followed)")
            # mkdir's mode passes through the umask; a directory an older version left without
            # search permission for its owner is repaired as well
            if created or (st.st_mode & 0o700 != 0o700 and st.st_uid == os.geteuid()):
                try:
                    os.chmod(path, 0o700 if created else stat.S_IMODE(st.st_mode) | 0o700)
                except OSError as e:
                    raise StoreError(f"cannot set the mode of {path}: {e.strerror}") from None
        self._check_index_files()

    # ---- low level: the entries directory, opened without following links

    def _dirfd(self) -> int:
        try:
            return os.open(self.entries_dir, os.O_RDONLY | os.O_DIRECTORY | _OPEN_FLAGS)
        except OSError as e:
            raise StoreError(f"cannot open {self.entries_dir}: {e.strerror}") from None

    @staticmethod
    def _own(fd: int, owner_fd: int) -> None:
        """As root, give a new file the owner and group of its directory (the daemon's user), so
        that a root-run command never leaves a file the daemon or the purge service cannot read."""
        if os.geteuid() == 0:
            st = os.fstat(owner_fd)
            os.fchown(fd, st.st_uid, st.st_gid)

    def _write_file(self, dfd: int, name: str, chunks: Iterable[bytes], must_exist: bool = False) -> int:
        """Write `name` atomically; with must_exist, only replace an existing file (NotFound if gone)."""
        temp = f"{TEMP_PREFIX}{name}.{secrets.token_hex(4)}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600, dir_fd=dfd)
        size = 0
        try:
            with os.fdopen(fd, "wb", closefd=True) as f:
                os.fchmod(fd, 0o600)        # the umask may have taken bits away
                self._own(fd, dfd)
                for chunk in chunks:
                    f.write(chunk)
                    size += len(chunk)
                f.flush()
                os.fsync(f.fileno())
            if must_exist and not self._exists(dfd, name):
                raise NotFound(name)
            os.rename(temp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(temp, dir_fd=dfd)
            except OSError:
                pass
            raise
        return size

    @staticmethod
    def _exists(dfd: int, name: str) -> bool:
        try:
            os.stat(name, dir_fd=dfd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

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

    # ---- entry locks

    @contextlib.contextmanager
    def _lock(self, entry_id: str) -> Iterator[None]:
        """Hold an entry's lock; re-entrant in a thread. NotFound when the entry does not exist
        (or was deleted while we waited)."""
        if not valid_id(entry_id):
            raise NotFound(f"{entry_id!r} is not a quarantine id")
        held = self._local.__dict__.setdefault("held", set())
        if entry_id in held:
            yield
            return
        dfd = self._dirfd()
        try:
            try:
                fd = os.open(f"{entry_id}.msg", os.O_RDONLY | _OPEN_FLAGS, dir_fd=dfd)
            except FileNotFoundError:
                # no message: gone, or a broken entry whose .json can still be deleted; a writer
                # racing us needs the message too, so there is nothing to exclude
                fd = None
            except OSError as e:
                raise StoreError(f"cannot lock entry {entry_id}: {e.strerror}") from None
            try:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                if not self._exists(dfd, f"{entry_id}.json"):     # deleted before we got the lock
                    raise NotFound(f"no quarantine entry {entry_id}")
                held.add(entry_id)
                try:
                    yield
                finally:
                    held.discard(entry_id)
            finally:
                if fd is not None:
                    os.close(fd)
        finally:
            os.close(dfd)

    @contextlib.contextmanager
    def locked(self, entry_id: str) -> Iterator[Entry]:
        """Hold an entry's lock; yields the entry as read under the lock."""
        with self._lock(entry_id):
            yield self.get(entry_id)

    # ---- the index

    def _check_index_files(self) -> None:
        """Refuse an index that is a symlink or not a regular file; create it 0600 (SQLite gives its
        -wal and -shm files the mode and owner of the database file). Paths only, no descriptor of
        the database is opened and closed here: closing one would drop this process's SQLite locks."""
        for suffix in ("", "-wal", "-shm"):
            path = self.index_path + suffix
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if suffix == "":
                    self._create_index_file()
                continue
            except OSError as e:
                raise StoreError(f"cannot check {path}: {e.strerror}") from None
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"{path} is not a regular file (symlinks are not followed)")
            try:
                if stat.S_IMODE(st.st_mode) != 0o600:
                    os.chmod(path, 0o600)
                if os.geteuid() == 0:
                    top = os.stat(self.directory)
                    if (st.st_uid, st.st_gid) != (top.st_uid, top.st_gid):
                        os.chown(path, top.st_uid, top.st_gid, follow_symlinks=False)
            except OSError as e:
                raise StoreError(f"cannot set the mode of {path}: {e.strerror}") from None

    def _create_index_file(self) -> None:
        try:
            fd = os.open(self.index_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600)
        except FileExistsError:
            return self._check_index_files()
        except OSError as e:
            raise StoreError(f"cannot create {self.index_path}: {e.strerror}") from None
        try:
            self._private(fd)
        finally:
            os.close(fd)

    def _private(self, fd: int) -> None:
        """Mode 0600, and the quarantine directory's owner when a root-run command made the file."""
        os.fchmod(fd, 0o600)
        top = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | _OPEN_FLAGS)
        try:
            self._own(fd, top)
        finally:
            os.close(top)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            self._check_index_files()
            try:
                db = sqlite3.connect(self.index_path, timeout=self.index_timeout)
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(_SCHEMA)
            except sqlite3.Error as e:
                raise StoreError(f"cannot open the index {self.index_path}: {e}") from None
            self._local.db = db
        return db

    def _mark_stale(self) -> bool:
        """Leave the marker that makes the next listing or health check rebuild the index."""
        try:
            fd = os.open(os.path.join(self.directory, STALE_MARKER), os.O_WRONLY | os.O_CREAT | _OPEN_FLAGS, 0o600)
        except OSError:
            return False
        try:
            self._private(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
        return True

    def index_stale(self) -> bool:
        return os.path.lexists(os.path.join(self.directory, STALE_MARKER))

    def _index(self, meta: dict) -> bool:
        """Put an entry's row in the index; False (and the index marked stale) when that failed.
        The files are the truth: a failed index write never undoes an operation."""
        try:
            with self._db() as db:
                db.execute(_INSERT, _row(meta))
            return True
        except (sqlite3.Error, StoreError):
            self._mark_stale()
            return False

    # ---- operations

    def put(self, reader, meta: dict, index_failed=None) -> str:
        """Store a message (read from `reader`) with its metadata; returns the new id.
        Raises StoreError when the entry could not be written completely; nothing is left then.
        When only the index could not be updated, the entry is kept, the index is marked for
        rebuilding and index_failed(error) is called."""
        entry_id = secrets.token_hex(12)
        meta = {**meta, "id": entry_id, "time": meta.get("time", time.time()), "released": []}
        try:
            _row(meta)
            json.dumps(meta)                # anything that cannot be written fails before a file exists
            dfd = self._dirfd()
            try:
                meta["size"] = self._write_file(dfd, f"{entry_id}.msg", iter(lambda: reader.read(COPY_CHUNK), b""))
                self._write_file(dfd, f"{entry_id}.json", [json.dumps(meta, indent=1).encode()])
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except Exception as e:
            self._discard_partial(entry_id)
            raise StoreError(f"cannot write quarantine entry: {getattr(e, 'strerror', None) or e}") from None
        try:
            with self._db() as db:
                db.execute(_INSERT, _row(meta))
        except (sqlite3.Error, StoreError) as e:
            # the entry is safe on disk; the marker gets it into the index at the next check
            self._mark_stale()
            if index_failed is not None:
                index_failed(e)
        except Exception as e:
            self._discard_partial(entry_id)
            self._mark_stale()
            raise StoreError(f"cannot index quarantine entry: {e}") from None
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
            meta = json.loads(self._read(f"{entry_id}.json"))
        except NotFound:
            raise NotFound(f"no quarantine entry {entry_id}") from None
        except ValueError as e:
            raise StoreError(f"entry {entry_id}: unreadable metadata: {e}") from None
        if not isinstance(meta, dict) or meta.get("id") != entry_id:
            raise StoreError(f"entry {entry_id}: metadata of another entry or none")
        return Entry(meta)

    def message(self, entry_id: str) -> bytes:
        self.get(entry_id)
        return self._read(f"{entry_id}.msg")

    def update(self, entry: Entry) -> bool:
        """Write an entry's metadata back; NotFound if it was deleted meanwhile (never recreated).
        False when only the index could not be updated."""
        with self._lock(entry.id):
            dfd = self._dirfd()
            try:
                try:
                    self._write_file(dfd, f"{entry.id}.json", [json.dumps(entry.meta, indent=1).encode()],
                                     must_exist=True)
                except NotFound:
                    raise NotFound(f"no quarantine entry {entry.id}") from None
                except OSError as e:
                    raise StoreError(f"cannot write entry {entry.id}: {e.strerror}") from None
                os.fsync(dfd)
            finally:
                os.close(dfd)
            return self._index(entry.meta)

    def delete(self, entry_id: str, action: str = "delete") -> None:
        """Remove an entry; `action` (delete or purge) is what gets counted. Its metadata need
        not be readable."""
        with self._lock(entry_id):
            dfd = self._dirfd()
            try:
                try:
                    os.unlink(f"{entry_id}.json", dir_fd=dfd)    # the entry is gone once this is
                except FileNotFoundError:
                    raise NotFound(f"no quarantine entry {entry_id}") from None
                try:
                    os.unlink(f"{entry_id}.msg", dir_fd=dfd)
                except FileNotFoundError:
                    pass
                os.fsync(dfd)
            except OSError as e:
                raise StoreError(f"cannot delete entry {entry_id}: {e.strerror}") from None
            finally:
                os.close(dfd)
        try:
            with self._db() as db:
                db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
        except (sqlite3.Error, StoreError):
            self._mark_stale()
        self.count(action)

    def count(self, action: str) -> None:
        """One more release, delete or purge. The commands run in their own processes: the tally
        lives in the index, where the daemon reads it for its metrics (a lost index restarts it
        from zero, which Prometheus treats as a counter reset)."""
        try:
            with self._db() as db:
                db.execute("INSERT INTO tallies VALUES (?, 1) ON CONFLICT(action) DO UPDATE SET count = count + 1",
                           (action,))
        except sqlite3.Error as e:
            raise StoreError(f"done, but not counted in the index: {e}") from None

    def tallies(self) -> dict[str, int]:
        counts = dict.fromkeys(ACTIONS, 0)
        counts.update(self._db().execute("SELECT action, count FROM tallies").fetchall())
        return counts

    def select(self, reason: str = "", sender: str = "", recipient: str = "", since: float | None = None,
               before: float | None = None) -> list[Entry]:
        """Entries, newest first, from the index (rebuilt first if it is stale, missing or empty)."""
        self.repair_index()
        query, args = "SELECT meta FROM entries WHERE 1=1", []
        if reason:
            query += " AND reason = ?"
            args.append(_text(reason))
        if sender:
            query += " AND lower(sender) LIKE ?"
            args.append(f"%{_text(sender).lower()}%")
        if recipient:
            query += " AND lower(recipients) LIKE ?"
            args.append(f"%{_text(recipient).lower()}%")
        if since is not None:
            query += " AND time >= ?"
            args.append(since)
        if before is not None:
            query += " AND time < ?"
            args.append(before)
        rows = self._db().execute(query + " ORDER BY time DESC", args).fetchall()
        return [Entry(json.loads(r[0])) for r in rows]

    def repair_index(self, skipped: list | None = None) -> int | None:
        """Rebuild the index when a write to it failed, or when it is empty while entries exist.
        Returns the number of entries indexed, or None when the index needed nothing."""
        if not self.index_stale():
            if self._db().execute("SELECT count(*) FROM entries").fetchone()[0] or \
                    not any(n.endswith(".json") and not n.startswith(TEMP_PREFIX) for n in os.listdir(self.entries_dir)):
                return None
        return self.reindex(skipped)

    def ids_on_disk(self) -> Iterator[str]:
        for name in os.listdir(self.entries_dir):
            if name.endswith(".json") and valid_id(name[:-5]):
                yield name[:-5]

    def reindex(self, skipped: list | None = None) -> int:
        """Rebuild the index from the files in one transaction; returns the number of entries.
        An entry that cannot be read is left out and added to `skipped` as (id, reason)."""
        db = self._db()
        try:
            # the write lock first: an entry whose index write waits on us is on disk already
            # (and in our listing), or is written after we are done
            db.execute("BEGIN IMMEDIATE")
            try:
                try:
                    os.unlink(os.path.join(self.directory, STALE_MARKER))
                except FileNotFoundError:
                    pass
                rows = []
                for entry_id in sorted(self.ids_on_disk()):
                    try:
                        rows.append(_row(self.get(entry_id).meta))
                    except NotFound:
                        continue                    # deleted meanwhile
                    except (StoreError, ValueError) as e:
                        if skipped is not None:
                            skipped.append((entry_id, str(e)))
                db.execute("DELETE FROM entries")
                db.executemany(_INSERT, rows)
                db.commit()
            except BaseException:
                db.rollback()
                raise
        except (sqlite3.Error, OSError) as e:
            self._mark_stale()
            raise StoreError(f"cannot rebuild the index: {e}") from None
        return len(rows)

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
        self.repair_index()
        rows = self._db().execute("SELECT reason, count(*), sum(size), min(time) FROM entries GROUP BY reason")
        by_reason = {r[0]: {"entries": r[1], "bytes": r[2] or 0} for r in rows}
        oldest, released = self._db().execute(
            "SELECT min(time), count(released_at) FROM entries").fetchone()
        return {"by_reason": by_reason, "oldest": oldest, "released": released}


class ReleaseError(Exception):
    """A release did not happen; the entry is unchanged."""


def strip_verdict_headers(data: bytes) -> tuple[bytes, list[str]]:
    """The message without the verdict headers it arrived with (X-Spam-*, X-Virus-*,
    X-Quarantine-*, any case, with their continuation lines), and the names removed.
    Only the header section is looked at; the body is left byte for byte."""
    kept, stripped, dropping, pos = [], [], False, 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end + 1
        line = data[pos:end]
        if line in (b"\n", b"\r\n"):
            break                                   # the blank line that ends the header section
        if line[:1] not in (b" ", b"\t"):           # a new field; a continuation shares its fate
            name = line.split(b":", 1)[0].strip()
            dropping = name.lower().startswith(VERDICT_PREFIXES)
            if dropping:
                stripped.append(_token(name.decode("ascii", "replace")))
        if not dropping:
            kept.append(line)
        pos = end
    return b"".join(kept) + data[pos:], stripped


def _check_address(role: str, address: str) -> None:
    """Refuse what cannot go into an SMTP command as it is: undecodable bytes, control characters."""
    if _SURROGATE.search(address):
        raise ReleaseError(f"{role} <{address}> has bytes that are not UTF-8; it cannot be re-injected "
                           "as received (save `show --raw` and deliver it by hand)")
    if re.search(r"[\x00-\x1f\x7f]", address):
        raise ReleaseError(f"{role} <{address}> contains control characters")


def release(store: Store, entry_id: str, address: tuple[str, int], by: str, to: list[str] | None = None,
            force: bool = False, timeout: float = 60.0) -> list[str]:
    """Re-inject an entry over SMTP to its recipients (or the subset `to`) without the verdict
    headers it arrived with, adding X-Quarantine-Released. Returns the recipients it went to.
    The release endpoint must be a Postfix service without scanmilter (smtpd_milters empty), or
    the copy would be held again. The entry stays locked from the check to the record, so two
    releases never both deliver."""
    import smtplib
    with store.locked(entry_id) as entry:
        recipients = list(entry.meta.get("recipients", []))
        chosen = to or recipients
        strangers = [r for r in chosen if r.lower() not in {x.lower() for x in recipients}]
        if strangers:
            raise ReleaseError(f"{', '.join(strangers)} not among the entry's recipients ({', '.join(recipients)})")
        done = {r.lower() for rel in entry.meta.get("released", []) for r in rel.get("to", [])}
        again = [r for r in chosen if r.lower() in done]
        if again and not force:
            raise ReleaseError(f"already released to {', '.join(again)}; use --force to deliver again")
        sender = entry.meta.get("sender", "")
        _check_address("sender", sender)
        for r in chosen:
            _check_address("recipient", r)
        utf8 = not all(a.isascii() for a in (sender, *chosen))
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        header = f"X-Quarantine-Released: id={entry_id}, by={_token(by)}, at={at}\r\n".encode()
        message, stripped = strip_verdict_headers(store.message(entry_id))
        data = header + message
        try:
            with smtplib.SMTP(address[0], address[1], timeout=timeout) as smtp:
                smtp.ehlo()
                options = ["BODY=8BITMIME"] if smtp.has_extn("8bitmime") and not data.isascii() else []
                if utf8:
                    if not smtp.has_extn("smtputf8"):
                        raise ReleaseError(f"the envelope has UTF-8 addresses and the release endpoint "
                                           f"{address[0]}:{address[1]} does not offer SMTPUTF8 "
                                           "(smtputf8_enable = yes for that service)")
                    options.append("SMTPUTF8")
                refused = smtp.sendmail(sender, chosen, data, mail_options=options)
        except (OSError, smtplib.SMTPException, UnicodeError, ValueError) as e:
            raise ReleaseError(f"release endpoint {address[0]}:{address[1]}: {e}") from None
        if refused:
            raise ReleaseError("refused: " + "; ".join(f"{r}: {c} {m.decode(errors='replace')}"
                                                       for r, (c, m) in refused.items()))
        record = {"at": time.time(), "by": by, "to": chosen}
        if stripped:
            record["stripped"] = stripped[:MAX_STRIPPED_NAMES]
        entry.meta.setdefault("released", []).append(record)
        try:
            store.update(entry)
            store.count("release")
        except StoreError as e:
            raise ReleaseError(f"delivered to {', '.join(chosen)}, but the release was not recorded: {e}") from None
    return chosen


def learn(store: Store, entry_id: str, spamd, message_class: str, by: str) -> bool:
    """Tell spamd's Bayes filter that an entry is ham or spam and note it in the entry; True when
    spamd learned, False when it knew the message already. spamd's errors pass through
    (scanners.EngineError, OSError)."""
    with store.locked(entry_id) as entry:
        learned = spamd.tell(store.message(entry_id), message_class)
        entry.meta.setdefault("learned", []).append({"at": time.time(), "by": by, "as": message_class})
        store.update(entry)
    store.count(f"learn_{message_class}")
    return learned


def _token(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]", "_", text)[:64] or "unknown"


def purge(store: Store, older_than: float, dry_run: bool = False, failed: list | None = None) -> list[Entry]:
    """Delete entries older than `older_than` seconds; returns those deleted (with dry_run: those
    that would be). One that cannot be deleted (permissions, a broken file) does not stop the
    rest: it is added to `failed` as (id, reason)."""
    old = store.select(before=time.time() - older_than)
    if dry_run:
        return old
    gone = []
    for entry in old:
        try:
            store.delete(entry.id, action="purge")
        except NotFound:
            continue                    # deleted by someone else meanwhile
        except StoreError as e:
            if failed is not None:
                failed.append((entry.id, str(e)))
            continue
        gone.append(entry)
    return gone
