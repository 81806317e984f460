"""The only module that speaks milter: callbacks -> Message; Decision -> replies and header edits.

One Handler per SMTP connection (libmilter runs each in its own thread); a new Message on
every MAIL FROM. Callbacks before end of message are no-reply (Postfix does not wait for
them); an exception there is remembered and answered with our 451 at end of message.

SECURITY: trusts Postfix's macros (queue id, client address and name, SASL login, TLS) as
far as Postfix itself does: whoever can connect to the milter socket is as trusted as Postfix.
Everything the client sent (envelope, HELO, headers, body) is untrusted: it is stored byte for
byte and bounded (message_size_limit, header_count_limit, verdict_header_limit), never parsed
beyond header names; what goes back into headers is made safe (headers.py), into log lines
escaped (logs.escape). Any failure is a 451 (the sender retries), never an unscanned accept,
and a message to be held is answered only once its copy is safe in the store.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import threading
import time

import Milter

from . import events
from . import headers as H
from . import nodelay
from . import policy as P
from .commands import selftest
from .logs import escape, log, summary
from .message import Connection, Message, Spool
from .scanners import Origin, Submission
from .metrics import Metrics
from .quarantine import StoreError, held_meta
from .verdict import Verdict

INTERNAL_ERROR_REPLY = ("451", "4.7.1", "Internal error in the content filter, please try again later")
_MILTER_ACTION = {P.ACCEPT: Milter.ACCEPT, P.REJECT: Milter.REJECT,
                  P.TEMPFAIL: Milter.TEMPFAIL, P.DISCARD: Milter.DISCARD}
STORE_FAILED_REPLY = ("451", "4.7.1", "Message cannot be held for review now, please try again later")
# header_limit_action; 552 5.6.0 as sendmail answers headers over its MaxHeadersLength
HEADER_LIMIT_REPLIES = {P.REJECT: ("552", "5.6.0", "Too many header fields"),
                        P.TEMPFAIL: ("451", "4.6.0", "Too many header fields, please try again later")}


# Protocol flags that make Postfix skip a stage or not wait for its answer. Unknown SMTP
# commands stay skipped: no macros go with them.
TCP_CLEARED_PROTOCOL = (Milter.P_NOCONNECT | Milter.P_NOHELO | Milter.P_NOMAIL | Milter.P_NORCPT
                        | Milter.P_NODATA | Milter.P_NOHDRS | Milter.P_NOEOH | Milter.P_NOBODY
                        | Milter.P_NR_CONN | Milter.P_NR_HELO | Milter.P_NR_MAIL | Milter.P_NR_RCPT
                        | Milter.P_NR_DATA | Milter.P_NR_HDR | Milter.P_NR_EOH | Milter.P_NR_BODY)


class Runtime:
    """What every connection shares: settings, policy, the pipeline, in-flight counts."""

    def __init__(self, cfg, policy, pipeline, store=None, metrics=None):
        # Replaced whole on reload; a transaction keeps the policy it started with.
        self.cfg, self.policy, self.pipeline, self.store = cfg, policy, pipeline, store
        self.metrics = metrics if metrics is not None else Metrics()
        self._lock = threading.Lock()
        self.in_flight = 0
        self.tcp = nodelay.is_tcp(cfg.milter_socket)     # milter_socket changes only with a restart
        self.clamd_db_version: int | None = None          # as last read by the monitor
        self.database_age = events.DatabaseAge()          # clamd_database_age_limit, told once per crossing

    def begin(self) -> None:
        with self._lock:
            self.in_flight += 1
        self.metrics.messages_in_flight.inc()

    def end(self) -> None:
        with self._lock:
            self.in_flight -= 1
        self.metrics.messages_in_flight.dec()


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
            self.rt.metrics.callback_exceptions.labels(func.__name__).inc()
            self.failed = True
            if not replies:
                return Milter.CONTINUE
            self.setreply(*INTERNAL_ERROR_REPLY)
            self._end_message()
            return Milter.TEMPFAIL
    return wrapper


def _discarded(outcome: P.Outcome) -> list[str]:
    return [d.recipient for d in outcome.recipients if d.action == P.DISCARD]


@Milter.header_leading_space
class Handler(Milter.Base):
    # With header_leading_space, values arrive and leave with their leading white space,
    # so the spool holds the header lines byte for byte and our edits add the space.

    def __init__(self, runtime: Runtime):
        self.rt = runtime
        self.conn = Connection()
        self.msg: Message | None = None
        self.failed = False
        self.counted = False        # this session is in connections_in_flight
        self.selftest = False       # a `scanmilter selftest` session (see the end of this class)

    def negotiate(self, opts):
        rc = super().negotiate(opts)
        if self.rt.tcp and rc == Milter.CONTINUE:
            # every stage received and answered: see nodelay.py for the stalls this avoids
            opts[1] = self._protocol = opts[1] & ~TCP_CLEARED_PROTOCOL
        return rc

    @Milter.noreply
    @guarded
    def connect(self, hostname, family, hostaddr):
        address = hostaddr[0] if isinstance(hostaddr, tuple) and hostaddr else ""
        self.conn = Connection(address, hostname or "", self.getsymval("{daemon_name}") or "",
                               self.getsymval("j") or "")
        self.selftest = self.getsymval(selftest.MARK_MACRO) == selftest.MARK_VALUE
        if not self.counted:
            self.counted = True
            self.rt.metrics.connections_in_flight.inc()
        return Milter.CONTINUE

    @Milter.noreply
    @guarded
    def hello(self, name):
        # for the Received line spamd sees; a repeated EHLO (after STARTTLS) replaces it
        self.conn.helo = name or ""
        return Milter.CONTINUE

    @Milter.noreply
    @guarded
    def envfrom(self, sender, *params):
        self._end_message()
        self.failed = False
        cfg = self.rt.cfg
        spool = Spool(cfg.spool_memory_limit, cfg.message_size_limit, cfg.spool_directory or None)
        self.msg = Message(sender.strip("<>"), spool, auth_user=self.getsymval("{auth_authen}") or "",
                           policy=self.rt.policy)
        conn = self.conn
        self.msg.origin = Origin(conn.client_address, conn.client_name, conn.helo, self.msg.auth_user,
                                 bool(self.getsymval("{tls_version}")), conn.hostname)
        pipeline = self.rt.pipeline
        if pipeline.cache.enabled and pipeline.engines:
            self.msg.fingerprint = pipeline.cache.fingerprint(self.msg.origin.key())
        names = self.msg.policy.header_names()
        self._keep = lambda name: name in names or name.startswith(P.VERDICT_HEADER_PREFIXES)
        self.msg.header_limit, self.msg.verdict_limit = cfg.header_count_limit, cfg.verdict_header_limit
        self.rt.begin()
        self.conn.messages += 1
        return Milter.CONTINUE

    @Milter.noreply
    @guarded
    def envrcpt(self, rcpt, *params):
        self.msg.add_recipient(rcpt)
        return Milter.CONTINUE

    @Milter.noreply
    @Milter.decode("bytes")
    @guarded
    def header(self, name, value):
        self.msg.add_header(name, value, self._keep)
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
        if msg.over_limit:
            return self._refuse_over_header_limit(msg)
        eom_started = time.monotonic()
        msg.queue_id = qid = self.getsymval("i") or ""
        conn = self.conn
        envelope = P.Envelope(conn.client_address, msg.auth_user, conn.daemon_name, msg.sender,
                              tuple(msg.recipients))
        key = msg.fingerprint.digest() if msg.fingerprint else None
        # the envelope and direction too, for an engine that is told them (rspamd)
        origin = dataclasses.replace(msg.origin, queue_id=qid, sender=msg.sender, recipients=tuple(msg.recipients),
                                     direction=P.direction_of(envelope, msg.policy)[0])
        inspection = self.rt.pipeline.inspect(Submission(msg.spool, origin), envelope, msg.policy, key)
        outcome, verdict = inspection.outcome, inspection.verdict
        action, reply = outcome.action, outcome.reply
        held = ""
        store = self.rt.store
        in_queue = getattr(store, "in_postfix_queue", False)     # quarantine_backend = "hold"
        if outcome.quarantine:
            held = self._hold(msg, outcome, verdict, inspection.verdicts, store)
            if not held:        # the copy is not safe on disk: the sender retries, nothing is lost
                action, reply = P.TEMPFAIL, STORE_FAILED_REPLY
            elif in_queue:
                action, reply = self._hold_in_queue(msg, outcome, verdict, reply)
            elif action == P.QUARANTINE:
                action = P.REJECT if reply else P.DISCARD     # quarantine_action: reject or discard
        if action == P.ACCEPT and not (held and in_queue):
            for address in outcome.remove:
                self.delrcpt(msg.raw_recipients.get(address, f"<{address}>"))
            self._apply(H.edits(verdict, outcome, msg.seen, msg.policy))
        if reply:
            code, xcode, text = reply
            self.setreply(code, xcode, text.replace("%", "%%"))
        for engine, detail in verdict.failed:
            log.warning("%s: %s scan failed: %s", qid or "NOQUEUE", engine, escape(detail))
        logged = P.QUARANTINE if held and (outcome.action == P.QUARANTINE or in_queue) else action
        self._count(msg, outcome, verdict, logged, held, time.monotonic() - eom_started)
        log.info("%s", summary(qid, logged, outcome, verdict, msg.sender, len(msg.recipients), msg.size,
                               (time.monotonic() - msg.started) * 1000, conn.client_address, held))
        if verdict.viruses and not self.selftest:       # queued for the webhooks, never waited for
            events.virus_found(qid, verdict.viruses, logged, held, outcome.direction, msg.sender, msg.recipients,
                               next((h.text() for h in msg.seen if h.name.lower() == "subject"), ""),
                               conn.client_address)
        if self.selftest:
            self._selftest_report(verdict, outcome, action, held)
        self._end_message()
        return _MILTER_ACTION[action]

    def _count(self, msg: Message, outcome: P.Outcome, verdict, action: str, held: str, seconds: float) -> None:
        m = self.rt.metrics
        m.messages.labels(outcome.direction, action).inc()
        m.reasons.labels(outcome.reason).inc()
        for d in outcome.recipients:
            if action == P.ACCEPT and d.recipient in outcome.remove:
                m.recipients.labels(P.QUARANTINE if held and d.recipient in outcome.quarantine else d.action).inc()
            else:
                m.recipients.labels(action).inc()
        if verdict.score is not None:
            m.spam_score.labels(outcome.direction).observe(verdict.score)
        m.message_size.observe(msg.size)
        m.decision_seconds.observe(seconds)

    def _hold(self, msg: Message, outcome: P.Outcome, verdict, verdicts=None, store=None) -> str:
        """Write the message to the quarantine before answering Postfix; the entry id, or "".
        On Postfix's hold queue (quarantine_backend = "hold"): record the verdict by queue id."""
        qid = msg.queue_id or "NOQUEUE"
        in_queue = getattr(store, "in_postfix_queue", False)
        if store is None or msg.spool.oversize and not in_queue:
            # Never hold part of a message, and never pretend to hold without a store.
            log.error("%s: cannot quarantine %s: tempfail", qid,
                      "an oversize message" if store else "without quarantine_directory")
            return ""
        if in_queue and not self._actions & Milter.QUARANTINE:
            log.error("%s: cannot put the message on hold: the MTA did not grant the milter quarantine action: "
                      "tempfail", qid)
            return ""
        if self.selftest:
            if in_queue:            # the index must take a write, as it would for real mail
                try:
                    store.probe()
                except Exception as e:
                    log.error("%s: self test: the hold index cannot be written: %s: tempfail", qid, escape(str(e)))
                    return ""
            return self._selftest_not_stored(qid, outcome)
        lead = next(d for d in outcome.recipients if d.recipient in outcome.quarantine)
        verdict = (verdicts or {}).get(lead.recipient, verdict)     # per-user spamd: the held recipient's score
        subject = next((h.text() for h in msg.seen if h.name.lower() == "subject"), "")
        # Postfix holds the whole message: every recipient not discarded stays on it (docs/hold-queue.md)
        recipients = [r for r in msg.recipients if r not in _discarded(outcome)] if in_queue else outcome.quarantine
        meta = held_meta(queue_id=msg.queue_id, sender=msg.sender, recipients=list(recipients),
                         subject=subject, all_recipients=list(msg.recipients),
                         client_address=self.conn.client_address, client_name=self.conn.client_name,
                         auth_user=msg.auth_user, direction=outcome.direction, reason=lead.reason,
                         viruses=list(verdict.viruses), score=verdict.score, rules=list(verdict.rules),
                         rule=lead.rule)
        index_errors: list[Exception] = []
        try:
            with msg.spool.reader() as reader:
                entry = store.put(reader, meta, index_failed=index_errors.append)
        except Exception as e:     # StoreError, or anything else: never answer before the copy is safe
            # the store's own failures (a database down) are one line each; anything else is a bug,
            # whose traceback must show where it is
            log.error("%s: quarantine store failed: %s: tempfail", qid, escape(str(e)),
                      exc_info=not isinstance(e, StoreError))
            self.rt.metrics.quarantine_failures.inc()
            return ""
        self.rt.metrics.quarantine_stored.labels(lead.reason).inc()
        events.quarantined(meta, entry, self.rt.cfg.quarantine_backend, msg.size)     # queued, never waited for
        log.info("%s: quarantined as %s for %s", qid, f"{entry} on Postfix's hold queue" if in_queue else entry,
                 ", ".join(f"<{escape(r)}>" for r in recipients))
        if index_errors:       # held safely, but not listed until the index is rebuilt
            self.rt.metrics.quarantine_index_failures.inc()
            log.warning("%s: quarantine index not updated for %s: %s; it is rebuilt at the next check", qid, entry,
                        escape(str(index_errors[0])))
        return entry

    def _hold_in_queue(self, msg: Message, outcome: P.Outcome, verdict, reply) -> tuple[str, None]:
        """Put the message on Postfix's hold queue (SMFIR_QUARANTINE) and accept it. Postfix holds
        a whole message: discarding recipients are removed, every other recipient stays on it
        and gets it when it is released. A release cannot edit the message any more, so the
        verdict headers it arrived with go now (as release.py strips them from a file store's
        copy), and an accepting recipient's header edits (mixed recipients) apply as they would
        have. quarantine_action = reject cannot apply: a rejected message is not queued."""
        for recipient in _discarded(outcome):
            self.delrcpt(msg.raw_recipients.get(recipient, f"<{recipient}>"))
        edits = H.edits(verdict, outcome, msg.seen, msg.policy) if outcome.headers_from else []
        gone = {(e.name.lower(), e.index) for e in edits if e.kind == "remove"}
        gone |= {(h.name.lower(), h.index) for h in msg.seen if h.name.lower().startswith(P.VERDICT_HEADER_PREFIXES)}
        removals = sorted(gone, key=lambda k: (k[0], -k[1]))       # highest index first: the others keep theirs
        names = {h.name.lower(): h.name for h in msg.seen}
        self._apply([e for e in edits if e.kind == "change" and (e.name.lower(), e.index) not in gone]
                    + [H.Edit("remove", names.get(n, n), i) for n, i in removals]
                    + [e for e in edits if e.kind == "add"])
        lead = next(d for d in outcome.recipients if d.recipient in outcome.quarantine)
        # Postfix logs "milter triggers HOLD action" and drops the text; it goes in for other MTAs
        self.quarantine(re.sub(r"[^\x20-\x7e]", "?", f"scanmilter: {lead.reason}: {lead.rule}")[:200])
        if reply:
            log.warning("%s: quarantine_action = reject cannot apply on Postfix's hold queue: held and accepted",
                        msg.queue_id or "NOQUEUE")
        return P.ACCEPT, None

    def _refuse_over_header_limit(self, msg: Message) -> int:
        """Refuse a message past header_count_limit or verdict_header_limit, unscanned and with no
        header edit: every edit makes Postfix's cleanup go through all the header fields again."""
        msg.queue_id = qid = self.getsymval("i") or ""
        cfg, conn = self.rt.cfg, self.conn
        action = P.REJECT if cfg.header_limit_action == "reject" else P.TEMPFAIL
        reply = HEADER_LIMIT_REPLIES[action]
        self.setreply(*reply)
        envelope = P.Envelope(conn.client_address, msg.auth_user, conn.daemon_name, msg.sender,
                              tuple(msg.recipients))
        direction, _ = P.direction_of(envelope, msg.policy)
        decisions = tuple(P.RecipientDecision(r, action, "headers", msg.over_limit, msg.policy.scope(direction, r),
                                              reply) for r in msg.recipients)
        outcome, verdict = P.Outcome(action, "headers", direction, reply, decisions), Verdict()
        log.warning("%s: %d header fields, over %s (%d): %s, unscanned", qid or "NOQUEUE", msg.header_count,
                    msg.over_limit, getattr(cfg, msg.over_limit), action)
        self._count(msg, outcome, verdict, action, "", 0.0)
        log.info("%s", summary(qid, action, outcome, verdict, msg.sender, len(msg.recipients), msg.size,
                               (time.monotonic() - msg.started) * 1000, conn.client_address))
        self._end_message()
        return _MILTER_ACTION[action]

    def _apply(self, edits: list[H.Edit]) -> None:
        # With header_leading_space negotiated, values we send carry their own leading space.
        for e in edits:
            if e.kind == "add":
                self.addheader(e.name, " " + e.value)
            elif e.kind == "change":
                self.chgheader(e.name, e.index, " " + e.value)
            else:
                self.chgheader(e.name, e.index, None)

    # ---- `scanmilter selftest` sessions, marked by selftest.MARK_MACRO, which Postfix never sends.
    # They are decided like any other message, but their test messages are never stored in the
    # quarantine (no MTA delivers them either), and the verdict and decision go back to selftest.

    def _selftest_not_stored(self, qid: str, outcome: P.Outcome) -> str:
        log.info("%s: self test: would quarantine for %s; not stored", qid,
                 ", ".join(f"<{escape(r)}>" for r in outcome.quarantine))
        return selftest.NOT_STORED

    def _selftest_report(self, verdict, outcome: P.Outcome, action: str, held: str) -> None:
        self.addheader(selftest.REPORT_HEADER, " " + selftest.report(verdict, outcome, action, held))

    @guarded
    def abort(self):
        self._end_message()
        return Milter.CONTINUE

    @guarded
    def close(self):
        self._end_message()
        if self.counted:
            self.counted = False
            self.rt.metrics.connections_in_flight.dec()
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
