"""`scanmilter selftest`: talk to a running scanmilter as Postfix would, with a clean message,
GTUBE and EICAR from outside, and check each answer. Exit 0 only when every case passes."""
from __future__ import annotations

import base64
import email.utils
import secrets
import time
from dataclasses import dataclass
from typing import Callable

from .miltertalk import Answer, MilterError, Session

# The EICAR test file, kept as base64 of its reversed bytes so that no scanner flags this source.
_EICAR_REVERSED_B64 = ("KkgrSCQhRUxJRi1UU0VULVNVUklWSVROQS1EUkFETkFUUy1SQUNJRSR9NylDQzcpXlAoNDVYWlBc"
                       "NFtQQUAlUCFPNVg=")
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
OUTSIDE_CLIENT = "203.0.113.25"     # TEST-NET-3: an outside host, so the message is inbound


def eicar() -> bytes:
    """The 68-byte EICAR anti-virus test string, built at run time."""
    return base64.b64decode(_EICAR_REVERSED_B64)[::-1]


@dataclass
class Case:
    name: str
    body: bytes
    check: Callable[[Answer], str]      # "" when the answer is right, else what is wrong


def _accepted_clean(a: Answer) -> str:
    if a.action not in ("accept", "continue"):
        return f"expected acceptance, got {a.action} {a.reply}".strip()
    added = dict(a.added)
    if added.get("X-Virus-Status", "").strip() != "clean":
        return f"expected X-Virus-Status: clean, got {added.get('X-Virus-Status')!r}"
    if not added.get("X-Spam-Status", "").strip().startswith("No,"):
        return f"expected X-Spam-Status: No, ..., got {added.get('X-Spam-Status')!r}"
    return ""


def _rejected(word: str) -> Callable[[Answer], str]:
    def check(a: Answer) -> str:
        if a.action == "reply" and a.reply.startswith("5") and word in a.reply.lower():
            return ""
        return f"expected a 5xx reply about {word}, got {a.action} {a.reply}".strip()
    return check


def cases() -> list[Case]:
    return [Case("clean", b"Hello,\r\nthis is scanmilter's self test: an ordinary message.\r\n", _accepted_clean),
            Case("gtube", f"{GTUBE}\r\n".encode(), _rejected("spam")),
            Case("eicar", eicar() + b"\r\n", _rejected("virus"))]


def run(address: str, timeout: float = 60.0, out=print) -> int:
    failures = 0
    run_id = secrets.token_hex(6)    # a Subject of its own, so that no result comes from the scan cache
    for case in cases():
        start = time.monotonic()
        headers = [("From", "selftest@outside.test"), ("To", "postmaster@example.com"),
                   ("Subject", f"scanmilter self test: {case.name} {run_id}"), ("Date", email.utils.formatdate()),
                   ("Message-ID", email.utils.make_msgid(domain="outside.test"))]
        try:
            session = Session(address, timeout)
            try:
                answer = session.message(OUTSIDE_CLIENT, "outside.test", "selftest@outside.test",
                                         ["postmaster@example.com"], headers, case.body,
                                         {"queue_id": f"SELFTEST{case.name.upper()}"})
            finally:
                session.close()
            problem = case.check(answer)
            shown = answer.reply or answer.action + "".join(f"; {n}:{v}" for n, v in answer.added)
        except (MilterError, OSError) as e:
            problem, shown = str(e), ""
        ms = (time.monotonic() - start) * 1000
        if problem:
            failures += 1
            out(f"FAIL {case.name}: {problem} ({ms:.0f} ms)")
        else:
            out(f"PASS {case.name}: {' '.join(shown.split())} ({ms:.0f} ms)")
    return 1 if failures else 0
