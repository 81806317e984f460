"""The quarantine: held mail kept for review.

  entry.py     what is recorded about a held message (defined once)
  store.py     Store, the interface the daemon and the quarantine command use
  files.py     FileStore: a directory and an SQLite index (quarantine_directory)
  hold.py      HoldStore: Postfix's hold queue, with our verdicts by queue id (quarantine_backend = "hold")
  postgres.py  PgStore: one quarantine in PostgreSQL for every host (quarantine_backend = "postgresql")
  fallback.py  FallbackStore: PgStore, and the local file store while PostgreSQL is down (quarantine_fallback)
  release.py   re-injection over SMTP (the only user of smtplib)
  learn.py     teaching spamd (SPAMC TELL)
The daemon and the command get their store from `open_store`: a second kind of store is a
module beside files.py and a line there.
"""
from __future__ import annotations

from .entry import Entry, held_meta, valid_id
from .files import FileStore
from .store import ACTIONS, Busy, NotFound, Store, StoreError, purge

__all__ = ["ACTIONS", "Busy", "Entry", "FileStore", "NotFound", "Store", "StoreError", "held_meta", "location",
           "open_store", "purge", "valid_id"]


def location(cfg) -> str:
    """What in the settings names the store; "" when there is no quarantine (and policies that
    hold mail are refused). A new store is reopened on reload when this changes."""
    if cfg.quarantine_backend == "hold" and cfg.quarantine_directory:
        return f"hold:{cfg.quarantine_directory} (Postfix {cfg.postfix_config_directory or 'default'})"
    if cfg.quarantine_backend == "postgresql":
        from ..db import redact_dsn
        local = f":{cfg.quarantine_directory}" if cfg.quarantine_fallback == "local" else ""
        where = cfg.database_dsn_file or redact_dsn(cfg.database_dsn)
        return f"postgresql:{where} (fallback {cfg.quarantine_fallback}{local})"
    return cfg.quarantine_directory


def open_store(cfg, command: bool = False) -> Store | None:
    """The store the settings name, None when there is no quarantine. `command`: opened by an
    operator command, which may run as a user the store is closed to; that is then said as
    such. Raises StoreError."""
    if not location(cfg):
        return None
    if cfg.quarantine_backend == "hold":
        from .hold import HoldStore
        return (HoldStore.for_command if command else HoldStore)(
            cfg.quarantine_directory, postfix_config_directory=cfg.postfix_config_directory,
            timeout=cfg.postfix_command_timeout, keep=cfg.quarantine_max_age)
    if cfg.quarantine_backend == "postgresql":
        from .postgres import PgStore
        store = PgStore.from_settings(cfg, command)
        if cfg.quarantine_fallback == "local":
            from .fallback import FallbackStore
            return FallbackStore(store, cfg.quarantine_directory, command)
        return store
    if command:
        return FileStore.for_command(cfg.quarantine_directory)
    return FileStore(cfg.quarantine_directory)
