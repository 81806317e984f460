"""What the web page does to an entry, through the quarantine command's own code: releases go
through commands/quarantine.py `release_entry` (re-injection by quarantine/release.py, or
`postsuper -H` for the hold backend), learning through its learner and quarantine/learn.py,
deletion through the store's `delete`. Who acted is recorded as the command records it, in the
entry's release and learning records (and PostgreSQL's events, the hold backend's done_by):
"web:RECIPIENT" for a recipient's link, "web-admin:LOGIN" for a postmaster; every action is also
logged.

A recipient's link (links.py) acts once, on its entry, for its recipient only: release delivers to
that recipient alone, and "delete" drops that recipient's copy; the entry itself goes once no
recipient is left waiting for it. The link's record in the entry (notify.py) is marked used under
the entry's lock, together with the action, so a second POST of the same link is refused.

Postfix's hold queue (quarantine_backend = "hold") holds and releases a whole message: a recipient
may release or delete it only when they are its one recipient; with several, the page says that
only the postmaster can act.
"""
from __future__ import annotations

import time

from .. import notify
from ..commands import quarantine as command
from ..logs import escape, log
from ..quarantine import learn
from ..quarantine.store import NotFound, StoreError
from .links import LinkError


class Refused(Exception):
    """An action or a link the page refuses, with the sentence it shows. kind: forged, expired,
    used, gone, other (another recipient), admin_only, not_allowed, failed."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _when(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t or 0))


def _check(entry, link, record) -> None:
    """The link's recipient is one of the entry's and its record is the one the digest made."""
    if not any(r.lower() == link.recipient.lower() for r in entry.recipients):
        raise Refused("other", "this link is not for this message")
    if record is None or record.get("nonce") != link.nonce:
        raise Refused("forged", "this link is not valid any more")
    used = record.get("used")
    if isinstance(used, dict):
        done = {"release": "released to you", "delete": "deleted for you"}.get(used.get("action"), "used")
        raise Refused("used", f"this link was used already: the message was {done} on {_when(used.get('at'))}")


def open_link(store, keys, token: str, now: float):
    """(link, entry) of a recipient's link, or Refused saying why it cannot be used."""
    try:
        link = keys.verify(token, now)
    except LinkError as e:
        raise Refused(e.kind, str(e)) from None
    try:
        entry = store.get(link.entry_id)
    except NotFound:
        raise Refused("gone", "this message is no longer held: it was released, deleted or expired") from None
    _check(entry, link, notify.notified(entry, link.recipient))
    return link, entry


def why_not_release(store, entry, recipient: str, rules) -> str:
    """Why a recipient may not release an entry themselves, or ""."""
    if rules.admin_only(entry.reason):
        return f"mail held as {entry.reason} can be released only by the postmaster"
    if notify.released_to(entry, recipient):
        return "it was released to you already"
    if getattr(store, "in_postfix_queue", False) and len({r.lower() for r in entry.recipients}) > 1:
        return ("this message was held for other recipients too, and the mail system can only release it to all of "
                "them at once: ask the postmaster")
    return ""


def why_not_delete(store, entry) -> str:
    if getattr(store, "in_postfix_queue", False) and len({r.lower() for r in entry.recipients}) > 1:
        return "this message was held for other recipients too: ask the postmaster"
    return ""


def _mark_used(store, entry_id: str, link, action: str):
    """Mark the link's record used (under the entry's lock, held by the caller); the entry as written."""
    entry = store.get(entry_id)
    record = notify.notified(entry, link.recipient)
    record["used"] = {"at": time.time(), "action": action}
    store.update(entry)
    return entry


def recipient_release(store, cfg, keys, rules, token: str, now: float) -> list[str]:
    """Release an entry to the link's recipient alone."""
    from ..quarantine.release import ReleaseError
    link = open_link(store, keys, token, now)[0]
    by = f"web:{link.recipient}"
    try:
        with store.locked(link.entry_id) as entry:
            _check(entry, link, notify.notified(entry, link.recipient))     # again, under the lock
            why = why_not_release(store, entry, link.recipient, rules)
            if why:
                raise Refused("admin_only" if rules.admin_only(entry.reason) else "not_allowed", why)
            hold = getattr(store, "in_postfix_queue", False)
            sent = command.release_entry(store, cfg, entry.id, by, None if hold else [link.recipient])
            try:
                _mark_used(store, entry.id, link, "release")
            except StoreError as e:         # delivered and recorded as released: a second try is refused anyway
                log.warning("web: %s released to %s, but its link was not marked used: %s", entry.id,
                            escape(link.recipient), escape(str(e)))
    except NotFound:
        raise Refused("gone", "this message is no longer held: it was released, deleted or expired") from None
    except (ReleaseError, StoreError, command.UsageError) as e:
        log.warning("web: release of %s to %s failed: %s", link.entry_id, escape(link.recipient), escape(str(e), 500))
        raise Refused("failed", "the message could not be released just now; try again later, or ask the "
                                "postmaster") from None
    log.info("web: %s released to %s by %s", link.entry_id, escape(", ".join(sent)), escape(by))
    return sent


def recipient_delete(store, keys, token: str, now: float) -> bool:
    """Drop the link's recipient's copy: the entry is deleted once none of its recipients waits
    for it (each released or deleted by their link). True when the entry itself went."""
    link = open_link(store, keys, token, now)[0]
    by = f"web:{link.recipient}"
    try:
        with store.locked(link.entry_id) as entry:
            _check(entry, link, notify.notified(entry, link.recipient))
            why = why_not_delete(store, entry)
            if why:
                raise Refused("not_allowed", why)
            entry = _mark_used(store, entry.id, link, "delete")
            waiting = [r for r in entry.recipients if not notify.released_to(entry, r)
                       and not (isinstance(rec := notify.notified(entry, r), dict) and rec.get("used"))]
            gone = not waiting
            if gone:
                delete_entry(store, entry.id, by)
    except NotFound:
        raise Refused("gone", "this message is no longer held: it was released, deleted or expired") from None
    except StoreError as e:
        log.warning("web: delete of %s for %s failed: %s", link.entry_id, escape(link.recipient), escape(str(e), 500))
        raise Refused("failed", "the message could not be deleted just now; try again later") from None
    log.info("web: %s deleted for %s by %s%s", link.entry_id, escape(link.recipient), escape(by),
             "" if gone else " (kept for its other recipients)")
    return gone


# ---- a postmaster's actions

def delete_entry(store, entry_id: str, by: str) -> None:
    """The store's delete, as `quarantine delete` does it; a store with a history records who."""
    store.delete(entry_id, by=by)


def learn_entry(store, cfg, entry_id: str, message_class: str, by: str) -> bool:
    """Teach the spam engine, as `quarantine confirm` and `release --learn-ham` do."""
    _, make = command._learner(cfg)
    return learn.learn(store, entry_id, make(), message_class, by)


def admin_act(store, cfg, entry_id: str, action: str, login: str) -> str:
    """One postmaster action on one entry (release, release_learn, delete, confirm): what was done,
    as a sentence. Refused when it could not be done."""
    from ..quarantine.release import ReleaseError
    from ..scanners import EngineError
    by = f"web-admin:{login}"
    try:
        if action in ("release", "release_learn"):
            sent = command.release_entry(store, cfg, entry_id, by, keep_message=action == "release_learn")
            done = f"released to {', '.join(sent)}"
            if action == "release_learn":
                try:
                    learn_entry(store, cfg, entry_id, "ham", by)
                    done += ", learned as ham"
                except (EngineError, OSError, StoreError) as e:
                    done += f", but not learned as ham: {e}"
        elif action == "delete":
            delete_entry(store, entry_id, by)
            done = "deleted"
        elif action == "confirm":
            learn_entry(store, cfg, entry_id, "spam", by)
            done = "learned as spam (it stays held)"
        else:
            raise Refused("not_allowed", f"unknown action {action!r}")
    except NotFound as e:
        raise Refused("gone", str(e)) from None
    except (ReleaseError, StoreError, EngineError, OSError, command.UsageError) as e:
        log.warning("web: %s of %s by %s failed: %s", action, entry_id, escape(by), escape(str(e), 500))
        raise Refused("failed", str(e)) from None
    log.info("web: %s %s by %s", entry_id, escape(done, 500), escape(by))
    return done
