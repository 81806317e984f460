"""Scan results -> facts. No thresholds here: what the facts mean is policy's business."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .scanners import CACHED, CLEAN, ERROR, FOUND, LIMITS, SIZE, SKIPPED, SPAM_ENGINES, ScanResult
from .scanners.spamd import SPAMD_DEFAULT_REQUIRED

# Names that travel into headers, replies and log lines: keep a safe alphabet only,
# so a hostile engine reply can never inject a header line or a terminal escape.
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:/+-]")


# Skip reasons that mean "too big for this engine": its own size limit, or clamd's limits on
# what it unpacks (AlertExceedsMax). Such a message was not scanned whole, so it is oversize.
SIZE_SKIPS = (SIZE, LIMITS)


def safe_name(text: str, limit: int = 100) -> str:
    return _UNSAFE.sub("_", text)[:limit] or "_"


# A file name is the sender's: in an SMTP reply or a header it must be printable ASCII that no
# terminal or mail client shows as anything else. Everything else (controls, bidi overrides,
# look-alike letters, any non-ASCII) is written as a visible escape, so that a right-to-left
# override shows as "\u202e" instead of turning the name around.
_FILE_UNSAFE = re.compile(r"[^\x20-\x7e]|\\")


def _file_escape(m: re.Match) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code <= 0xff else f"\\u{code:04x}" if code <= 0xffff else f"\\U{code:08x}"


def safe_file_name(text: str, limit: int = 100) -> str:
    """`text` (a file name as sent) as bounded printable ASCII: non-ASCII, control characters and
    backslash escaped (\\xNN, \\uNNNN), cut at `limit` characters with "..."."""
    out = _FILE_UNSAFE.sub(_file_escape, text[:limit * 2])
    return (out[:limit - 3] + "...") if len(out) > limit else (out or "_")


@dataclass(frozen=True)
class Verdict:
    viruses: tuple[str, ...] = ()
    score: float | None = None           # None: spam not scored
    spamd_required: float | None = None  # the spam engine's own required score (spamd's or rspamd's)
    rules: tuple[str, ...] = ()
    failed: tuple[tuple[str, str], ...] = ()     # (engine, detail)
    skipped: tuple[tuple[str, str], ...] = ()    # (engine, reason)
    engines: tuple[str, ...] = ()                # engines asked, in order
    oversize: bool = False          # over message_size_limit, or too big for an engine that was asked
    cached: tuple[str, ...] = ()                 # engines whose result came from the scan cache
    spam_engine: str = "spamd"                   # the engine asked for the spam score
    rule_scores: tuple[float, ...] = ()          # each rule's score, when the engine gives them (rspamd)
    spam_action: str = ""                        # the spam engine's own action, when the admin follows it
    files: Any = None                            # the attachment facts (attachments.Report); None: not checked

    def engine_state(self, engine: str) -> str:
        """What became of one engine's scan: scanned (it answered, whatever it found), failed,
        skipped, or absent (not asked at all)."""
        if engine not in self.engines:
            return "absent"
        if any(e == engine for e, _ in self.failed):
            return "failed"
        if any(e == engine for e, _ in self.skipped):
            return "skipped"
        return "scanned"

    def spam_required(self) -> float:
        """The spam engine's own required score, or SpamAssassin's default when it gave none."""
        return self.spamd_required if self.spamd_required is not None else SPAMD_DEFAULT_REQUIRED


def combine(results: list[ScanResult], oversize: bool = False) -> Verdict:
    viruses, rules, failed, skipped, cached = [], [], [], [], []
    score = required = None
    spam_engine, rule_scores, action = "spamd", [], ""
    files = None
    for r in results:
        if r.engine == "files" and r.outcome == CLEAN:
            files = r.report
        if r.engine in SPAM_ENGINES:
            spam_engine = r.engine
        if r.detail == CACHED and r.outcome in (CLEAN, FOUND):
            cached.append(r.engine)
        if r.outcome == ERROR:
            failed.append((r.engine, r.detail))
        elif r.outcome == SKIPPED:
            skipped.append((r.engine, r.detail))
            oversize = oversize or r.detail in SIZE_SKIPS
        if r.outcome == FOUND and r.viruses:
            viruses += [safe_name(v) for v in r.viruses]
        if r.score is not None:
            score, required = r.score, r.required
            rules += [safe_name(x) for x in r.rules]
            rule_scores += r.rule_scores if len(r.rule_scores) == len(r.rules) else []
            action = r.action
    return Verdict(tuple(viruses), score, required, tuple(rules), tuple(failed), tuple(skipped),
                   tuple(r.engine for r in results), oversize, tuple(cached), spam_engine,
                   tuple(rule_scores), action, files)
