"""The only module that speaks milter: callbacks -> Message; Decision -> replies and header edits.

One Handler per SMTP connection (libmilter runs each in its own thread); a new Message on
every MAIL FROM. Callbacks before end of message are no-reply (Postfix does not wait for
them); an exception there is remembered and answered with our 451 at end of message.
"""
from __future__ import annotations

import functools
import re
import threading
import time

import Milter

from . import policy as P
from .logs import escape, log, summary
from .message import Connection, Message, Spool

INTERNAL_ERROR_REPLY = ("451", "4.7.1", "Internal error in the content filter, please try again later")
_MILTER_ACTION = {P.ACCEPT: Milter.ACCEPT, P.REJECT: Milter.REJECT,
                  P.TEMPFAIL: Milter.TEMPFAIL, P.DISCARD: Milter.DISCARD}
FOLD_WIDTH = 78     # header lines we write are folded to this width (RFC 5322 recommends 78)


class Runtime:
    """What every connection shares: settings, policy, the pipeline, in-flight counts."""

    def __init__(self, cfg, policy, pipeline):
        self.cfg, self.policy, self.pipeline = cfg, policy, pipeline
        self._lock = threading.Lock()
        self.in_flight = 0

    def begin(self) -> None:
        with self._lock:
            self.in_flight += 1

    def end(self) -> None:
        with self._lock:
            self.in_flight -= 1


def guarded(func):
    """Catch any exception at the callback boundary: log it with its traceback, never crash."""
    replies = func.__name__ == "eom"

    @functools.wraps(func)
    def wrapper(self, *args):
        try:
            return func(self, *args)
        except Exception:
            qid = self.msg.queue_id if self.msg and self.msg.queue_id else "NOQUEUE"
            log.exception("%s: error in %s callback", qid, func.__name__)
            self.failed = True
            if not replies:
                return Milter.CONTINUE
            self.setreply(*INTERNAL_ERROR_REPLY)
            self._end_message()
            return Milter.TEMPFAIL
    return wrapper


def fold(name: str, value: str, width: int = FOLD_WIDTH) -> str:
    """Fold a header value at spaces, and inside long lists after commas; continuation
    lines start with a tab. Returns the value without the leading space."""
    pieces = []                       # (text, starts a new word)
    for word in value.split(" "):
        pieces += [(p, i == 0) for i, p in enumerate(re.findall(r"[^,]*,|[^,]+", word))]
    lines, line, room = [], "", width - len(name) - 2
    for text, new_word in pieces:
        sep = " " if new_word and line else ""
        if line and len(line) + len(sep) + len(text) > room:
            lines.append(line)
            line, sep, room = "", "", width - 1
        line += sep + text
    lines.append(line)
    return "\n\t".join(lines)


@Milter.header_leading_space
class Handler(Milter.Base):
    # With header_leading_space, values arrive and leave with their leading white space,
    # so the spool holds the header lines byte for byte and our edits add the space.

    def __init__(self, runtime: Runtime):
        self.rt = runtime
        self.conn = Connection()
        self.msg: Message | None = None
        self.failed = False

    @Milter.noreply
    @guarded
    def connect(self, hostname, family, hostaddr):
        address = hostaddr[0] if isinstance(hostaddr, tuple) and hostaddr else ""
        self.conn = Connection(address, hostname or "", self.getsymval("{daemon_name}") or "")
        return Milter.CONTINUE

    @Milter.noreply
    @guarded
    def envfrom(self, sender, *params):
        self._end_message()
        self.failed = False
        cfg = self.rt.cfg
        spool = Spool(cfg.spool_memory_limit, cfg.message_size_limit, cfg.spool_directory or None)
        self.msg = Message(sender.strip("<>"), spool, auth_user=self.getsymval("{auth_authen}") or "")
        self.rt.begin()
        self.conn.messages += 1
        return Milter.CONTINUE

    @Milter.noreply
    @guarded
    def envrcpt(self, rcpt, *params):
        self.msg.recipients.append(rcpt.strip("<>"))
        return Milter.CONTINUE

    @Milter.noreply
    @Milter.decode("bytes")
    @guarded
    def header(self, name, value):
        self.msg.add_header(name, value, P.OWN_HEADER_PREFIXES)
        return Milter.CONTINUE

    @Milter.noreply
    @guarded
    def eoh(self):
        self.msg.end_headers()
        return Milter.CONTINUE

    @Milter.noreply
    @guarded
    def body(self, chunk):
        self.msg.add_body(chunk)
        return Milter.CONTINUE

    @guarded
    def eom(self):
        msg = self.msg
        if msg is None or self.failed:
            self.setreply(*INTERNAL_ERROR_REPLY)
            log.error("%s: message not filtered after an earlier error: tempfail",
                      self.getsymval("i") or "NOQUEUE")
            self._end_message()
            return Milter.TEMPFAIL
        msg.queue_id = self.getsymval("i") or ""
        inspection = self.rt.pipeline.inspect(msg.spool, self.rt.policy)
        decision = inspection.decision
        if decision.action == P.ACCEPT:
            self._edit_headers(msg, decision)
        if decision.reply:
            code, xcode, text = decision.reply
            self.setreply(code, xcode, text.replace("%", "%%"))
        failures = "; ".join(f"{e} {d}" for e, d in inspection.verdict.failed)
        for engine, detail in inspection.verdict.failed:
            log.warning("%s: %s scan failed: %s", msg.queue_id or "NOQUEUE", engine, escape(detail))
        log.info("%s", summary(msg.queue_id, decision.action, decision.reason, inspection.verdict, msg.sender,
                               len(msg.recipients), msg.size, (time.monotonic() - msg.started) * 1000,
                               self.conn.client_address, failures))
        self._end_message()
        return _MILTER_ACTION[decision.action]

    def _edit_headers(self, msg: Message, decision: P.Decision) -> None:
        # Remove copies of our verdict headers from the message, highest index first so
        # the remaining indexes (1-based, per header name) stay valid.
        for name, index in reversed(msg.forged):
            self.chgheader(name, index, None)
        for name, value in decision.headers:
            self.addheader(name, " " + fold(name, value))
        if decision.subject_tag:
            old = None
            if msg.subject is not None:
                old = msg.subject.decode("utf-8", "replace").replace("\r\n", "\n")
            new = P.tag_subject(old, decision.subject_tag)
            if new is not None and old is None:
                self.addheader("Subject", " " + new)
            elif new is not None:
                self.chgheader("Subject", 1, " " + new)

    @guarded
    def abort(self):
        self._end_message()
        return Milter.CONTINUE

    @guarded
    def close(self):
        self._end_message()
        return Milter.CONTINUE

    def _end_message(self) -> None:
        msg, self.msg = self.msg, None
        if msg is None:
            return
        self.rt.end()
        try:
            msg.close()
        except Exception:   # releasing a spool must never turn into a reply
            log.exception("%s: error releasing the message spool", msg.queue_id or "NOQUEUE")
