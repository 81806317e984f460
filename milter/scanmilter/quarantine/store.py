"""The quarantine store's interface: what the daemon and the quarantine command ask of a place
that keeps held mail. files.FileStore (a directory and an SQLite index) is the first
implementation; a database or Postfix's hold queue would offer the same methods, and the
command and the daemon would not change.

SECURITY: a store keeps mail that was held because it is dangerous, and its metadata is the
sender's word (envelope, Subject): a store never interprets a message, hands it out only as
bytes, takes entry ids from outside only after `valid_id`, and never delivers anything (release
and learning are their own modules, which take an entry from the store).
"""
from __future__ import annotations

import abc
import contextlib
import time

from .. import events
from .entry import Entry

# what the quarantine command counts, for the metrics
ACTIONS = ("release", "delete", "purge", "learn_ham", "learn_spam")


class StoreError(Exception):
    """The store cannot do what was asked (disk full, permissions, a broken directory)."""


class NotFound(StoreError):
    pass


class Busy(StoreError):
    """Another host does this right now (a purge of a shared store); nothing was done here."""


class Store(abc.ABC):
    """Held messages and their entries (entry.py). Ids come from the store; a method given an id
    that is not one, or of an entry that does not exist, raises NotFound. Every other failure is
    a StoreError."""

    def __init_subclass__(cls, **kwargs):
        # every backend's delete, purge_old and own release (the hold queue's) announce what they did
        # to the webhooks (events.py), whoever calls them: the command, a web page
        super().__init_subclass__(**kwargs)
        events.watch_store_class(cls)

    @abc.abstractmethod
    def put(self, reader, meta: dict, index_failed=None) -> str:
        """Keep a message (read from `reader`) with the daemon's metadata (entry.held_meta);
        returns the new id. Nothing is kept when this raises. When the entry is kept but could
        not be made searchable at once, index_failed(error) is called."""

    @abc.abstractmethod
    def get(self, entry_id: str) -> Entry:
        """An entry's metadata."""

    @abc.abstractmethod
    def message(self, entry_id: str) -> bytes:
        """The message exactly as it was held."""

    @abc.abstractmethod
    def select(self, reason: str = "", sender: str = "", recipient: str = "", since: float | None = None,
               before: float | None = None) -> list[Entry]:
        """Entries, newest first: of this reason, with a sender or a recipient containing these
        (any case), held at or after `since` and before `before` (Unix times)."""

    @abc.abstractmethod
    def locked(self, entry_id: str) -> contextlib.AbstractContextManager[Entry]:
        """Hold an entry's lock (re-entrant in a thread) and yield the entry as read under it:
        no other process or thread releases, learns, updates or deletes it meanwhile."""

    @abc.abstractmethod
    def update(self, entry: Entry) -> bool:
        """Write an entry's metadata back; NotFound if it was deleted meanwhile. False when it is
        written but not yet searchable."""

    @abc.abstractmethod
    def delete(self, entry_id: str, action: str = "delete", by: str = "") -> None:
        """Remove an entry; `action` (delete or purge) is what gets counted. `by`: who, for a
        store that keeps a history (empty: the user running the process)."""

    @abc.abstractmethod
    def count(self, action: str) -> None:
        """One more of the ACTIONS, kept where every process sees it (the daemon's metrics)."""

    @abc.abstractmethod
    def tallies(self) -> dict[str, int]:
        """How often each of the ACTIONS was done."""

    @abc.abstractmethod
    def stats(self) -> dict:
        """{"by_reason": {reason: {"entries": N, "bytes": N}}, "oldest": time or None,
        "released": number of entries released at least once}."""

    # Maintenance, for a store that keeps an index beside the entries or may be left with parts
    # of an interrupted write. A store that needs none keeps these.

    def repair_index(self, skipped: list | None = None) -> int | None:
        """Rebuild the index if a write to it failed: the number of entries indexed, or None when
        it needed nothing. An unreadable entry is added to `skipped` as (id, reason)."""
        return None

    def reindex(self, skipped: list | None = None) -> int:
        """Rebuild the index from the entries; the number of entries."""
        return len(self.select())

    def recover(self, min_age: float = 0.0) -> int:
        """Remove what an interrupted write left, at least `min_age` seconds old; how many."""
        return 0

    # Listing a page and purging: a store that can do better than going through select() (a
    # database: LIMIT, a lock shared by every host) overrides these.

    def listing(self, limit: int = 0, offset: int = 0, **filters) -> tuple[list[Entry], int, int]:
        """Entries of select(**filters) from `offset`, at most `limit` (0: all), the number of entries
        that match and their bytes."""
        entries = self.select(**filters)
        page = entries[offset:offset + limit] if limit else entries[offset:]
        return page, len(entries), sum(e.size for e in entries)

    def purge_old(self, older_than: float, dry_run: bool = False, failed: list | None = None) -> list[Entry]:
        """What purge() below does, for this store."""
        return _purge_each(self, older_than, dry_run, failed)


events.watch_store_class(Store)     # its purge_old, which most backends inherit


def purge(store: Store, older_than: float, dry_run: bool = False, failed: list | None = None) -> list[Entry]:
    """Delete entries older than `older_than` seconds; returns those deleted (with dry_run: those
    that would be). One that cannot be deleted (permissions, a broken file) does not stop the
    rest: it is added to `failed` as (id, reason)."""
    return store.purge_old(older_than, dry_run, failed)


def _purge_each(store: Store, older_than: float, dry_run: bool, failed: list | None) -> list[Entry]:
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
