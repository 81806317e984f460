"""quarantine_fallback = "local": PostgreSQL first, this host's file store when the database cannot
take a held message, and a mover that brings those entries into the database once it is back.

The daemon holds a message in PostgreSQL; if that fails (the database is down, unreachable, or
refuses the write) the message goes to the file store in quarantine_directory instead, exactly as
the file backend would keep it, and Postfix is answered only once one of the two has it. The
mover (a thread of the daemon, every quarantine_fallback_interval, and `quarantine purge`, run by
the purge timer) copies each waiting entry into the database under its own id and removes it
from the file store only after the database committed it. Moving is keyed by the id (INSERT ...
ON CONFLICT DO NOTHING): a move cut short, or run by the daemon and the timer at once, writes each
entry once and never loses one. Everything but `put` goes to PostgreSQL: the commands see the
entries once they are moved.

A commit whose answer is lost (the connection breaks just after PostgreSQL wrote the row) makes
the daemon keep a second copy locally, which is moved under its own id: such a message is listed
twice, never lost. The file store has the same window between writing an entry and answering.
"""
from __future__ import annotations

import io
import threading

from ..logs import escape, log
from .files import FileStore
from .postgres import PgStore
from .store import Store, StoreError


class FallbackStore(Store):
    def __init__(self, pg: PgStore, directory: str, command: bool = False):
        self.pg, self.directory, self.command = pg, directory, command
        self._local: FileStore | None = None
        self._moving = threading.Lock()
        self.fallback_puts = 0          # messages held locally because PostgreSQL failed (the metrics)
        self.moved = 0                  # entries moved into PostgreSQL by this process
        self.on_fallback = None         # called for each message held locally (the daemon's metrics)
        self.on_moved = None            # called with how many entries a run moved (the daemon's metrics)

    def local(self) -> FileStore:
        """The local file store, opened at its first use (a command that never needs it may run
        as a user it is closed to)."""
        if self._local is None:
            self._local = (FileStore.for_command if self.command else FileStore)(self.directory)
        return self._local

    # ---- what differs: holding, and moving

    def put(self, reader, meta: dict, index_failed=None) -> str:
        data = reader.read()       # once: the second attempt needs the bytes again
        try:
            return self.pg.put(io.BytesIO(data), meta, index_failed)
        except StoreError as e:
            problem = str(e)
        meta = {**meta, "host": meta.get("host") or self.pg.host,
                "release_address": meta.get("release_address") or self.pg.release_address}
        entry_id = self.local().put(io.BytesIO(data), meta, index_failed)
        self.fallback_puts += 1
        if self.on_fallback is not None:
            self.on_fallback()
        log.warning("quarantine: PostgreSQL did not take the message (%s); held in the local fallback store "
                    "as %s, moved to PostgreSQL when it is back", escape(problem, 500), entry_id)
        return entry_id

    def waiting(self) -> int:
        """Entries in the local fallback store, waiting to be moved."""
        return sum(1 for _ in self.local().ids_on_disk())

    def move_waiting(self, failed: list | None = None) -> int:
        """Move the local entries into PostgreSQL; how many were moved. StoreError when the
        database cannot be reached (the rest wait for the next try): what that run moved before
        is counted all the same (`moved`, on_moved)."""
        with self._moving:
            local = self.local()
            if not any(True for _ in local.ids_on_disk()):
                return 0
            done: list[str] = []
            try:
                self.pg.import_from(local, remove=True, action="moved", failed=failed, done=done)
            finally:
                self.moved += len(done)
                if done and self.on_moved is not None:
                    self.on_moved(len(done))
            return len(done)

    def recover(self, min_age: float = 0.0) -> int:
        return self.local().recover(min_age)

    # ---- everything else is PostgreSQL's

    def __getattr__(self, name):
        # check_database, check_write, describe, problem, observe, host ...: the database store's
        return getattr(self.pg, name)

    def get(self, entry_id):
        return self.pg.get(entry_id)

    def message(self, entry_id):
        return self.pg.message(entry_id)

    def select(self, **filters):
        return self.pg.select(**filters)

    def listing(self, limit: int = 0, offset: int = 0, **filters):
        return self.pg.listing(limit, offset, **filters)

    def locked(self, entry_id):
        return self.pg.locked(entry_id)

    def update(self, entry):
        return self.pg.update(entry)

    def delete(self, entry_id, action: str = "delete", by: str = ""):
        return self.pg.delete(entry_id, action, by)

    def count(self, action):
        return self.pg.count(action)

    def tallies(self):
        return self.pg.tallies()

    def stats(self):
        return self.pg.stats()

    def reindex(self, skipped=None):
        return self.pg.reindex(skipped)

    def purge_old(self, older_than: float, dry_run: bool = False, failed: list | None = None):
        """The purge timer moves what waits here first, then purges the database."""
        if not dry_run:
            self.move_waiting(failed)
        return self.pg.purge_old(older_than, dry_run, failed)
