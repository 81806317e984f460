"""The file store: held mail on disk, written so that a crash never loses or half-writes it.

Layout under quarantine_directory (0700; files 0600, whatever the process umask):
  entries/ID.msg     the message exactly as received (headers as Postfix passed them, body unchanged)
  entries/ID.json    its entry (entry.py); an entry exists once this file exists (it is written last)
  index.sqlite       an index for fast listing (WAL; entry.INDEX_COLUMNS); rebuilt from the .json
                     files at any time
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

SECURITY: the directory is private to the daemon's user (and root); the messages in it are
hostile and never parsed here, their metadata is the sender's word and reaches SQLite only as
bound parameters. Paths are built from validated ids only, opened relative to a directory
descriptor without following links, and the index files are refused when they are not regular
files.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import sqlite3
import stat
import threading
import time
from typing import Iterable, Iterator

from . import entry as E
from .entry import Entry, valid_id
from .store import ACTIONS, NotFound, Store, StoreError

TEMP_PREFIX = ".tmp-"
COPY_CHUNK = 256 * 1024
STALE_TEMP_SECONDS = 3600      # a temp file this old cannot belong to a writer still at work
INDEX_NAME = "index.sqlite"
STALE_MARKER = "index.stale"
INDEX_TIMEOUT = 10.0           # seconds a writer waits for a lock on the index before giving up

_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC
_COLUMNS = [name for name, _, _ in E.INDEX_COLUMNS]
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS entries ({", ".join(f"{name} {kind}" for name, kind, _ in E.INDEX_COLUMNS)});
CREATE INDEX IF NOT EXISTS entries_time ON entries(time);
CREATE TABLE IF NOT EXISTS tallies (action TEXT PRIMARY KEY, count INTEGER NOT NULL);
"""
_INSERT = f"INSERT OR REPLACE INTO entries ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"



def _like_literal(text: str) -> str:
    """`text` for a LIKE pattern that matches it as written: its %, _ and \\ are escaped."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")

class FileStore(Store):
    """Entries as files in a directory, with an SQLite index for listing."""

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

    @classmethod
    def for_command(cls, directory: str) -> FileStore:
        """The store as an operator command opens it: a directory this user may not read is said
        to be so (the constructor would report a failure to create what it cannot see)."""
        directory = os.path.abspath(directory)
        parent = os.path.dirname(directory)
        if (os.path.isdir(directory) and not os.access(directory, os.R_OK | os.X_OK)) \
                or (os.path.isdir(parent) and not os.access(parent, os.X_OK)):
            raise StoreError(f"{directory}: cannot open the quarantine: Permission denied (run this as root "
                             "or as the daemon's user)")
        return cls(directory)

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
                db.execute(_INSERT, E.index_row(meta))
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
            E.index_row(meta)
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
                db.execute(_INSERT, E.index_row(meta))
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

    def delete(self, entry_id: str, action: str = "delete", by: str = "") -> None:
        """Remove an entry; `action` (delete or purge) is what gets counted. Its metadata need
        not be readable. The directory keeps no history: `by` goes to the log and the events."""
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
            args.append(E.index_text(reason))
        if sender:
            query += " AND lower(sender) LIKE ? ESCAPE '\\'"
            args.append(f"%{_like_literal(E.index_text(sender).lower())}%")
        if recipient:
            query += " AND lower(recipients) LIKE ? ESCAPE '\\'"
            args.append(f"%{_like_literal(E.index_text(recipient).lower())}%")
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
                        rows.append(E.index_row(self.get(entry_id).meta))
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
