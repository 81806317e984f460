"""Facts + policy -> Decision: what to do with a message. Pure: no I/O, no MTA calls.

Order of evaluation (first match wins):
  1. a virus was found            -> virus_action (default reject 550 5.7.1)
  2. score >= reject_level        -> reject 550 5.7.1
  3. an engine failed             -> scan_failure_action (default tempfail 451 4.7.1)
  4. the message is oversize      -> oversize_action (default: accept, tagged unscanned)
  5. otherwise accept; score >= tag_level adds X-Spam-Flag and tags the Subject once.
Every accepted message gets X-Virus-Status and X-Spam-Status for the engines that are on.
"""
from __future__ import annotations

from dataclasses import dataclass

from .verdict import Verdict

ACCEPT, REJECT, TEMPFAIL, DISCARD = "accept", "reject", "tempfail", "discard"

# SMTP replies by kind: (code, enhanced status code)
REPLY_REJECT = ("550", "5.7.1")
REPLY_TEMPFAIL = ("451", "4.7.1")
REPLY_TOO_BIG = ("552", "5.3.4")

# Header names we own. Copies arriving with a message are removed before ours are added.
OWN_HEADER_PREFIXES = ("x-spam-", "x-virus-")


@dataclass(frozen=True)
class Decision:
    action: str                                   # accept | reject | tempfail | discard
    reason: str                                   # virus | spam | scan-error | oversize | ham | tagged
    reply: tuple[str, str, str] | None = None     # code, enhanced code, text
    headers: tuple[tuple[str, str], ...] = ()     # to add, in order
    subject_tag: str = ""                         # prefix the Subject with this (once)


def fmt_score(score: float | None) -> str:
    return "-" if score is None else f"{score:.1f}"


def _tag_level(verdict: Verdict, policy) -> float:
    if policy.tag_level == "spamd":
        return verdict.spamd_required if verdict.spamd_required is not None else 5.0
    return float(policy.tag_level)


def _reply_text(template: str, verdict: Verdict, required: float) -> str:
    return template.format(virus=", ".join(verdict.viruses) or "-", score=fmt_score(verdict.score),
                           required=fmt_score(required))


def _failures(verdict: Verdict, engine: str) -> str:
    return "; ".join(d for e, d in verdict.failed if e == engine)


def scan_headers(verdict: Verdict, tag_level: float) -> list[tuple[str, str]]:
    """X-Virus-Status / X-Spam-* for the engines that took part."""
    headers = []
    virus = verdict.status_of("clamd")
    if virus != "absent":
        if verdict.viruses:
            value = "infected (" + ", ".join(verdict.viruses) + ")"
        elif virus == "clean":
            value = "clean"
        else:
            reason = _failures(verdict, "clamd").partition(":")[0] if virus == "failed" else \
                "; ".join(r for e, r in verdict.skipped if e == "clamd")
            value = f"unscanned ({reason or virus})"
        headers.append(("X-Virus-Status", value))
    spam = verdict.status_of("spamd")
    if spam == "clean" and verdict.score is not None:
        is_spam = verdict.score >= tag_level
        if is_spam:
            headers.append(("X-Spam-Flag", "YES"))
        tests = ",".join(verdict.rules) or "none"
        headers.append(("X-Spam-Status", f"{'Yes' if is_spam else 'No'}, score={verdict.score:.1f} "
                                         f"required={tag_level:.1f} tests={tests}"))
    elif spam != "absent":
        reason = _failures(verdict, "spamd").partition(":")[0] if spam == "failed" else \
            "; ".join(r for e, r in verdict.skipped if e == "spamd")
        headers.append(("X-Spam-Status", f"unscanned ({reason or spam})"))
    return headers


def decide(verdict: Verdict, policy) -> Decision:
    tag_level = _tag_level(verdict, policy)
    headers = tuple(scan_headers(verdict, tag_level))

    if verdict.viruses:
        text = _reply_text(policy.virus_reply, verdict, tag_level)
        if policy.virus_action == REJECT:
            return Decision(REJECT, "virus", (*REPLY_REJECT, text))
        if policy.virus_action == TEMPFAIL:
            return Decision(TEMPFAIL, "virus", (*REPLY_TEMPFAIL, text))
        if policy.virus_action == DISCARD:
            return Decision(DISCARD, "virus")
        return Decision(ACCEPT, "virus", headers=headers)

    if verdict.score is not None and verdict.score >= policy.reject_level:
        return Decision(REJECT, "spam", (*REPLY_REJECT, _reply_text(policy.spam_reply, verdict, tag_level)))

    if verdict.failed and policy.scan_failure_action == TEMPFAIL:
        return Decision(TEMPFAIL, "scan-error",
                        (*REPLY_TEMPFAIL, _reply_text(policy.tempfail_reply, verdict, tag_level)))

    if verdict.oversize:
        if policy.oversize_action == "reject":
            return Decision(REJECT, "oversize", (*REPLY_TOO_BIG, "Message too big to be scanned"))
        return Decision(ACCEPT, "oversize", headers=headers if policy.oversize_action == "tag" else ())

    if verdict.failed:
        return Decision(ACCEPT, "scan-error", headers=headers)

    if verdict.score is not None and verdict.score >= tag_level:
        return Decision(ACCEPT, "tagged", headers=headers, subject_tag=policy.subject_tag)
    return Decision(ACCEPT, "ham", headers=headers)


def tag_subject(subject: str | None, tag: str) -> str | None:
    """The new Subject value, or None when it already carries the tag (never tag twice)."""
    if not tag:
        return None
    if subject is None:
        return tag
    stripped = subject.lstrip(" \t\r\n")
    if stripped.startswith(tag):
        return None
    return f"{tag} {stripped}" if stripped else tag
