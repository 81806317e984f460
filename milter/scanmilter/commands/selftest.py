"""`scanmilter selftest`: talk to a running scanmilter as Postfix would, with a clean message,
GTUBE and EICAR from outside, and check each answer. Exit 0 only when every case passes.

Each case passes when the scanners found what the case holds (clamd: nothing in the clean
message and GTUBE, a virus in EICAR; spamd: GTUBE's rule, and a score below its required level
for the clean message) and the answer is the decision of the policy in force for that verdict,
whatever the policy says: rejected, held, tagged or accepted. The daemon reports its verdict and
decision to a self-test session in one header field (REPORT_HEADER), so that the judgement uses
the policy it runs, including one changed since the configuration file was last read.

The test messages go nowhere: selftest is the daemon's only client in these sessions (no MTA, so
nothing is queued or delivered), and the daemon never writes a self-test message to the quarantine.
"""
from __future__ import annotations

import base64
import email.utils
import json
import secrets
import struct
import time
from dataclasses import dataclass
from typing import Callable

from ..scanners.spamd import GTUBE, SPAMD_DEFAULT_REQUIRED
from .miltertalk import Answer, MilterError, Session

SMFIF_QUARANTINE = 0x20      # the milter action flag of SMFIR_QUARANTINE (Postfix: put on hold)

# The EICAR test file, kept as base64 of its reversed bytes so that no scanner flags this source.
_EICAR_REVERSED_B64 = ("KkgrSCQhRUxJRi1UU0VULVNVUklWSVROQS1EUkFETkFUUy1SQUNJRSR9NylDQzcpXlAoNDVYWlBc"
                       "NFtQQUAlUCFPNVg=")
OUTSIDE_CLIENT = "203.0.113.25"     # TEST-NET-3: an outside host, so the message is inbound

# The mark of a self-test session: a connect macro that Postfix cannot send (its milter macros
# carry only Postfix's own attributes, and no SMTP client can set this name). For a marked
# session the daemon decides as usual, never stores the message in the quarantine, and reports
# its verdict and decision in REPORT_HEADER. Whoever can connect to the milter socket is trusted
# already (it is as private as Postfix's own queue); the mark only keeps a held copy from being
# written for a message that no MTA will ever deliver.
MARK_MACRO = "{scanmilter_selftest}"
MARK_VALUE = "yes"
REPORT_HEADER = "X-Scanmilter-Selftest"
NOT_STORED = "not stored: self test"        # in the report, where a held entry's id would be
# The report's word for an engine that answered (Verdict.engine_state's "scanned"), whatever it
# found: "clean", as daemons and commands of every version write and read it.
REPORT_SCANNED = "clean"


def eicar() -> bytes:
    """The 68-byte EICAR anti-virus test string, built at run time."""
    return base64.b64decode(_EICAR_REVERSED_B64)[::-1]


# ---------------------------------------------------------------- the daemon's side
def report(verdict, outcome, answer: str, held: str) -> str:
    """The REPORT_HEADER value for a self-test session: one line of JSON (ASCII, no controls)."""
    lead = next((d for d in outcome.recipients if d.action == outcome.action), None) or \
        (outcome.recipients[0] if outcome.recipients else None)
    return json.dumps({
        "viruses": list(verdict.viruses), "score": verdict.score, "required": verdict.spamd_required,
        "rules": list(verdict.rules), "clamd": _engine_state(verdict, "clamd"),
        "spamd": _engine_state(verdict, verdict.spam_engine),     # the spam engine, whichever runs
        "engine": verdict.spam_engine,                           # its name, for the messages below
        "failed": [list(f) for f in verdict.failed], "skipped": [list(s) for s in verdict.skipped],
        "decision": outcome.action, "reason": outcome.reason, "rule": lead.rule if lead else "",
        "answer": answer, "held": held}, separators=(",", ":"))


def _engine_state(verdict, engine: str) -> str:
    state = verdict.engine_state(engine)
    return REPORT_SCANNED if state == "scanned" else state


# ---------------------------------------------------------------- what each case must find
@dataclass
class Case:
    name: str
    body: bytes
    facts: Callable[[dict], str]      # "" when the scan found what it must, else what is wrong


def _spam_engine(r: dict) -> str:
    """The spam engine's name as the daemon reported it (spamd from a daemon that names none)."""
    name = r.get("engine")
    return name if name in ("spamd", "rspamd") else "spamd"


def _score(r: dict) -> str:
    return "-" if r["score"] is None else f"{r['score']:.1f}"


def _clean_facts(r: dict) -> str:
    if r["viruses"]:
        return f"clamd found {', '.join(r['viruses'])} in the clean message"
    if r["clamd"] != REPORT_SCANNED:
        return f"clamd did not scan the clean message ({r['clamd']})"
    if r["score"] is None:
        return f"{_spam_engine(r)} gave the clean message no score ({r['spamd']})"
    required = r["required"] if r["required"] is not None else SPAMD_DEFAULT_REQUIRED
    if r["score"] >= required:
        return f"{_spam_engine(r)} scored the clean message {_score(r)}, at or over its required {required:.1f}"
    return ""


def _gtube_facts(r: dict) -> str:
    if "GTUBE" not in r["rules"]:
        return f"{_spam_engine(r)} did not find GTUBE (score {_score(r)}, tests={','.join(r['rules']) or 'none'}; {r['spamd']})"
    return ""


def _eicar_facts(r: dict) -> str:
    return "" if r["viruses"] else f"clamd found no virus in EICAR ({r['clamd']})"


def cases() -> list[Case]:
    return [Case("clean", b"Hello,\r\nthis is scanmilter's self test: an ordinary message.\r\n", _clean_facts),
            Case("gtube", f"{GTUBE}\r\n".encode(), _gtube_facts),
            Case("eicar", eicar() + b"\r\n", _eicar_facts)]


# ---------------------------------------------------------------- judging one answer
def answer_kind(a: Answer) -> str:
    """What Postfix would do with the milter's answer: accept, reject, tempfail or discard."""
    if a.action == "reply":
        return "tempfail" if a.reply.startswith("4") else "reject"
    return {"continue": "accept"}.get(a.action, a.action)


REPORT_KEYS = frozenset({"viruses", "score", "required", "rules", "clamd", "spamd", "failed", "skipped",
                         "decision", "reason", "rule", "answer", "held"})
# written by this version, read with a default: a daemon of an older version leaves them out
REPORT_OPTIONAL_KEYS = frozenset({"engine"})


def parse_report(a: Answer) -> dict | None:
    for name, value in a.added:
        if name.lower() == REPORT_HEADER.lower():
            try:
                r = json.loads(value)
            except ValueError:
                return None
            return r if isinstance(r, dict) and REPORT_KEYS <= r.keys() else None
    return None


def judge(case: Case, a: Answer, hold: str | None = None) -> tuple[str, str]:
    """(problem, what to show): problem is "" when the case passes. hold: the reason of the
    milter's quarantine request (SMFIR_QUARANTINE) with this answer, None when it made none:
    with quarantine_backend = "hold" a held message is put on Postfix's hold queue and accepted."""
    shown = a.reply or a.action + "".join(f"; {n}:{v}" for n, v in a.added if n.lower() != REPORT_HEADER.lower())
    shown = " ".join(shown.split())
    r = parse_report(a)
    if r is None:
        return (f"no {REPORT_HEADER} report with the answer ({shown}): the daemon failed on this message "
                "(see its log), or it runs an older scanmilter than this command (restart it)"), shown
    failed = "; ".join(f"{e} failed: {d}" for e, d in r["failed"])
    if failed:
        return f"{failed} ({shown})", shown
    wrong = case.facts(r)
    if wrong:
        return f"{wrong} ({shown})", shown
    decision, got = r["decision"], answer_kind(a)
    expected = ("reject", "discard") if decision == "quarantine" else (decision,)
    if hold is not None:
        if decision != "quarantine":
            return f"the daemon asked Postfix to hold a message the policy does not hold ({shown})", shown
        expected = ("accept",)          # on Postfix's hold queue: held, then accepted
    if got not in expected or got != r["answer"]:
        return (f"the policy decides {decision} ({r['reason']}: {r['rule']}), but the answer is {shown}"
                + (f" ({r['held'] or 'no quarantine'})" if decision == "quarantine" else "")), shown
    if hold is not None:
        shown += f"; held on Postfix's hold queue (SMFIR_QUARANTINE: {' '.join(hold.split())[:200]})"
    if decision == "quarantine":
        if r["held"] != NOT_STORED:
            return f"the daemon stored the self-test message in the quarantine ({r['held']}); delete it", shown
        what = ", ".join(r["viruses"]) if r["reason"] == "virus" else f"score {_score(r)}"
        shown += f"; quarantine ({r['reason']} {what}) by {r['rule']}, {NOT_STORED}"
    return "", shown


class HoldAwareSession(Session):
    """A Session that also keeps what the milter asked of the MTA beyond its answer: the actions
    it negotiated, and the reason of a quarantine request (Postfix: put the message on hold)."""
    actions = 0
    hold: str | None = None

    def _recv(self) -> tuple[bytes, bytes]:
        cmd, data = super()._recv()
        if cmd == b"O" and len(data) >= 12:
            self.actions = struct.unpack("!I", data[4:8])[0]
        elif cmd == b"q":
            self.hold = data.rstrip(b"\0").decode("utf-8", "replace")
        return cmd, data


def milter_actions(address: str, timeout: float) -> int:
    """The action flags the milter at `address` asks for when an MTA offers all of them."""
    session = HoldAwareSession(address, timeout)
    try:
        session.negotiate()
        return session.actions
    finally:
        session.close()


def check_hold(cfg, out=print) -> int:
    """quarantine_backend = "hold": postqueue and postsuper run against the configured Postfix,
    and the index takes a write (postfix-check's checks of the backend). Failures."""
    from .postfix_check import hold_checks
    findings, passed = hold_checks(cfg, None, {}, True, 10.0)
    for line in passed:
        out(f"PASS {line}")
    for f in findings:
        out(f"{'FAIL' if f.level == 'error' else 'WARN'} hold: {f.text} (fix: {f.fix})")
    return sum(f.level == "error" for f in findings)


def check_members(engines, out=print) -> int:
    """For each engine with several servers (a pool), one line per member: PASS when it answers a
    ping, FAIL with what went wrong. The cases above only show that the pool answered, not that
    every member did. Returns the number of members that failed."""
    failures = 0
    for engine in engines:
        members = getattr(engine, "members", [])
        if len(members) < 2:
            continue
        for member in members:
            start = time.monotonic()
            problem = member.scanner.ping()
            failures += _report(out, f"{engine.name} member {member.name}", problem, "answers", start)
    return failures


def _report(out, what: str, problem: str, passed: str, start: float) -> int:
    """One PASS or FAIL line for a check begun at `start`; 1 when it failed."""
    ms = (time.monotonic() - start) * 1000
    out(f"FAIL {what}: {problem} ({ms:.0f} ms)" if problem else f"PASS {what}: {passed} ({ms:.0f} ms)")
    return int(bool(problem))


def run(address: str, timeout: float = 60.0, out=print, engines=(), cfg=None) -> int:
    """engines: the configured engines, whose pool members are checked one by one as well. cfg:
    the settings, whose quarantine backend is checked as well (the hold queue's commands)."""
    failures = 0
    run_id = secrets.token_hex(6)    # a Subject of its own, so that no result comes from the scan cache
    for case in cases():
        start = time.monotonic()
        headers = [("From", "selftest@outside.test"), ("To", "postmaster@example.com"),
                   ("Subject", f"scanmilter self test: {case.name} {run_id}"), ("Date", email.utils.formatdate()),
                   ("Message-ID", email.utils.make_msgid(domain="outside.test"))]
        try:
            session = HoldAwareSession(address, timeout)
            try:
                answer = session.message(OUTSIDE_CLIENT, "outside.test", "selftest@outside.test",
                                         ["postmaster@example.com"], headers, case.body,
                                         {"queue_id": f"SELFTEST{case.name.upper()}"},
                                         connect_macros={MARK_MACRO: MARK_VALUE})
            finally:
                session.close()
            problem, shown = judge(case, answer, session.hold)
        except (MilterError, OSError) as e:
            problem, shown = str(e), ""
        failures += _report(out, case.name, problem, shown, start)
    failures += check_members(engines, out)
    if cfg is not None and cfg.quarantine_backend == "hold":
        failures += check_hold(cfg, out)
    if cfg is not None and cfg.quarantine_backend == "postgresql":
        failures += check_database(cfg, out)
    return 1 if failures else 0


def check_database(cfg, out=print) -> int:
    """quarantine_backend = "postgresql": the database answers this host with the schema this
    scanmilter needs, and takes a write: a probe entry written, read back and rolled back (nothing
    stays). One PASS or FAIL line each; the number that failed."""
    from .. import quarantine
    start = time.monotonic()
    try:
        store = quarantine.open_store(cfg, command=True)
    except quarantine.StoreError as e:
        return _report(out, "quarantine database", str(e), "", start)
    try:
        database = getattr(store, "pg", store)          # quarantine_fallback = "local" wraps it
        state = database.check_database()
        failures = _report(out, "quarantine database", state["problem"],
                           f"{database.describe()} answers, schema version {state['version']}", start)
        if state["problem"]:
            return failures
        start = time.monotonic()
        try:
            database.check_write()
            problem = ""
        except quarantine.StoreError as e:
            problem = str(e)
        return failures + _report(out, "quarantine database probe entry", problem,
                                  "written, read back and rolled back", start)
    finally:
        store.close()
