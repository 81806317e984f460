"""Header edits for an accepted message: strip forged verdicts, apply rewrite rules, add ours,
tag the Subject. Pure: the handler turns the edits into milter calls.

Header values handed to Postfix are always safe: no CR/LF or other control characters,
non-ASCII text as RFC 2047 encoded words, lines folded to FOLD_WIDTH.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from email.header import Header

from .message import Seen
from .policy import VERDICT_HEADER_PREFIXES, Outcome, Policy
from .verdict import Verdict

FOLD_WIDTH = 78     # RFC 5322's recommended line length


@dataclass(frozen=True)
class Edit:
    kind: str           # add | change | remove
    name: str
    index: int = 0      # 1-based among headers of that name (change, remove)
    value: str = ""     # without the leading space


_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]+")


def fold(name: str, value: str, width: int = FOLD_WIDTH) -> str:
    """Fold at spaces, and inside long lists after commas; continuation lines start with a tab."""
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


def safe_value(name: str, value: str) -> str:
    """A header value that cannot inject a line: controls become spaces, non-ASCII becomes
    encoded words, and the result is folded."""
    value = " ".join(_CONTROLS.sub(" ", value).split())
    if value.isascii():
        return fold(name, value)
    encoded = Header(value, "utf-8", maxlinelen=FOLD_WIDTH, header_name=name).encode(linesep="\n")
    return encoded.replace("\n ", "\n\t")


def tag_subject(subject: str | None, tag: str) -> str | None:
    """The new Subject, or None when it already carries the tag (never `[SPAM] [SPAM]`).
    Encoded words stay intact: the tag goes in front, separated by a space."""
    if not tag:
        return None
    if subject is None:
        return tag
    stripped = subject.lstrip(" \t\r\n")
    if stripped.startswith(tag):
        return None
    return f"{tag} {stripped}" if stripped else tag


def scan_headers(verdict: Verdict, outcome: Outcome) -> list[tuple[str, str]]:
    """X-Virus-Status / X-Spam-Flag / X-Spam-Status for the engines that took part."""
    lead = outcome.headers_from
    headers = []
    virus = verdict.status_of("clamd")
    if virus != "absent":
        if verdict.viruses:
            value = "infected (" + ", ".join(verdict.viruses) + ")"
        elif virus == "clean":
            value = "clean"
        else:
            value = f"unscanned ({_why(verdict, 'clamd')})"
        headers.append(("X-Virus-Status", value))
    spam = verdict.status_of("spamd")
    if spam == "clean" and verdict.score is not None:
        if lead.spam_flag:
            headers.append(("X-Spam-Flag", "YES"))
        level = lead.scope.tag_level
        if level == "spamd":
            level = verdict.spamd_required if verdict.spamd_required is not None else 5.0
        tests = ",".join(verdict.rules) or "none"
        headers.append(("X-Spam-Status", f"{'Yes' if lead.spam_flag else 'No'}, score={verdict.score:.1f} "
                                         f"required={float(level):.1f} tests={tests}"))
    elif spam != "absent":
        headers.append(("X-Spam-Status", f"unscanned ({_why(verdict, 'spamd')})"))
    return headers


def _why(verdict: Verdict, engine: str) -> str:
    for e, detail in verdict.failed:
        if e == engine:
            return detail.partition(":")[0]
    for e, reason in verdict.skipped:
        if e == engine:
            return reason
    return "unknown"


def edits(verdict: Verdict, outcome: Outcome, seen: list[Seen], policy: Policy) -> list[Edit]:
    """Every header edit for an accepted message, in the order they must be applied:
    changes, then removals (highest index first, so the others keep their index), then additions."""
    lead = outcome.headers_from
    scope = lead.scope
    changes, removals, additions = [], [], []
    if scope.strip_verdict_headers:
        removals += [h for h in seen if h.name.lower().startswith(VERDICT_HEADER_PREFIXES)]
    for rule in policy.rewrites:
        if rule.direction not in ("any", outcome.direction):
            continue
        if rule.action == "add":
            additions.append(Edit("add", rule.name, value=safe_value(rule.name, rule.value)))
            continue
        for h in seen:
            if h.name.lower() != rule.name.lower() or (rule.match and not rule.match.search(h.text())):
                continue
            if rule.action == "remove":
                removals.append(h)
            else:
                changes.append(Edit("change", h.name, h.index, safe_value(h.name, rule.value)))
    removed = {(h.name.lower(), h.index) for h in removals}
    changes = [c for c in changes if (c.name.lower(), c.index) not in removed]
    skip = lead.reason == "oversize" and scope.oversize_action == "skip"    # oversize: no scan headers
    if scope.add_scan_headers and not skip:
        additions += [Edit("add", name, value=fold(name, value)) for name, value in scan_headers(verdict, outcome)]
    if lead.subject_tag:
        subject = next((h for h in seen if h.name.lower() == "subject"), None)
        old = subject.value.decode("utf-8", "replace").replace("\r\n", "\n") if subject else None
        new = tag_subject(old, lead.subject_tag)
        if new is not None and subject is None:
            additions.append(Edit("add", "Subject", value=new))
        elif new is not None and ("subject", subject.index) not in removed:
            changes = [c for c in changes if c.name.lower() != "subject" or c.index != subject.index]
            changes.append(Edit("change", subject.name, subject.index, new))
    unique = {(h.name.lower(), h.index): h for h in removals}
    ordered = sorted(unique.values(), key=lambda h: (h.name.lower(), -h.index))
    return changes + [Edit("remove", h.name, h.index) for h in ordered] + additions
