"""The quarantine: held mail kept for review.

  entry.py     what is recorded about a held message (defined once)
  store.py     Store, the interface the daemon and the quarantine command use
  files.py     FileStore: a directory and an SQLite index (quarantine_directory)
  release.py   re-injection over SMTP (the only user of smtplib)
  learn.py     teaching spamd (SPAMC TELL)
The daemon and the command get their store from `open_store`: a second kind of store is a
module beside files.py and a line there.
"""
from __future__ import annotations

from .entry import Entry, held_meta, valid_id
from .files import FileStore
from .store import ACTIONS, NotFound, Store, StoreError, purge

__all__ = ["ACTIONS", "Entry", "FileStore", "NotFound", "Store", "StoreError", "held_meta", "location", "open_store",
           "purge", "valid_id"]


def location(cfg) -> str:
    """What in the settings names the store; "" when there is no quarantine (and policies that
    hold mail are refused). A new store is reopened on reload when this changes."""
    return cfg.quarantine_directory


def open_store(cfg, command: bool = False) -> Store | None:
    """The store the settings name, None when there is no quarantine. `command`: opened by an
    operator command, which may run as a user the store is closed to; that is then said as
    such. Raises StoreError."""
    if not location(cfg):
        return None
    if command:
        return FileStore.for_command(cfg.quarantine_directory)
    return FileStore(cfg.quarantine_directory)
