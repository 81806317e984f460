"""The events scanmilter announces to webhooks (webhooks.py sends them): their names, the data each
carries, and the places that emit them. docs/webhooks.md shows every event with an example.

Each event is one JSON document, the same envelope for all (built in webhooks.py):

    {"version": 1, "event": NAME, "id": DELIVERY ID, "time": ISO 8601 UTC, "host": THIS HOST, "data": {...}}

`version` changes only when a field changes meaning or goes away; new fields may appear in
any version, and receivers must ignore what they do not know.

Where each is emitted, once for every quarantine backend (files, hold, postgresql):
  message.quarantined   handler.py, once the held copy is safe in the store
  message.released      quarantine/release.py (re-injection), or the store's own release (the hold
                        queue), through `watch_store_class` below
  message.deleted,      the store's delete and purge_old, through `watch_store_class`: every
  message.purged        backend, whoever calls them (the command, a web page)
  virus.found           handler.py, after the verdict
  engine.down/up        health.py, on a change of state only (an engine, or a member of a pool)
  clamd.database_old    app.py's periodic check (DatabaseAge below), once as it crosses the age

SECURITY: most fields come from mail (sender, recipients, subject, virus and file names) or from
an engine's reply (detail): they only ever travel JSON-encoded, each text cut to
webhook_field_limit characters and each list to webhook_list_limit items (webhooks.py), and
undecodable bytes are shown as \\xNN, never passed on as lone surrogates.
"""
from __future__ import annotations

import contextlib
import functools
import getpass
import os
import threading
import time

VERSION = 1

QUARANTINED = "message.quarantined"
RELEASED = "message.released"
DELETED = "message.deleted"
PURGED = "message.purged"
VIRUS = "virus.found"
ENGINE_DOWN = "engine.down"
ENGINE_UP = "engine.up"
DATABASE_OLD = "clamd.database_old"
EVENTS = (QUARANTINED, RELEASED, DELETED, PURGED, VIRUS, ENGINE_DOWN, ENGINE_UP, DATABASE_OLD)


def iso(t: float | None) -> str | None:
    """A Unix time as ISO 8601 UTC with milliseconds; None for none (or not a finite number)."""
    if not isinstance(t, (int, float)) or isinstance(t, bool) or t != t or t in (float("inf"), float("-inf")):
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def _never_raises(announce):
    """An announcement must never cost a message or turn a done action into a failed one."""
    @functools.wraps(announce)
    def safe(*args, **kwargs):
        try:
            announce(*args, **kwargs)
        except Exception:
            from .logs import log
            log.exception("webhooks: could not announce %s", announce.__name__)
    return safe


def _emit(name: str, data: dict) -> None:
    from . import webhooks
    webhooks.emit(name, data)


def _wanted(name: str) -> bool:
    from . import webhooks
    return webhooks.wanted(name)


# ---------------------------------------------------------------- the quarantine

def _entry(meta: dict | None, entry_id: str = "") -> dict:
    """What every message.* event says about an entry (from its metadata, entry.py's fields)."""
    meta = meta if isinstance(meta, dict) else {}
    recipients = meta.get("recipients") if isinstance(meta.get("recipients"), list) else []
    return {"entry": meta.get("id") or entry_id or None, "queue_id": meta.get("queue_id") or None,
            "reason": meta.get("reason") or None, "sender": meta.get("sender"),
            "recipients": recipients, "recipient_count": len(recipients), "subject": meta.get("subject"),
            "held_at": iso(meta.get("time"))}


@_never_raises
def quarantined(meta: dict, entry_id: str, backend: str, size: int) -> None:
    """The daemon held a message: its metadata as the store recorded it (entry.held_meta)."""
    if not _wanted(QUARANTINED):
        return
    data = _entry(meta, entry_id)
    data.update(entry=entry_id, held_at=iso(time.time()), backend=backend, rule=meta.get("rule"),
                direction=meta.get("direction"), score=meta.get("score"), viruses=meta.get("viruses", []),
                client_address=meta.get("client_address"), size=size)
    _emit(QUARANTINED, data)


@_never_raises
def released(meta: dict, to: list[str], by: str) -> None:
    """An entry was delivered to `to` by `by`."""
    if not _wanted(RELEASED):
        return
    data = _entry(meta)
    data.update(recipients=list(to), recipient_count=len(to), by=by)
    _emit(RELEASED, data)


@_never_raises
def deleted(meta: dict | None, entry_id: str, action: str, by: str) -> None:
    """An entry was deleted (action "delete") or purged for its age ("purge"); `meta` None when
    its metadata could not be read first (the event then names the entry only)."""
    name = PURGED if action == "purge" else DELETED
    if not _wanted(name):
        return
    data = _entry(meta, entry_id)
    data["by"] = by
    _emit(name, data)


_actor = threading.local()


@contextlib.contextmanager
def acting_as(by: str):
    """Whom delete and purge events name as `by` in this thread (a web page's logged-in user);
    without it, the login of the process's user."""
    before = getattr(_actor, "name", None)
    _actor.name = by
    try:
        yield
    finally:
        _actor.name = before


def _by(given: str = "") -> str:
    if given or getattr(_actor, "name", None):
        return given or _actor.name
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


_depth = threading.local()


@contextlib.contextmanager
def _outermost():
    """True in the outermost of nested watched calls in this thread: a store that calls another's
    delete (the fallback store, purge through delete) announces once, not per layer."""
    depth = getattr(_depth, "n", 0)
    _depth.n = depth + 1
    try:
        yield depth == 0
    finally:
        _depth.n = depth


def _read(store, entry_id: str) -> dict | None:
    try:
        return dict(store.get(entry_id).meta)
    except Exception:       # NotFound, an unreadable entry: the action itself says what is wrong
        return None


def _watched_delete(method):
    @functools.wraps(method)
    def delete(self, entry_id, action="delete", *args, **kwargs):
        with _outermost() as outer:
            announce = outer and _wanted(PURGED if action == "purge" else DELETED)
            meta = _read(self, entry_id) if announce else None
            method(self, entry_id, action, *args, **kwargs)
        if announce:
            deleted(meta, entry_id, action, _by(kwargs.get("by", "")))
    delete.announces = True
    return delete


def _watched_purge(method):
    @functools.wraps(method)
    def purge_old(self, older_than, dry_run=False, *args, **kwargs):
        with _outermost() as outer:
            gone = method(self, older_than, dry_run, *args, **kwargs)
        if outer and not dry_run and _wanted(PURGED):
            by = _by()
            for entry in gone:
                deleted(entry.meta, entry.id, "purge", by)
        return gone
    purge_old.announces = True
    return purge_old


def _watched_release(method):
    """A store that releases by itself (the hold queue's postsuper -H): release(entry_id, by, ...)
    returns the recipients it went to."""
    @functools.wraps(method)
    def release(self, entry_id, by, *args, **kwargs):
        with _outermost() as outer:
            sent = method(self, entry_id, by, *args, **kwargs)
        if outer and _wanted(RELEASED):
            meta = _read(self, entry_id) or {"id": entry_id}
            released(meta, sent, by)
        return sent
    release.announces = True
    return release


_WATCHED = {"delete": _watched_delete, "purge_old": _watched_purge, "release": _watched_release}


def watch_store_class(cls) -> None:
    """Make a quarantine store class announce its deletions, purges and (when it has its own)
    releases: called for Store and every subclass (store.py), so that each backend, present
    or future, and every caller (the command, a web page) emit the same events."""
    for name, wrap in _WATCHED.items():
        method = cls.__dict__.get(name)
        if callable(method) and not getattr(method, "announces", False) \
                and not getattr(method, "__isabstractmethod__", False):
            setattr(cls, name, wrap(method))


# ---------------------------------------------------------------- mail and engines

@_never_raises
def virus_found(queue_id: str, viruses, action: str, entry: str, direction: str, sender: str,
                recipients: list[str], subject: str, client_address: str) -> None:
    if not _wanted(VIRUS):
        return
    _emit(VIRUS, {"queue_id": queue_id or None, "viruses": list(viruses), "action": action, "entry": entry or None,
                  "direction": direction, "sender": sender, "recipients": list(recipients),
                  "recipient_count": len(recipients), "subject": subject, "client_address": client_address})


@_never_raises
def engine_changed(engine: str, member: str | None, up: bool, detail: str = "") -> None:
    """An engine (member None) or one member of its pool went down or came back."""
    if up:
        _emit(ENGINE_UP, {"engine": engine, "member": member})
    else:
        _emit(ENGINE_DOWN, {"engine": engine, "member": member, "detail": detail})


class DatabaseAge:
    """clamd's signature database past clamd_database_age_limit: announced (and logged) once as it
    crosses the limit, again only after a database within the limit was seen."""

    def __init__(self):
        self.old = False

    def observe(self, version: int, built: float, limit: float, now: float | None = None) -> bool:
        """True when this reading crossed the limit (the event was emitted)."""
        now = time.time() if now is None else now
        if not limit or built != built:           # off, or a build time clamd did not give
            return False
        age = now - built
        if age <= limit:
            self.old = False
            return False
        if self.old:
            return False
        self.old = True
        from .logs import log
        log.warning("clamd's signature database %d was built %.1f days ago, over clamd_database_age_limit (%.1f "
                    "days): is freshclam running?", version, age / 86400, limit / 86400)
        _emit(DATABASE_OLD, {"version": version, "built_at": iso(built), "age_seconds": int(age),
                             "limit_seconds": int(limit)})
        return True
