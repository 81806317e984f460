"""`scanmilter quarantine notify`: each recipient gets one digest of the mail held for them since
their last digest (run by scanmilter-notify.timer).

Who: the recipients of inbound entries whom the policy's [notify] table wants (per recipient, per
domain, or `send` for everyone else), whose copy was not released yet. What: one line per entry,
sender, Subject, when, why and the spam score, with a signed link to the web page (web/links.py)
unless the reason is one only a postmaster may release ([notify] admin_only_reasons: viruses by
default), which is listed as held, without a link. How: plain text and HTML (multipart/alternative)
from Jinja2 templates (notify_template_directory may replace them), sent over SMTP through the
release service (quarantine_release_address), which does not run scanmilter.

Never twice: before a digest is sent, each of its entries is claimed for that recipient under the
entry's lock in the store (the file lock of the file store, the row lock of PostgreSQL, the entry
lock of the hold backend): a record {to, at, nonce, host} is added to the entry's "notified" list,
unless one for that recipient is there already, in which case another run (on this host or
another) has it. A digest whose sending fails (or that cannot be composed) gives its claims back,
so the next run lists them again; one the release service took counts as sent, whatever QUIT
gets. A run that dies between the claim and the send loses that notice (the entry stays held and
listed on the web page): a digest is sent at most once, never twice. The nonce is the link's: the
web page marks the record used when the link acts, and refuses it after that.

SECURITY: everything in an entry is the sender's word. Subjects are decoded and stripped of control
and reordering characters (web/text.py) before they reach a template; the HTML template is
autoescaped (Jinja2's autoescape, on for .html), so a Subject of "<script>" arrives as text.
Recipients whose address has control characters or undecodable bytes get no digest.
"""
from __future__ import annotations

import argparse
import email.policy
import email.utils
import re
import secrets
import smtplib
import socket
import sys
import time
from dataclasses import dataclass
from email.message import EmailMessage

from .logs import escape
from .quarantine.entry import SURROGATE
from .quarantine.store import NotFound, StoreError

EXIT_OK, EXIT_USAGE, EXIT_INCOMPLETE = 0, 2, 5
TEMPLATES = ("digest_subject.txt", "digest.txt", "digest.html")


@dataclass
class Item:
    """One entry as a digest lists it (every text made safe to show)."""
    id: str
    held: str
    sender: str
    subject: str
    reason: str
    score: str
    viruses: str
    link: str           # "" when there is none (no web_base_url, or a reason only a postmaster releases)
    admin_only: bool


def deliverable(address: str) -> bool:
    """An address a digest can be sent to as it is."""
    return bool(address) and "@" in address and not SURROGATE.search(address) \
        and not re.search(r"[\x00-\x20\x7f<>]", address)


def notified(entry, recipient: str) -> dict | None:
    """The record of the digest that listed an entry for a recipient, or None."""
    for record in entry.meta.get("notified") or []:
        if isinstance(record, dict) and str(record.get("to", "")).lower() == recipient.lower():
            return record
    return None


def released_to(entry, recipient: str) -> bool:
    return any(recipient.lower() == str(r).lower() for rel in entry.released if isinstance(rel, dict)
               for r in rel.get("to", []))


def due(store, rules, now: float, max_age: float) -> dict[str, tuple[str, list]]:
    """{recipient in lower case: (recipient, entries oldest first)} of what the next digests list."""
    found: dict[str, tuple[str, list]] = {}
    for entry in reversed(store.select(since=now - max_age)):
        if entry.direction == "outbound":           # its recipients are elsewhere; its sender is ours
            continue
        for rcpt in dict.fromkeys(entry.recipients):
            if not deliverable(rcpt) or not rules.wants(rcpt) or notified(entry, rcpt) or released_to(entry, rcpt):
                continue
            found.setdefault(rcpt.lower(), (rcpt, []))[1].append(entry)
    return found


def claim(store, entry_id: str, recipient: str, now: float, host: str):
    """Record under the entry's lock that a digest lists it for `recipient`: (entry, nonce), or None
    when a digest did already (another run) or the entry is gone."""
    try:
        with store.locked(entry_id) as entry:
            if notified(entry, recipient) or released_to(entry, recipient):
                return None
            nonce = secrets.token_hex(8)
            entry.meta.setdefault("notified", []).append({"to": recipient, "at": now, "nonce": nonce, "host": host})
            store.update(entry)
            return entry, nonce
    except NotFound:
        return None


def unclaim(store, entry_id: str, recipient: str, nonce: str) -> None:
    """Take a claim back (its digest was not sent): the next run lists the entry again."""
    with store.locked(entry_id) as entry:
        records = entry.meta.get("notified") or []
        kept = [r for r in records if not (isinstance(r, dict) and r.get("nonce") == nonce
                                           and str(r.get("to", "")).lower() == recipient.lower())]
        if len(kept) != len(records):
            entry.meta["notified"] = kept
            store.update(entry)


# ---- the message

def environment(directory: str = ""):
    """The templates: the admin's directory first, then the shipped ones. HTML is autoescaped."""
    import jinja2
    loaders = [jinja2.FileSystemLoader(directory)] if directory else []
    loaders.append(jinja2.PackageLoader("scanmilter", "templates"))
    return jinja2.Environment(loader=jinja2.ChoiceLoader(loaders), undefined=jinja2.StrictUndefined,
                              autoescape=jinja2.select_autoescape(enabled_extensions=("html",),
                                                                  default_for_string=False, default=False),
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def item(entry, link: str, admin_only: bool) -> Item:
    from .web.text import decoded, safe
    return Item(id=entry.id, held=time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.time)),
                sender=safe(entry.sender or "<>", 200), subject=safe(decoded(entry.subject) or "(no subject)", 200),
                reason=safe(entry.reason, 40), score="-" if entry.score is None else f"{entry.score:.1f}",
                viruses=safe(", ".join(map(str, entry.viruses)), 200), link=link, admin_only=admin_only)


def compose(env, sender: str, recipient: str, items: list[Item], more: int, cfg) -> EmailMessage:
    from .web.text import safe
    values = {"recipient": safe(recipient, 320), "items": items, "more": more, "sender": sender,
              "site": cfg.web_base_url, "link_days": max(round(cfg.web_link_lifetime / 86400), 1)}
    subject = safe(env.get_template("digest_subject.txt").render(values).strip(), 200)
    utf8 = not recipient.isascii()
    msg = EmailMessage(policy=email.policy.SMTPUTF8 if utf8 else email.policy.SMTP)
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = email.utils.make_msgid("scanmilter-digest", domain=sender.rpartition("@")[2])
    msg["Auto-Submitted"] = "auto-generated"          # RFC 3834: no vacation replies to a digest
    msg["X-Auto-Response-Suppress"] = "All"
    msg.set_content(env.get_template("digest.txt").render(values))
    msg.add_alternative(env.get_template("digest.html").render(values), subtype="html")
    return msg


def release_service(cfg) -> tuple[str, int]:
    """The Postfix service digests go through (the release service: it does not run scanmilter)."""
    from .scanners import parse_client_socket
    via = cfg.quarantine_central_release_address or cfg.quarantine_release_address
    kind, address = parse_client_socket(via)
    if kind != "inet":
        raise ValueError(f"quarantine_release_address must be inet:HOST:PORT to send digests, not {via!r}")
    return address


def send(address: tuple[str, int], sender: str, recipient: str, msg: EmailMessage, timeout: float) -> None:
    """Hand one digest to the release service; OSError or smtplib.SMTPException when it is not taken.
    Once the service has taken it (its answer to the end of the data), nothing that happens at QUIT
    counts: a refused or timed-out QUIT must not give the claims back, or the next run sends the
    digest a second time."""
    utf8 = not recipient.isascii()
    data = msg.as_bytes()
    smtp = smtplib.SMTP(address[0], address[1], timeout=timeout)
    try:
        smtp.ehlo()
        options = []
        if utf8:
            if not smtp.has_extn("smtputf8"):
                raise smtplib.SMTPNotSupportedError("the release service does not offer SMTPUTF8")
            options.append("SMTPUTF8")
        if not data.isascii() and smtp.has_extn("8bitmime"):
            options.append("BODY=8BITMIME")
        smtp.sendmail(sender, [recipient], data, mail_options=options)
    finally:
        try:
            smtp.quit()
        except (OSError, smtplib.SMTPException):
            smtp.close()


# ---- a run

def run(store, cfg, rules, keys=None, now: float | None = None, dry_run: bool = False, out=print,
        err=None) -> int:
    """Send every digest due; the exit status (EXIT_INCOMPLETE when some were not sent)."""
    err = err or (lambda text: print(text, file=sys.stderr))
    now = time.time() if now is None else now
    host = getattr(store, "host", "") or socket.getfqdn()         # a shared store's database_host_name
    sender = cfg.notify_from or f"postmaster@{socket.getfqdn()}"
    env = environment(cfg.notify_template_directory)
    for name in TEMPLATES:
        env.get_template(name)          # a broken template stops the run before anything is claimed
    address = release_service(cfg)
    sent = failed = listed = 0
    for _, (rcpt, entries) in sorted(due(store, rules, now, cfg.notify_max_age).items()):
        chosen, more = entries[:cfg.notify_max_entries], max(len(entries) - cfg.notify_max_entries, 0)
        if dry_run:
            out(f"{escape(rcpt)}: would list {len(chosen)} entr{'y' if len(chosen) == 1 else 'ies'}"
                + (f" ({more} more wait for the next digest)" if more else "") + ": "
                + " ".join(e.id for e in chosen))
            continue
        claims = []
        for entry in chosen:
            try:
                got = claim(store, entry.id, rcpt, now, host)
            except StoreError as e:
                err(f"scanmilter: notify {escape(rcpt)}: entry {entry.id}: {escape(str(e))}")
                continue
            if got:
                claims.append(got)
        if not claims:
            continue
        items = []
        for entry, nonce in claims:
            admin_only = rules.admin_only(entry.reason)
            link = ""
            expires = int(min(now + cfg.web_link_lifetime, entry.time + cfg.quarantine_max_age))
            if keys is not None and cfg.web_base_url and not admin_only and expires > now:
                link = f"{cfg.web_base_url.rstrip('/')}/r/{keys.sign(entry.id, rcpt, expires, nonce)}"
            items.append(item(entry, link, admin_only))
        try:
            digest = compose(env, sender, rcpt, items, more, cfg)
        except Exception as e:      # hostile text the email package cannot make a header of; a template's error
            problem = f"cannot be composed: {type(e).__name__}: {e}"
        else:
            try:
                send(address, sender, rcpt, digest, cfg.quarantine_release_timeout)
                problem = ""
            except (OSError, smtplib.SMTPException, UnicodeError, ValueError) as e:
                problem = str(e)
        if problem:
            failed += 1
            err(f"scanmilter: notify {escape(rcpt)}: not sent ({escape(problem, 500)}); its {len(claims)} "
                "entries wait for the next run")
            for entry, nonce in claims:
                try:
                    unclaim(store, entry.id, rcpt, nonce)
                except StoreError as e2:
                    err(f"scanmilter: notify {escape(rcpt)}: entry {entry.id} stays marked notified: "
                        f"{escape(str(e2))}")
            continue
        sent += 1
        listed += len(claims)
        out(f"{escape(rcpt)}: digest of {len(claims)} entr{'y' if len(claims) == 1 else 'ies'} sent"
            + (f"; {more} more wait for the next one" if more else ""))
    if not dry_run:
        out(f"sent {sent} digest{'' if sent == 1 else 's'} listing {listed} entr{'y' if listed == 1 else 'ies'}"
            + (f"; {failed} could not be sent" if failed else ""))
    return EXIT_INCOMPLETE if failed else EXIT_OK


def cmd_notify(store, cfg, args) -> int:
    """The quarantine command's verb: the policy's [notify] rules, the key for links, then run."""
    from . import policyfile
    from .config import ConfigError
    try:
        policy = policyfile.load(cfg.policy_file, quarantine_available=True)
        keys = None
        if cfg.web_base_url:
            from .web.links import Keys
            keys = Keys.from_file(cfg.web_key_file)
        release_service(cfg)
    except (ConfigError, ValueError) as e:
        print(f"scanmilter: notify: {escape(str(e), 1000)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        import jinja2  # noqa: F401
    except ImportError:
        print("scanmilter: notify: Jinja2 is not installed (pip install 'scanmilter[web]')", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run(store, cfg, policy.notify, keys, dry_run=args.dry_run)
    except Exception as e:
        import jinja2
        if isinstance(e, jinja2.TemplateError):
            print(f"scanmilter: notify: a digest template is broken: {escape(str(e), 1000)}", file=sys.stderr)
            return EXIT_USAGE
        raise


def add_parser(actions, common: argparse.ArgumentParser) -> None:
    """`quarantine notify`, registered by commands/quarantine.py."""
    p = actions.add_parser("notify", parents=[common],
                           help="send each recipient a digest of the mail held for them since their last one")
    p.add_argument("--dry-run", action="store_true", help="say who would get which entries; send and record nothing")
    p.set_defaults(run=cmd_notify)
