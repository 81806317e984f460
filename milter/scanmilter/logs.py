"""Logging set-up and the one summary line per message, in Postfix's style."""
from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys

log = logging.getLogger("scanmilter")

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")


def escape(text: str, limit: int = 256) -> str:
    """Printable form of untrusted text: control characters and backslashes as \\xNN."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)[:limit]


_SEVERITY = {logging.CRITICAL: "fatal"}


class _PostfixStyle(logging.Formatter):
    """"warning: ...", "error: ...", like Postfix; plain text for info."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            text = f"{_SEVERITY.get(record.levelno, record.levelname.lower())}: {text}"
        return text


def setup(target: str, level: str, syslog_socket: str = "/dev/log") -> None:
    handler: logging.Handler | None = None
    problem = ""
    if target == "syslog":
        try:
            handler = logging.handlers.SysLogHandler(
                address=syslog_socket, facility=logging.handlers.SysLogHandler.LOG_MAIL)
            handler.setFormatter(_PostfixStyle(f"scanmilter[{os.getpid()}]: %(message)s"))
        except OSError as e:
            problem = f"syslog socket {syslog_socket}: {e.strerror or e}; logging to stderr instead"
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_PostfixStyle("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
    if problem:
        log.warning("%s", problem)


def summary(queue_id: str, action: str, reason: str, verdict, sender: str, recipients: int,
            size: int, ms: float, client: str = "", failures: str = "") -> str:
    """"4Xk2Lz1F3z: action=reject, reason=virus, virus=Eicar, score=-, from=<a@b>, rcpts=2, size=1234, ms=85"."""
    from .policy import fmt_score
    parts = [f"{queue_id or 'NOQUEUE'}: action={action}", f"reason={reason}",
             f"virus={','.join(verdict.viruses) or '-'}", f"score={fmt_score(verdict.score)}",
             f"from=<{escape(sender)}>", f"rcpts={recipients}", f"size={size}", f"ms={ms:.0f}"]
    if client:
        parts.append(f"client={escape(client)}")
    if failures:
        parts.append(f"failed={escape(failures)}")
    return ", ".join(parts)
