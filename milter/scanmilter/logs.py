"""Logging set-up and the one summary line per message, in Postfix's style."""
from __future__ import annotations

import logging
import logging.handlers
import os
import re
import socket
import sys

log = logging.getLogger("scanmilter")

# Control characters, the backslash, undecodable bytes (surrogate-escaped by pymilter; any lone
# surrogate), and what makes a terminal show text other than it is: bidirectional marks, embeddings,
# overrides and isolates (U+061C, U+200E, U+200F, U+202A-U+202E, U+2066-U+2069), line and
# paragraph separators (U+2028, U+2029)
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\\\\\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
                          "\ud800-\udfff]")


def _hex(match: re.Match) -> str:
    code = ord(match.group())
    if 0xdc80 <= code <= 0xdcff:
        return f"\\x{code - 0xdc00:02x}"         # the raw byte pymilter could not decode
    return f"\\x{code:02x}" if code <= 0xff else f"\\u{code:04x}"


def escape(text: str, limit: int = 256) -> str:
    """Printable form of untrusted text: control characters, backslashes and raw bytes as \\xNN,
    bidirectional controls and line separators as \\uNNNN."""
    return _UNPRINTABLE.sub(_hex, text[:limit])


# In a summary field a file name must not look like the field's end or the next field.
_FIELD_BREAKS = re.compile("[ ,>]")


def file_name(f) -> str:
    """An attachment (attachments.FileFacts) as one summary field value: its name after the
    archives it lies in, "outer.7z>inner.zip>payload.exe" ("part-N" when it has none), each name
    escaped (escape) with spaces, commas and ">" as \\xNN, bounded."""
    names = [*f.container, f.names[0].sent if f.names else f"part-{f.part}"]
    return ">".join(_FIELD_BREAKS.sub(_hex, "".join(_visible(c) for c in escape(n, 100))) for n in names)[-400:]


def _visible(ch: str) -> str:
    """An invisible character of a name (zero-width, format, unassigned, separators) as \\uNNNN:
    "a\u200b.exe" must not read as "a.exe"."""
    return ch if ch.isprintable() else f"\\u{ord(ch):04x}" if ord(ch) <= 0xffff else f"\\U{ord(ch):08x}"


_SEVERITY = {logging.CRITICAL: "fatal"}


class _PostfixStyle(logging.Formatter):
    """"PREFIXwarning: ...", "PREFIXfatal: ...", like Postfix; plain text for info."""

    def __init__(self, prefix: str = ""):
        super().__init__("%(message)s")
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            text = f"{_SEVERITY.get(record.levelno, record.levelname.lower())}: {text}"
        return self.prefix + text


def _syslog_reachable(path: str) -> str:
    """"" when a datagram can be sent to `path`, else the reason."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(path)
        return ""
    except OSError as e:
        return e.strerror or str(e)
    finally:
        probe.close()


def setup(target: str, level: str, syslog_socket: str = "/dev/log") -> None:
    handler: logging.Handler | None = None
    problem = ""
    if target == "syslog":
        problem = _syslog_reachable(syslog_socket)
        if not problem:
            handler = logging.handlers.SysLogHandler(
                address=syslog_socket, facility=logging.handlers.SysLogHandler.LOG_MAIL)
            handler.setFormatter(_PostfixStyle(f"scanmilter[{os.getpid()}]: "))
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_PostfixStyle())
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
    if problem:
        log.warning("syslog socket %s: %s; logging to stderr instead", syslog_socket, problem)


def summary(queue_id: str, action: str, outcome, verdict, sender: str, recipients: int, size: int,
            ms: float, client: str = "", quarantine_id: str = "") -> str:
    """"4Xk2Lz1F3z: action=reject, reason=virus, direction=inbound, virus=Eicar, score=-, from=<a@b>,
    rcpts=2, size=1234, ms=85, client=192.0.2.1"."""
    from .policy import fmt_score
    parts = [f"{queue_id or 'NOQUEUE'}: action={action}", f"reason={outcome.reason}",
             f"direction={outcome.direction}", f"virus={','.join(verdict.viruses) or '-'}",
             f"score={fmt_score(verdict.score)}", f"from=<{escape(sender)}>", f"rcpts={recipients}"]
    # the attachment rule that decided (or, when something else did, the first that matched)
    lead = next((d for d in outcome.recipients if d.reason == outcome.reason and d.files), None) or \
        next((d for d in outcome.recipients if getattr(d, "files", ())), None)
    hit = next((h for h in lead.files if h.kind == "rule"), None) if lead else None
    if hit is not None:
        parts += [f"banned={file_name(hit.file)}", f"banned_rule={hit.name}"]
    report = getattr(verdict, "files", None)
    if report is not None and report.all_problems():
        seen = [f"limit:{p.detail}" if p.kind == "limit" else p.kind for p in report.all_problems()]
        parts.append(f"file_problems={','.join(dict.fromkeys(seen))}")
    if outcome.remove:
        parts.append(f"removed={len(outcome.remove)}")
    if quarantine_id:
        parts.append(f"quarantine={quarantine_id}")
    parts += [f"size={size}", f"ms={ms:.0f}"]
    if client:
        parts.append(f"client={escape(client)}")
    if verdict.cached:
        parts.append(f"cached={','.join(verdict.cached)}")
    skipped = ",".join(f"{e}:{d}" for e, d in verdict.skipped)
    if skipped:
        parts.append(f"skipped={escape(skipped)}")
    failures = "; ".join(f"{e} {d}" for e, d in verdict.failed)
    if failures:
        parts.append(f"failed={escape(failures)}")
    return ", ".join(parts)
