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
from .policy import TAG, VERDICT_HEADER_PREFIXES, Outcome, Policy
from .scanners import DECIDED
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


def tag_subject(raw: bytes | None, tag: str) -> str | None:
    """The new Subject for the raw value as received, or None when it already carries the tag
    (never `[SPAM] [SPAM]`): the tag, a space, then the original value, which decodes to the
    same bytes as before. ASCII words (encoded words among them) stay as they are; runs of
    non-ASCII words become encoded words; control characters become spaces; the result is
    folded at its own white space, so unfolding gives back the words and the spaces between them."""
    tag = tag.strip(" ")
    if not tag:
        return None
    value = _CONTROL_BYTES.sub(b" ", _FOLD.sub(b"", raw or b"")).strip(b" \t")
    if value.startswith(tag.encode("ascii")):
        return None
    pieces = re.findall(r"[ \t]+|[^ \t]+", tag)
    if value:
        pieces += [" "] + _encode_words(re.findall(rb"[ \t]+|[^ \t]+", value))
    return _fold_pieces("Subject", pieces)


_FOLD = re.compile(rb"(?:\r\n|\r|\n)(?=[ \t])")            # a line break that folds: unfolding removes it
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_ENCODED_WORD = re.compile(rb"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
_Q_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+/-")


def _encode_words(tokens: list[bytes]) -> list[str]:
    """Words and white-space runs (alternating, a word first and last) -> the same as text,
    each run of non-ASCII words with the white space inside it as encoded words."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        if tokens[i].isascii():
            out.append(tokens[i].decode("ascii"))
            i += 1
            continue
        j = i + 1                       # tokens[i:j]: words with non-ASCII bytes and the space between
        while j + 1 < len(tokens) and not tokens[j + 1].isascii():
            j += 2
        run = b"".join(tokens[i:j])
        # Decoders drop the white space between two encoded words: next to an encoded word of
        # the sender's, the space goes inside ours and a plain separator stands between them.
        if i >= 2 and _ENCODED_WORD.search(tokens[i - 2]):
            out[-1] = " "
            run = tokens[i - 1] + run
        after = j + 1 < len(tokens) and _ENCODED_WORD.search(tokens[j + 1])
        if after:
            run += tokens[j]
            j += 1
        for n, word in enumerate(_q_words(run)):
            out += [" ", word] if n else [word]
        if after:
            out.append(" ")
        i = j
    return out


def _q_words(run: bytes) -> list[str]:
    """RFC 2047 "Q" encoded words of at most 75 characters, never splitting a character."""
    try:
        text, charset = run.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        # Not UTF-8: bytes of an unknown 8-bit charset. ISO-8859-1 gives every byte value a
        # character, so no byte is lost (decoders get the same bytes back); it is also what
        # such Subjects most often are (Latin-1/Windows-1252 clients), so readers show them
        # right in the common case. "unknown-8bit" would keep the bytes as well, but readers
        # need not know it, and Python's own make_header() turns its bytes into U+FFFD.
        text, charset = run.decode("latin-1"), "iso-8859-1"
    room = 75 - len(f"=?{charset}?q??=")
    words, word = [], ""
    for ch in text:
        q = "".join(chr(b) if b in _Q_PLAIN else "_" if b == 32 else f"={b:02X}"
                    for b in ch.encode(charset))
        if word and len(word) + len(q) > room:
            words.append(word)
            word = ""
        word += q
    words.append(word)
    return [f"=?{charset}?q?{w}?=" for w in words]


def _fold_pieces(name: str, pieces: list[str], width: int = FOLD_WIDTH) -> str:
    """Words and white-space runs (alternating, a word first) as folded lines: a line break
    goes only before a white-space run, which then starts the continuation line."""
    lines, line, room = [], pieces[0], width - len(name) - 2
    for space, word in zip(pieces[1::2], pieces[2::2]):
        if len(line) + len(space) + len(word) > room:
            lines.append(line)
            line, room = space + word, width
        else:
            line += space + word
    lines.append(line)
    return "\n".join(lines)


def scan_headers(verdict: Verdict, outcome: Outcome) -> list[tuple[str, str]]:
    """X-Virus-Status / X-Attachment-Status / X-Spam-Flag / X-Spam-Status for the engines that took part."""
    lead = outcome.headers_from
    headers = []
    virus = verdict.engine_state("clamd")
    if virus != "absent":
        if verdict.viruses:
            value = "infected (" + ", ".join(verdict.viruses) + ")"
        elif virus == "scanned":
            value = "clean"
        else:
            value = f"unscanned ({_why(verdict, 'clamd')})"
        headers.append(("X-Virus-Status", value))
    files = attachment_status(verdict, lead)
    if files:
        headers.append(("X-Attachment-Status", files))
    spam = verdict.engine_state(verdict.spam_engine)
    if spam == "scanned" and verdict.score is not None:
        if lead.spam_flag:
            headers.append(("X-Spam-Flag", "YES"))
        level = lead.scope.tag_level
        if level == "spamd":
            level = verdict.spam_required()
        tests = ",".join(verdict.rules) or "none"
        headers.append(("X-Spam-Status", f"{'Yes' if lead.spam_flag else 'No'}, score={verdict.score:.1f} "
                                         f"required={float(level):.1f} tests={tests}"))
    elif spam != "absent":
        headers.append(("X-Spam-Status", f"unscanned ({_why(verdict, verdict.spam_engine)})"))
    return headers


FILE_MARKS_SHOWN = 5     # attachment findings named in X-Attachment-Status; the rest are counted


def attachment_status(verdict: Verdict, lead) -> str:
    """X-Attachment-Status: what the attachment checks found that the policy tags ("encrypted:
    invoice.zip; unchecked: archive_expansion_limit in bomb.zip"), or why they did not run
    ("unchecked (timeout)"); "" when there is nothing to say (nothing found, or nothing asked).
    File names are the sender's: printable ASCII only (policy.file_label)."""
    state = verdict.engine_state("files")
    if state in ("failed", "skipped"):
        why = _why(verdict, "files")
        return "" if why == DECIDED else f"unchecked ({why})"
    marks, named = [], set()
    for h in lead.files:
        kind, name, label = h.kind, h.name, h.label
        if h.action != TAG or (kind, name) in named:       # each rule and problem once, with its first file
            continue
        named.add((kind, name))
        marks.append(f"{name}: {label}" if kind == "rule" else f"{'malformed' if kind == 'malformed' else 'unchecked'}"
                     f": {name}" + ("" if label == "the message" else f" in {label}"))
    if len(marks) > FILE_MARKS_SHOWN:
        marks = marks[:FILE_MARKS_SHOWN] + [f"{len(marks) - FILE_MARKS_SHOWN} more"]
    return "; ".join(marks)


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
        new = tag_subject(subject.value if subject else None, lead.subject_tag)
        if new is not None and subject is None:
            additions.append(Edit("add", "Subject", value=new))
        elif new is not None and ("subject", subject.index) not in removed:
            changes = [c for c in changes if c.name.lower() != "subject" or c.index != subject.index]
            changes.append(Edit("change", subject.name, subject.index, new))
    unique = {(h.name.lower(), h.index): h for h in removals}
    ordered = sorted(unique.values(), key=lambda h: (h.name.lower(), -h.index))
    return changes + [Edit("remove", h.name, h.index) for h in ordered] + additions
