"""Release: deliver a held message to its recipients over SMTP, through a Postfix service that
does not run scanmilter (quarantine_release_address).

SECURITY: the held copy is hostile. Before it goes out, every verdict header it arrived with
(X-Spam-*, X-Virus-*, X-Quarantine-*, any case) is removed, so that a forged "clean" verdict or
release mark never reaches a mailbox; only our own X-Quarantine-Released is added. The envelope
is the sender's word: addresses with control characters or undecodable bytes are refused rather
than passed into an SMTP command. The entry stays locked from the check to the record, so two
releases never both deliver.
"""
from __future__ import annotations

import re
import smtplib
import time

from .. import events
from ..policy import VERDICT_HEADER_PREFIXES
from .entry import SURROGATE
from .store import Store, StoreError

MAX_STRIPPED_NAMES = 20        # forged header names recorded per release
_VERDICT_PREFIXES = tuple(p.encode("ascii") for p in VERDICT_HEADER_PREFIXES)


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
            dropping = name.lower().startswith(_VERDICT_PREFIXES)
            if dropping:
                stripped.append(_token(name.decode("ascii", "replace")))
        if not dropping:
            kept.append(line)
        pos = end
    return b"".join(kept) + data[pos:], stripped


def _check_address(role: str, address: str) -> None:
    """Refuse what cannot go into an SMTP command as it is: undecodable bytes, control characters."""
    if SURROGATE.search(address):
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
    with store.locked(entry_id) as entry:
        recipients = list(entry.recipients)
        chosen = to or recipients
        strangers = [r for r in chosen if r.lower() not in {x.lower() for x in recipients}]
        if strangers:
            raise ReleaseError(f"{', '.join(strangers)} not among the entry's recipients ({', '.join(recipients)})")
        done = {r.lower() for rel in entry.released for r in rel.get("to", [])}
        again = [r for r in chosen if r.lower() in done]
        if again and not force:
            raise ReleaseError(f"already released to {', '.join(again)}; use --force to deliver again")
        sender = entry.sender
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
            events.released(entry.meta, chosen, by)     # delivered all the same
            raise ReleaseError(f"delivered to {', '.join(chosen)}, but the release was not recorded: {e}") from None
    events.released(entry.meta, chosen, by)
    return chosen


def _token(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]", "_", text)[:64] or "unknown"
