"""`scanmilter selftest` without a stack: how the daemon treats a marked session, and how
selftest judges answers. The real thing, against real Postfix, clamd and spamd, is in
test_e2e_observe.py."""
import json

import Milter
import pytest

from fakes import CLEAN, HAM, Engine, feed, handler
from scanmilter.commands import selftest
from scanmilter.handler import STORE_FAILED_REPLY
from scanmilter.commands.miltertalk import Answer
from scanmilter.scanners import ScanResult

EICAR = ScanResult("clamd", "found", viruses=("Eicar-Test-Signature",))
GTUBE = ScanResult("spamd", "found", score=1002.3, required=5.0, rules=("GTUBE", "KHOP_HELO_FCRDNS"))


class Store:
    def __init__(self):
        self.held = []

    def put(self, reader, meta, index_failed=None):
        self.held.append(meta)
        return "0123456789abcdef01234567"


def session(*engines, marked=True, store=True, **inbound):
    h = handler(*engines, **inbound)
    h.rt.store = Store() if store else None
    if marked:
        h._ctx.macros[selftest.MARK_MACRO] = selftest.MARK_VALUE
    return h


def report_of(h) -> dict:
    [value] = [c[2] for c in h._ctx.calls if c[:2] == ("add", selftest.REPORT_HEADER)]
    assert value.startswith(" ") and "\n" not in value and value.isascii()
    return json.loads(value)


def test_a_marked_session_is_decided_as_usual_but_never_stored():
    h = session(Engine("spamd", HAM), Engine("clamd", EICAR), virus_action="quarantine")
    assert feed(h, [("Subject", b" test")]) == Milter.DISCARD
    assert h.rt.store.held == []
    r = report_of(h)
    assert (r["decision"], r["answer"], r["reason"], r["held"]) == ("quarantine", "discard", "virus",
                                                                    selftest.NOT_STORED)
    assert r["viruses"] == ["Eicar-Test-Signature"] and r["rule"] == 'virus_action = "quarantine" from [inbound]'


def test_an_unmarked_session_with_the_same_message_is_stored_and_gets_no_report():
    h = session(Engine("spamd", HAM), Engine("clamd", EICAR), marked=False, virus_action="quarantine")
    assert feed(h, [("Subject", b" test")]) == Milter.DISCARD
    assert len(h.rt.store.held) == 1
    assert not [c for c in h._ctx.calls if c[1] == selftest.REPORT_HEADER]
    h = session(Engine("spamd", HAM), Engine("clamd", EICAR), marked=False, virus_action="quarantine")
    h._ctx.macros[selftest.MARK_MACRO] = "no"           # only the exact mark counts
    feed(h, [("Subject", b" test")])
    assert len(h.rt.store.held) == 1


def test_a_marked_session_without_a_quarantine_gets_what_real_mail_would():
    h = session(Engine("spamd", HAM), Engine("clamd", EICAR), store=False, virus_action="quarantine")
    assert feed(h, [("Subject", b" test")]) == Milter.TEMPFAIL
    assert h._ctx.reply == STORE_FAILED_REPLY
    r = report_of(h)
    assert (r["decision"], r["answer"], r["held"]) == ("quarantine", "tempfail", "")


def test_an_accepted_marked_message_reports_its_scores():
    h = session(Engine("spamd", HAM), Engine("clamd", CLEAN))
    assert feed(h, [("Subject", b" test")]) == Milter.ACCEPT
    r = report_of(h)
    assert (r["score"], r["required"], r["clamd"], r["spamd"], r["failed"]) == (0.1, 5.0, "clean", "clean", [])


# ---------------------------------------------------------------- judging answers
def answer(action, reply="", added=(), **report):
    base = {"viruses": [], "score": 1.0, "required": 5.0, "rules": [], "clamd": "clean", "spamd": "clean",
            "failed": [], "skipped": [], "decision": "accept", "reason": "ham", "rule": "r", "answer": "accept",
            "held": ""}
    return Answer(action, reply, list(added) + [(selftest.REPORT_HEADER, json.dumps(base | report))])


CASES = {c.name: c for c in selftest.cases()}


@pytest.mark.parametrize("case, a, shown", [
    ("clean", answer("accept", added=[("X-Virus-Status", " clean")]), "accept; X-Virus-Status: clean"),
    ("gtube", answer("reply", "550 5.7.1 spam", rules=["GTUBE"], score=1000.0, decision="reject", reason="spam",
                     answer="reject"), "550 5.7.1 spam"),
    ("gtube", answer("discard", rules=["GTUBE"], score=1000.0, decision="quarantine", reason="spam",
                     rule="quarantine_level = 8.0 from [inbound]", answer="discard", held=selftest.NOT_STORED),
     "discard; quarantine (spam score 1000.0) by quarantine_level = 8.0 from [inbound], not stored: self test"),
    ("eicar", answer("reply", "550 5.7.1 held", viruses=["Eicar"], decision="quarantine", reason="virus",
                     rule="V", answer="reject", held=selftest.NOT_STORED),
     "550 5.7.1 held; quarantine (virus Eicar) by V, not stored: self test"),
    # a policy that only tags viruses: accepted, and that is what it says
    ("eicar", answer("accept", viruses=["Eicar"], reason="virus"), "accept"),
])
def test_answers_that_follow_the_policy_pass(case, a, shown):
    assert selftest.judge(CASES[case], a) == ("", shown)


@pytest.mark.parametrize("case, a, problem", [
    ("clean", Answer("accept"), "no X-Scanmilter-Selftest report"),
    ("clean", answer("reply", "451 4.7.1 later", failed=[["clamd", "refused: no"]], decision="tempfail",
                     answer="tempfail"), "clamd failed: refused: no"),
    ("clean", answer("accept", viruses=["X"]), "clamd found X in the clean message"),
    ("clean", answer("accept", clamd="skipped"), "clamd did not scan"),
    ("clean", answer("accept", score=5.0), "at or over its required 5.0"),
    ("gtube", answer("accept", score=3.0), "spamd did not find GTUBE"),
    ("gtube", answer("accept", score=3.0, engine="rspamd"), "rspamd did not find GTUBE"),
    ("clean", answer("accept", score=None, engine="rspamd"), "rspamd gave the clean message no score"),
    ("eicar", answer("accept"), "clamd found no virus"),
    # the answer contradicts the decision
    ("eicar", answer("accept", viruses=["E"], decision="reject", reason="virus", answer="reject"),
     "the policy decides reject"),
    ("eicar", answer("reply", "451 4.7.1 cannot hold", viruses=["E"], decision="quarantine", reason="virus",
                     answer="tempfail"), "the policy decides quarantine"),
    ("eicar", answer("discard", viruses=["E"], decision="quarantine", reason="virus", answer="discard",
                     held="0123456789abcdef01234567"), "stored the self-test message"),
])
def test_answers_that_do_not_follow_the_policy_fail(case, a, problem):
    assert problem in selftest.judge(CASES[case], a)[0]


def test_the_client_marks_its_session():
    sent = []

    class Recorder(selftest.Session):
        def __init__(self):
            self.protocol = 0

        def _send(self, cmd, data=b""):
            sent.append((cmd, data))
            if cmd == b"E":
                raise OSError("stop here")

        def negotiate(self):
            pass

        def _answer(self, stage, final_only=True):
            return None

    with pytest.raises(OSError):
        Recorder().message("203.0.113.25", "h", "a@b", ["c@d"], [("Subject", "s")], b"x",
                           connect_macros={selftest.MARK_MACRO: selftest.MARK_VALUE})
    [connect] = [d for c, d in sent if c == b"D" and d[:1] == b"C"]
    assert b"{scanmilter_selftest}\0yes\0" in connect


def test_the_report_names_every_key_selftest_reads():
    h = session(Engine("spamd", HAM), Engine("clamd", CLEAN))
    feed(h, [("Subject", b" test")])
    assert set(report_of(h)) == selftest.REPORT_KEYS | selftest.REPORT_OPTIONAL_KEYS
    assert selftest.parse_report(Answer("accept", added=[(selftest.REPORT_HEADER, '{"viruses": []}')])) is None
