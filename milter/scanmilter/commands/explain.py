"""`scanmilter explain`: run one message file through the real pipeline and show the decision path."""
from __future__ import annotations

import re

from .. import headers as H
from .. import policy as P
from .. import sharedlists
from ..logs import escape
from ..message import Message, Spool
from ..pipeline import Pipeline, scan_pool
from ..scanners import CLEAN, FOUND, SPAM_ENGINES, Origin, ScanResult, Submission
from ..scanners.spamd import SPAMD_DEFAULT_REQUIRED
from ..verdict import combine

MEMORY_LIMIT = 1 << 20      # bytes of the message held in memory; the rest goes to a temporary file


def read_message(data: bytes, keep, size_limit: int) -> Message:
    """A Message as the handler would have built it from Postfix's callbacks, keeping at most
    `size_limit` bytes (message_size_limit): past it the message is oversize, as in the daemon."""
    data = re.sub(rb"\r?\n", b"\r\n", data)
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep and not re.match(rb"[!-9;-~]+:", head):
        head, body = b"", data        # no header section at all
    msg = Message("", Spool(MEMORY_LIMIT, size_limit))
    for field in re.split(rb"\r\n(?![ \t])", head) if head else []:
        name, colon, value = field.partition(b":")
        if colon:
            msg.add_header(name.decode("ascii", "replace"), value, keep)
    msg.end_headers()
    msg.add_body(body)
    return msg


FILES_SHOWN = 50        # attachment facts listed; the rest are counted


def _said(r: ScanResult) -> str:
    """What an engine's result says: the viruses found, the files checked, or the spam score and rules."""
    if r.viruses or r.engine == "clamd":
        return ", ".join(r.viruses) or "no virus"
    if r.engine == "files":
        return f"{len(r.report.files)} files" if r.report is not None else "no facts"
    return (f"score {P.fmt_score(r.score)} ({r.engine} requires {P.fmt_score(r.required)}), "
            f"tests={','.join(r.rules) or 'none'}")


def _files(report) -> list[str]:
    """The attachment facts, one line per file (an archive's members after it, indented), then
    the problems of the message. Names as sent, escaped (bidi controls show as \\u202e)."""
    out = [f"files: {len(report.files)} in {report.parts} MIME parts, {report.seconds * 1000:.0f} ms"
           + ("" if report.complete else ", stopped early")]
    for f in report.files[:FILES_SHOWN]:
        names = " / ".join(f'"{escape(n.sent, 120)}"' + (f" ({', '.join(n.tricks)})" if n.tricks else "")
                           for n in f.names) or "(no name)"
        facts = [f"declared {escape(f.declared_type, 80)}" if f.declared_type else "",
                 f"real {f.detected_type}" if f.detected_type else "", f"{f.size} bytes",
                 f"{f.archive_format}, {f.members} members" if f.archive_format else "",
                 "macros" if f.macros else "", "encrypted" if f.encrypted else ""]
        facts += [escape(str(p), 160) for p in f.problems]
        out.append(f"  {'  ' * f.depth}{f.part}: {names}: {'; '.join(x for x in facts if x)}")
    if len(report.files) > FILES_SHOWN:
        out.append(f"  ... {len(report.files) - FILES_SHOWN} more")
    out += [f"  message: {escape(str(p), 200)}" for p in report.problems]
    return out


def explain(data: bytes, envelope: P.Envelope, policy: P.Policy, engines: list, size_limit: int,
            score: float | None = None, viruses: tuple[str, ...] = ()) -> str:
    names = policy.header_names()
    msg = read_message(data, lambda n: n in names or n.startswith(P.VERDICT_HEADER_PREFIXES), size_limit)
    out = [f"message: {len(data)} bytes, {msg.header_count} header lines, from <{envelope.sender}>, "
           f"to {', '.join(f'<{r}>' for r in envelope.recipients)}"]
    direction, why = P.direction_of(envelope, policy)
    out.append(f"direction: {direction} ({why})")
    spam_engine = next((e.name for e in engines if e.name in SPAM_ENGINES), "spamd")
    needed = P.checks_needed(envelope, policy, spam_engine)
    if msg.spool.oversize:
        out.append(f"scan: none, the message is over message_size_limit ({size_limit} bytes)"
                   + (" (--score and --virus ignored)" if score is not None or viruses else ""))
    if (score is not None or viruses) and not msg.spool.oversize:
        results = [ScanResult(spam_engine, CLEAN, score=score if score is not None else 0.0,
                              required=SPAMD_DEFAULT_REQUIRED)]
        results.append(ScanResult("clamd", FOUND, viruses=viruses) if viruses else ScanResult("clamd", CLEAN))
        results = [r for r in results if r.engine in needed]
        # the attachment checks need no server: they run here as in the daemon
        results += [e.scan(Submission(msg.spool, Origin(envelope.client_address))) for e in engines
                    if e.name == "files" and e.name in needed]
        out.append("scan: given on the command line (no scanner asked)")
    else:
        with scan_pool(len(engines)) as pool:
            # spamd judges the client too: give it the client the envelope names
            origin = Origin(envelope.client_address, auth_user=envelope.auth_user)
            results = Pipeline(engines, pool).scan(Submission(msg.spool, origin), needed)
    for r in results:
        out.append(f"  {r.engine}: {r.outcome}{' ' + r.detail if r.detail else ''}; {_said(r)}; "
                   f"{r.seconds * 1000:.0f} ms")
    skipped = sorted(({"clamd", spam_engine} | {e.name for e in engines if e.name == "files"}) - needed)
    if skipped:
        out.append(f"  not asked: {', '.join(skipped)} (allow lists)")
    verdict = combine(results, oversize=msg.spool.oversize)
    if verdict.files is not None:
        out += _files(verdict.files)
    outcome = P.decide(verdict, envelope, policy)
    for d in outcome.recipients:
        # [files] rule actions are named in the steps that use them; an override of one shows here
        sources = sorted({o for k, o in d.scope.origin.items() if not k.startswith(P.FILE_PREFIX)
                          or o != f"[{outcome.direction}.files]"})
        out.append(f"recipient <{d.recipient}>: settings from {', '.join(sources)}")
        # every matching list entry and overridden setting, with its file line or database row
        out += [f"  source: {line}" for line in
                sharedlists.sources(policy, envelope.client_address, envelope.sender, d.recipient, outcome.direction)]
        out += [f"  {step}" for step in d.steps]
    out.append(f"message: {outcome.action}" + (f" ({outcome.note})" if outcome.note else ""))
    for r in outcome.remove:
        out.append(f"  delrcpt <{r}>")
    for r in outcome.quarantine:
        out.append(f"  quarantine copy for <{r}>")
    if outcome.action == P.ACCEPT:
        out.append("header edits:")
        edits = H.edits(verdict, outcome, msg.seen, policy)
        for e in edits:
            value = e.value.replace("\n", "\n      ")
            out.append({"add": f"  + {e.name}: {value}", "change": f"  ~ {e.name}[{e.index}]: {value}",
                        "remove": f"  - {e.name}[{e.index}]"}[e.kind])
        if not edits:
            out.append("  (none)")
    reply = outcome.reply
    out.append("SMTP reply: " + (" ".join(reply) if reply else {
        P.ACCEPT: "250 (Postfix's own, the message is queued)",
        P.DISCARD: "250 (Postfix's own; the message is discarded)",
        P.QUARANTINE: "250 (Postfix's own; the message is held)"}.get(outcome.action, outcome.action)))
    msg.close()
    return "\n".join(out)
