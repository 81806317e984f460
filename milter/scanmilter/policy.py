"""Facts + policy -> what to do with a message, recipient by recipient. Pure: no I/O, no MTA calls.

For each recipient (first match wins; the README in policies/ has a worked example):
  1. block lists (client, sender, recipient)          -> reject, block_reply
  2. a virus found (not for allow-listed mail when allow_skips_virus_scan)
                                                      -> its [virus_classes] action, else virus_action
  2b. a [files] rule matches an attachment (same exemption as the virus scan)
                                                      -> the rule's action in [DIRECTION.files]
  3. spam checks, unless the client, sender or recipient is allow-listed:
     score >= reject_level                            -> reject, spam_reply
     score >= quarantine_level                        -> quarantine
  4. a scanner that mattered failed                   -> scan_failure_action (tempfail 451 4.7.1)
  4b. the attachment checks met a problem: malformed MIME, a limit, an unreadable archive
                                                      -> malformed_action, limit_action, unreadable_action
  5. the message is oversize (over message_size_limit, or not scanned whole by an engine for
     its size or its limits)                          -> oversize_action
  6. otherwise accept; subject_tag_level and tag_level decide the Subject tag and X-Spam-Flag.
Settings come from the most specific place: [DIR.recipients."a@b"], then [DIR.domains."b"], then [DIR].
Then the recipients' decisions become one outcome for the message (see `combine_recipients`).
"""
from __future__ import annotations

import fnmatch
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from .scanners import SPAM_ENGINES
from .verdict import Verdict, safe_file_name, safe_name

ACCEPT, REJECT, TEMPFAIL, DISCARD, QUARANTINE = "accept", "reject", "tempfail", "discard", "quarantine"
TAG = "tag"       # virus action: accept, marked X-Virus-Status: infected
INBOUND, OUTBOUND = "inbound", "outbound"

# SMTP replies by kind: (code, enhanced status code)
REPLY_REJECT = ("550", "5.7.1")
REPLY_TEMPFAIL = ("451", "4.7.1")
REPLY_TOO_BIG = ("552", "5.3.4")
REPLY_BANNED = ("554", "5.7.1")
# malformed MIME is a media error (RFC 3463 X.6.0); a check that could not finish is policy (X.7.1)
REPLY_MALFORMED = {REJECT: ("554", "5.6.0"), TEMPFAIL: ("451", "4.6.0")}
REPLY_UNCHECKED = {REJECT: ("554", "5.7.1"), TEMPFAIL: ("451", "4.7.1")}

# The attachment checks' reasons: a [files] rule matched (banned), a check stopped at a limit or
# could not read an archive (unchecked), the MIME structure is broken (malformed).
BANNED, UNCHECKED, MALFORMED = "banned", "unchecked", "malformed"
# What a [files] rule may do (accept: nothing, the rule is off for that scope), and what
# malformed_action, limit_action and unreadable_action may do.
FILE_ACTIONS = (REJECT, QUARANTINE, DISCARD, TAG, ACCEPT)
PROBLEM_ACTIONS = (TAG, TEMPFAIL, REJECT, QUARANTINE)
# A scope's action for rule R is its value "files.R" ([DIRECTION.files] R = "...").
FILE_PREFIX = "files."
# The problem kinds of the attachment facts (attachments/facts.py) that have an action of their
# own, and the setting that holds it; "encrypted" is a rule's business (encrypted = true).
PROBLEM_SETTINGS = (("malformed", "malformed_action"), ("limit", "limit_action"), ("unreadable", "unreadable_action"))

# Header names we own (lower case): copies arriving with inbound mail are removed before ours are
# added, a held copy's are removed before release, and a policy's header_rewrite may only remove them.
VERDICT_HEADER_PREFIXES = ("x-spam-", "x-virus-", "x-quarantine-", "x-attachment-")

# What virus_action and [virus_classes] may say, in the order the documentation lists them.
VIRUS_ACTIONS = (REJECT, QUARANTINE, DISCARD, TAG, TEMPFAIL)
# How strict a virus action is, to pick one when a message carries several viruses.
VIRUS_STRICTNESS = {TAG: 0, TEMPFAIL: 1, DISCARD: 2, QUARANTINE: 3, REJECT: 4}


@dataclass(frozen=True)
class HeaderRewrite:
    direction: str            # inbound | outbound | any
    action: str               # add | remove | replace
    name: str
    match: re.Pattern | None  # remove/replace: only values matching this (None: any)
    value: str                # add/replace: the new value
    where: str                # file:line, for explain and logs


@dataclass(frozen=True)
class FileRule:
    """One [files.rules.NAME] table: what it matches (any one criterion suffices). Names are
    matched in their normal form (attachments/names.py: case folded, bidi and invisible
    characters removed, trailing dots and spaces stripped) and in their skeleton (look-alike
    letters as ASCII), every name a file carries (filename= and name=, an archive member's path)."""
    name: str
    description: str = ""
    names: tuple[str, ...] = ()              # shell patterns on the base name ("*.pdf.exe"); with "/": the path
    extensions: frozenset = frozenset()      # the last extension, without the dot
    declared_types: tuple[str, ...] = ()     # shell patterns on the Content-Type as sent
    detected_types: tuple[str, ...] = ()     # shell patterns on the real type (libmagic)
    macros: bool = False                     # Office documents with VBA macros
    encrypted: bool = False                  # encrypted archives, members and documents
    name_tricks: frozenset = frozenset()     # what the normal form undid (names.py: "bidi controls", ...)
    where: str = ""                          # file:line, for explain

    def match(self, f) -> str:
        """Why this rule matches `f` (attachments.FileFacts), or "" when it does not."""
        for n in f.names:
            for form in dict.fromkeys((n.basename, n.skeleton)):
                ext = _last_extension(form)
                if ext and ext in self.extensions:
                    return f"extension .{safe_file_name(ext, 20)}"
                for pattern in self.names:
                    if fnmatch.fnmatchcase(n.normal if "/" in pattern else form, pattern):
                        return f'name matches "{pattern}"'
            tricks = self.name_tricks.intersection(n.tricks)
            if tricks:
                return f"name with {', '.join(sorted(tricks))}"
        for pattern in self.declared_types:
            if f.declared_type and fnmatch.fnmatchcase(f.declared_type, pattern):
                return f"declared type {safe_name(f.declared_type)}"
        for pattern in self.detected_types:
            if f.detected_type and fnmatch.fnmatchcase(f.detected_type, pattern):
                return f"real type {safe_name(f.detected_type)}"
        if self.macros and f.macros:
            return "VBA macros"
        if self.encrypted and f.encrypted:
            return "encrypted"
        return ""


def _last_extension(name: str) -> str:
    parts = [p.strip() for p in name.split(".")[1:]]
    return next((p for p in reversed(parts) if p), "")


def file_label(f, limit: int = 200) -> str:
    """A file for replies, headers and logs: its name (an archive member after the archives it
    lies in, "outer.7z > inner.zip > payload.exe"), or "part N" when it has none; printable
    ASCII, bounded (verdict.safe_file_name)."""
    if f is None:
        return "the message"
    name = f.names[0].sent if f.names else f"part {f.part}"
    chain = [safe_file_name(c, 60) for c in f.container] + [safe_file_name(name, 100)]
    label = " > ".join(chain)
    return label if len(label) <= limit else "... > " + chain[-1]


@dataclass(frozen=True)
class FileHit:
    """A [files] rule that matched a file, or a problem of the attachment checks, with the action
    the recipient's settings give it."""
    kind: str              # "rule", or a problem: "malformed", "limit", "unreadable"
    name: str              # the rule's name; for a problem the limit reached or what went wrong
    action: str
    file: Any = None       # attachments.FileFacts; None for a problem of the message as a whole
    why: str = ""          # what matched

    @property
    def label(self) -> str:
        return file_label(self.file)

    @property
    def reason(self) -> str:
        return BANNED if self.kind == "rule" else MALFORMED if self.kind == "malformed" else UNCHECKED


@dataclass(frozen=True)
class Scope:
    """Settings in force for one recipient of one direction, and where each came from."""
    values: dict[str, Any]
    origin: dict[str, str]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass(frozen=True)
class NotifyRules:
    """[notify]: who gets digests of the mail held for them (`quarantine notify`), most specific
    first: [notify.recipients], then [notify.domains], then `send`; and the reasons only a
    postmaster may release (listed in a digest, never offered to the recipient)."""
    send: bool = False
    domains: dict[str, bool] = field(default_factory=dict)
    recipients: dict[str, bool] = field(default_factory=dict)
    admin_only_reasons: frozenset = frozenset({"virus"})

    def wants(self, recipient: str) -> bool:
        rcpt = recipient.lower()
        if rcpt in self.recipients:
            return self.recipients[rcpt]
        return self.domains.get(rcpt.rpartition("@")[2], self.send)

    def admin_only(self, reason: str) -> bool:
        return reason in self.admin_only_reasons


@dataclass(frozen=True)
class Policy:
    source: str
    directions: dict[str, dict[str, Any]]                     # direction -> settings
    domains: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    recipients: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    internal_networks: tuple = ()
    authenticated_is_outbound: bool = True
    outbound_services: frozenset = frozenset()
    allow_senders: frozenset = frozenset()
    allow_senders_clients: tuple = ()      # when set, allow_senders needs one of these clients or SASL
    allow_clients: tuple = ()
    allow_recipients: frozenset = frozenset()
    block_senders: frozenset = frozenset()
    block_clients: tuple = ()
    block_recipients: frozenset = frozenset()
    allow_skips_virus_scan: bool = False
    virus_classes: tuple[tuple[str, str], ...] = ()             # (pattern, action)
    rewrites: tuple[HeaderRewrite, ...] = ()
    quarantine_available: bool = False
    file_rules: tuple[FileRule, ...] = ()      # [files.rules.NAME], in the order they are written
    # direction -> {"files.NAME": action}: [DIRECTION.files] over the built-in actions (overrides
    # keep theirs among their other settings in `domains` and `recipients`)
    file_actions: dict[str, dict[str, str]] = field(default_factory=dict)
    notify: NotifyRules = field(default_factory=NotifyRules)

    def scope(self, direction: str, recipient: str) -> Scope:
        values = {**self.directions[direction], **self.file_actions.get(direction, {})}
        origin = {k: f"[{direction}{_table(k)}]" for k in values}
        rcpt = recipient.lower()
        domain = rcpt.rpartition("@")[2]
        for table, key in ((self.domains, domain), (self.recipients, rcpt)):
            override = table.get(direction, {}).get(key)
            if override:
                kind = "domains" if table is self.domains else "recipients"
                values.update(override)
                origin.update({k: f'[{direction}.{kind}."{key}"{_table(k)}]' for k in override})
        return Scope(values, origin)

    def header_names(self) -> frozenset[str]:
        """Lower-case names of headers whose values the handler must keep for us."""
        return frozenset({"subject"} | {r.name.lower() for r in self.rewrites})


def _table(key: str) -> str:
    """The sub-table a scope key is written in: rule actions in [DIRECTION.files]."""
    return ".files" if key.startswith(FILE_PREFIX) else ""


@dataclass(frozen=True)
class Envelope:
    """What the policy needs to know about one transaction."""
    client_address: str = ""
    auth_user: str = ""
    daemon_name: str = ""
    sender: str = ""
    recipients: tuple[str, ...] = ()


@dataclass(frozen=True)
class RecipientDecision:
    recipient: str
    action: str                                   # accept | reject | tempfail | discard | quarantine
    reason: str                                   # ham | tagged | spam | virus | banned | unchecked | malformed |
                                                  # scan-error | oversize | blocked | allowed
    rule: str                                     # the setting that decided, and where it came from
    scope: Scope
    reply: tuple[str, str, str] | None = None     # code, enhanced code, text
    spam_flag: bool = False
    subject_tag: str = ""
    steps: tuple[str, ...] = ()                   # the decision path, for `scanmilter explain`
    files: tuple[FileHit, ...] = ()               # attachment rules and problems in force, strictest first


@dataclass(frozen=True)
class Outcome:
    """What happens to the message as a whole."""
    action: str
    reason: str
    direction: str
    reply: tuple[str, str, str] | None
    recipients: tuple[RecipientDecision, ...]
    headers_from: RecipientDecision | None = None    # whose settings shape the header edits
    remove: tuple[str, ...] = ()                     # recipients removed from an accepted message
    quarantine: tuple[str, ...] = ()                 # recipients whose copy goes to quarantine
    note: str = ""                                   # how mixed recipients were resolved


def fmt_score(score: float | None) -> str:
    return "-" if score is None else f"{score:.1f}"


def _ip(address: str):
    try:
        ip = ipaddress.ip_address(address.strip("[]").removeprefix("IPv6:").split("%")[0])
    except ValueError:
        return None
    return ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip


def in_networks(address: str, networks) -> bool:
    ip = _ip(address)
    return ip is not None and any(ip.version == n.version and ip in n for n in networks)


def listed(address: str, entries: frozenset) -> bool:
    """`address` is in `entries` as itself or by its domain ("example.org" or "@example.org")."""
    address = address.lower()
    domain = address.rpartition("@")[2]
    return address in entries or domain in entries or f"@{domain}" in entries


def direction_of(env: Envelope, policy: Policy) -> tuple[str, str]:
    """(direction, why)."""
    if env.daemon_name and env.daemon_name in policy.outbound_services:
        return OUTBOUND, f"Postfix service {env.daemon_name} is in outbound_services"
    if env.auth_user and policy.authenticated_is_outbound:
        return OUTBOUND, f"sender authenticated as {env.auth_user}"
    if in_networks(env.client_address, policy.internal_networks):
        return OUTBOUND, f"client {env.client_address} is in internal_networks"
    return INBOUND, f"client {env.client_address or 'unknown'} is outside internal_networks, not authenticated"


def _list_match(env: Envelope, recipient: str, policy: Policy, kind: str) -> str:
    """Why the client, sender or recipient is on the `kind` ("allow" or "block") lists, or ""."""
    if in_networks(env.client_address, getattr(policy, f"{kind}_clients")):
        return f"client {env.client_address} is in {kind}_clients"
    if listed(env.sender, getattr(policy, f"{kind}_senders")):
        # a forged envelope sender must not buy an exemption: when allow_senders_clients is set,
        # the sender counts only from those clients or after SASL authentication
        if kind == "block" or not policy.allow_senders_clients or env.auth_user:
            return f"sender <{env.sender}> is in {kind}_senders" + (f" (authenticated as {env.auth_user})"
                                                                   if kind == "allow" and policy.allow_senders_clients
                                                                   else "")
        if in_networks(env.client_address, policy.allow_senders_clients):
            return f"sender <{env.sender}> is in allow_senders, client {env.client_address} in allow_senders_clients"
    if listed(recipient, getattr(policy, f"{kind}_recipients")):
        return f"recipient <{recipient}> is in {kind}_recipients"
    return ""


def allow_reason(env: Envelope, recipient: str, policy: Policy) -> str:
    return _list_match(env, recipient, policy, "allow")


def block_reason(env: Envelope, recipient: str, policy: Policy) -> str:
    return _list_match(env, recipient, policy, "block")


def engines_needed(env: Envelope, policy: Policy, spam_engine: str = "spamd") -> set[str]:
    """Which engines the decision can depend on: the spam engine (spamd or rspamd, whichever
    runs) is not asked about allow-listed mail."""
    allowed = [bool(allow_reason(env, r, policy)) for r in env.recipients] or [False]
    needed = set()
    if not all(allowed):
        needed.add(spam_engine)
    if not (all(allowed) and policy.allow_skips_virus_scan):
        needed.add("clamd")
    return needed


def checks_needed(env: Envelope, policy: Policy, spam_engine: str = "spamd") -> set[str]:
    """engines_needed, and the attachment checks ("files") wherever the virus scan is needed:
    allow-listed mail is exempt from them exactly as from the virus scan."""
    needed = engines_needed(env, policy, spam_engine)
    return needed | {"files"} if "clamd" in needed else needed


def refused_whatever_the_score(outcome: Outcome) -> bool:
    """True when no recipient's fate depends on a spam score: each is refused or held for a
    virus, or blocked. A virus that is only tagged still needs the score for the headers."""
    return all(d.reason in ("virus", "blocked", BANNED) and d.action != ACCEPT for d in outcome.recipients)


def virus_action(name: str, policy: Policy, default: str) -> tuple[str, str]:
    """(action, why) for one signature: an exact [virus_classes] entry, else the longest matching
    pattern, else the direction's virus_action."""
    exact = [(p, a) for p, a in policy.virus_classes if p == name]
    matches = exact or sorted(((p, a) for p, a in policy.virus_classes if fnmatch.fnmatchcase(name, p)),
                              key=lambda pa: -len(pa[0]))
    if matches:
        pattern, action = matches[0]
        return action, f'[virus_classes] "{pattern}" = "{action}"'
    return default, ""


def _level(value, verdict: Verdict) -> float:
    return verdict.spam_required() if value == "spamd" else float(value)


def _text(template: str, verdict: Verdict, level: float | None = None, hit: FileHit | None = None) -> str:
    return template.format(virus=", ".join(verdict.viruses) or "-", score=fmt_score(verdict.score),
                           level=fmt_score(level), file=hit.label if hit else "-",
                           rule=hit.name if hit and hit.kind == "rule" else "-",
                           problem=hit.name if hit and hit.kind != "rule" else "-")


# How strict an action of the attachment checks is, to pick one when several rules match.
_FILE_STRICTNESS = {ACCEPT: -1, TAG: 0, TEMPFAIL: 1, DISCARD: 2, QUARANTINE: 3, REJECT: 4}


def _strictest(hits: list[FileHit]) -> list[FileHit]:
    """`hits` strictest first; among equals, in walk order (an archive before its members)."""
    return sorted(hits, key=lambda h: -_FILE_STRICTNESS[h.action])


def file_hits(report, s: Scope, policy: Policy) -> list[FileHit]:
    """Every (rule, file) match with the rule's action for this scope (accept too: explain shows
    a rule turned off), strictest first."""
    rules = [(r, s.values.get(FILE_PREFIX + r.name, ACCEPT)) for r in policy.file_rules]
    hits = []
    for f in report.files:
        for rule, action in rules:
            why = rule.match(f)
            if why:
                hits.append(FileHit("rule", rule.name, action, f, why))
    return _strictest(hits)


def problem_hits(report, s: Scope) -> list[FileHit]:
    """The first problem of each kind that has an action (malformed MIME, a limit, an unreadable
    archive), strictest first. Warnings libarchive gave about an archive it still read are
    facts for explain, not malformed MIME."""
    hits = []
    for kind, setting in PROBLEM_SETTINGS:
        # a file's own problem first: "archive_expansion_limit in bomb.zip" says more than the message's
        found = [(f, p) for f in report.files for p in f.problems if p.kind == kind]
        found += [(None, p) for p in report.problems if p.kind == kind]
        found = [(f, p) for f, p in found if not (kind == "malformed" and p.detail.startswith("archive: "))]
        if found:
            f, p = found[0]
            detail = p.detail if kind == "limit" else safe_file_name(p.detail, 80)
            hits.append(FileHit(kind, detail, s.values[setting], f, f"{kind}: {detail}"))
    return _strictest(hits)


def decide_recipient(verdict: Verdict, env: Envelope, direction: str, recipient: str,
                     policy: Policy) -> RecipientDecision:
    s = policy.scope(direction, recipient)
    steps: list[str] = []

    noted: list[FileHit] = []        # the attachment rules and problems in force for this recipient

    def done(action, reason, rule, reply=None, flag=False, tag=""):
        steps.append(f"=> {action} ({reason}): {rule}")
        return RecipientDecision(recipient, action, reason, rule, s, reply, flag, tag, tuple(steps),
                                 tuple(_strictest(noted)))

    def origin(key):
        return f"{key} = {_show(s.values[key])} from {s.origin[key]}"

    blocked = block_reason(env, recipient, policy)
    if blocked:
        return done(REJECT, "blocked", blocked, (*REPLY_REJECT, _text(s.block_reply, verdict)))
    allowed = allow_reason(env, recipient, policy)
    steps.append(f"allow lists: {allowed or 'no match'}")

    scan_viruses = not (allowed and policy.allow_skips_virus_scan)
    if verdict.viruses and scan_viruses:
        chosen, why = TAG, ""
        for name in verdict.viruses:
            action, reason = virus_action(name, policy, s.virus_action)
            if VIRUS_STRICTNESS[action] >= VIRUS_STRICTNESS[chosen]:
                chosen, why = action, reason or origin("virus_action")
        steps.append(f"virus {', '.join(verdict.viruses)}: {why}")
        if chosen == REJECT:
            return done(REJECT, "virus", why, (*REPLY_REJECT, _text(s.virus_reply, verdict)))
        if chosen == TEMPFAIL:
            return done(TEMPFAIL, "virus", why, (*REPLY_TEMPFAIL, _text(s.virus_reply, verdict)))
        if chosen == DISCARD:
            return done(DISCARD, "virus", why)
        if chosen == QUARANTINE:
            return done(QUARANTINE, "virus", why, _quarantine_reply(s, verdict))
    else:
        steps.append("virus: none found" if scan_viruses else "virus: not scanned (allow_skips_virus_scan)")

    report = verdict.files if scan_viruses else None
    problems: list[FileHit] = []
    if report is None:
        steps.append("files: not checked" + ("" if scan_viruses else " (allow_skips_virus_scan)"))
    else:
        matches, problems = file_hits(report, s, policy), problem_hits(report, s)
        hits = [h for h in matches if h.action != ACCEPT]
        noted += hits + problems
        if not matches:
            steps.append(f"files: {len(report.files)} checked, no [files] rule matches")
        for h in matches[:10]:
            steps.append(f"files: rule {h.name} matches {h.file.part}: {h.label} ({h.why}); "
                         f"{_file_origin(s, h.name)}")
        if len(matches) > 10:
            steps.append(f"files: {len(matches) - 10} more matches")
        lead = hits[0] if hits else None
        if lead is not None and lead.action != TAG:
            why = f"{lead.name} ({lead.why}): {lead.label}; {_file_origin(s, lead.name)}"
            if lead.action == REJECT:
                return done(REJECT, BANNED, why, (*REPLY_BANNED, _text(s.banned_reply, verdict, hit=lead)))
            if lead.action == QUARANTINE:
                return done(QUARANTINE, BANNED, why, _quarantine_reply(s, verdict))
            return done(DISCARD, BANNED, why)

    score = verdict.score
    if allowed:
        steps.append("spam: not checked (allow-listed)")
        score = None
    elif score is not None and verdict.spam_action:
        # rspamd_follow_action: the engine's own action decides, not our levels
        steps.append(f"spam score {fmt_score(score)}: {verdict.spam_engine} action \"{verdict.spam_action}\" "
                     "(rspamd_follow_action)")
        why = f'{verdict.spam_engine} action "{verdict.spam_action}"'
        if verdict.spam_action == "reject":
            return done(REJECT, "spam", why, (*REPLY_REJECT, _text(s.spam_reply, verdict, verdict.spam_required())))
        if verdict.spam_action in ("soft reject", "greylist"):
            return done(TEMPFAIL, "spam", why, (*REPLY_TEMPFAIL, _text(s.tempfail_reply, verdict)))
    elif score is not None:
        reject_level, quarantine_level = _level(s.reject_level, verdict), _level(s.quarantine_level, verdict)
        steps.append(f"spam score {fmt_score(score)}: reject_level {fmt_score(reject_level)}, "
                     f"quarantine_level {fmt_score(quarantine_level)}")
        if score >= reject_level:
            return done(REJECT, "spam", origin("reject_level"),
                        (*REPLY_REJECT, _text(s.spam_reply, verdict, reject_level)))
        if score >= quarantine_level:
            return done(QUARANTINE, "spam", origin("quarantine_level"), _quarantine_reply(s, verdict))

    failed = [f"{e} {d}" for e, d in verdict.failed
              if e in ("clamd", "files") and scan_viruses or e in SPAM_ENGINES and not allowed]
    if failed and s.scan_failure_action == TEMPFAIL:
        return done(TEMPFAIL, "scan-error", f"{'; '.join(failed)}; {origin('scan_failure_action')}",
                    (*REPLY_TEMPFAIL, _text(s.tempfail_reply, verdict)))
    for p in problems:
        steps.append(f"files: {p.why} in {p.label}; {origin(dict(PROBLEM_SETTINGS)[p.kind])}")
    if problems and problems[0].action != TAG:
        p = problems[0]
        why = f"{p.why}: {p.label}; {origin(dict(PROBLEM_SETTINGS)[p.kind])}"
        if p.action == QUARANTINE:
            return done(QUARANTINE, p.reason, why, _quarantine_reply(s, verdict))
        codes = REPLY_MALFORMED if p.kind == "malformed" else REPLY_UNCHECKED
        template = s.malformed_reply if p.kind == "malformed" else s.unchecked_reply
        return done(p.action, p.reason, why, (*codes[p.action], _text(template, verdict, hit=p)))
    if verdict.oversize:
        if s.oversize_action == "reject":
            return done(REJECT, "oversize", origin("oversize_action"), (*REPLY_TOO_BIG, "Message too big to be scanned"))
        return done(ACCEPT, "oversize", origin("oversize_action"))
    if failed:
        return done(ACCEPT, "scan-error", f"{'; '.join(failed)}; {origin('scan_failure_action')}")
    if verdict.viruses and scan_viruses:
        return done(ACCEPT, "virus", "virus action tag: accepted with X-Virus-Status: infected")
    if noted:
        # every rule and problem left is tagged: accepted, marked X-Attachment-Status (and the spam
        # flag and Subject tag as the score says)
        lead = _strictest(noted)[0]
        flag, tag = _spam_marks(score, verdict, s)
        what = (f"{lead.name} ({lead.why}): {lead.label}; {_file_origin(s, lead.name)}" if lead.kind == "rule"
                else f"{lead.why}: {lead.label}; {origin(dict(PROBLEM_SETTINGS)[lead.kind])}")
        return done(ACCEPT, lead.reason, f"tagged: {what}", flag=flag, tag=tag)
    if score is not None and verdict.spam_action:
        if verdict.spam_action in ("add header", "rewrite subject"):
            why = f'{verdict.spam_engine} action "{verdict.spam_action}"'
            return done(ACCEPT, "tagged", why, flag=True, tag=s.subject_tag)
        return done(ACCEPT, "ham", f'{verdict.spam_engine} action "{verdict.spam_action}"')
    if score is not None:
        flag = score >= _level(s.tag_level, verdict)
        tag = s.subject_tag if s.subject_tag and score >= _level(s.subject_tag_level, verdict) else ""
        if flag or tag:
            rule = origin("tag_level") + (f"; {origin('subject_tag_level')}" if tag else "")
            return done(ACCEPT, "tagged", rule, flag=flag, tag=tag)
        return done(ACCEPT, "ham", f"score below {origin('tag_level')}")
    return done(ACCEPT, "allowed" if allowed else "ham", allowed or "nothing to act on")


def _file_origin(s: Scope, rule: str) -> str:
    key = FILE_PREFIX + rule
    return f'{rule} = "{s.values[key]}" from {s.origin[key]}'


def _spam_marks(score: float | None, verdict: Verdict, s: Scope) -> tuple[bool, str]:
    """(X-Spam-Flag, Subject tag) that the score earns, for an accept decided by something else."""
    if score is None:
        return False, ""
    if verdict.spam_action:
        marked = verdict.spam_action in ("add header", "rewrite subject")
        return marked, s.subject_tag if marked else ""
    flag = score >= _level(s.tag_level, verdict)
    tag = s.subject_tag if s.subject_tag and score >= _level(s.subject_tag_level, verdict) else ""
    return flag, tag


def _quarantine_reply(s: Scope, verdict: Verdict):
    return (*REPLY_REJECT, _text(s.quarantine_reply, verdict)) if s.quarantine_action == REJECT else None


def _show(value) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


# Which accepted recipient's settings shape the headers: the most cautious one.
_HEADER_RANK = {"tagged": 3, "virus": 3, BANNED: 3, "scan-error": 2, UNCHECKED: 2, MALFORMED: 2, "oversize": 1}


def combine_recipients(decisions: list[RecipientDecision], direction: str, policy: Policy) -> Outcome:
    """One outcome for the message from its recipients' decisions.

    - all agree: that action;
    - any tempfail: tempfail for all (the sender retries; nothing is lost);
    - some accept: the message goes to them; recipients that would reject or quarantine are
      removed and their copy quarantined, discarding ones are removed. Without a quarantine
      store a reject cannot be kept per recipient, so the whole message is rejected (the sender
      is told; nobody's copy disappears silently);
    - none accept: reject if any rejects; else quarantine for the quarantining ones; else discard.
    Headers follow the most cautious accepting recipient (tagged > scan-error > oversize > ham).
    """
    actions = [d.action for d in decisions]

    def first(action):
        return next(d for d in decisions if d.action == action)

    def outcome(action, lead, **kw):
        return Outcome(action, lead.reason, direction, lead.reply, tuple(decisions), **kw)

    if len(set(actions)) == 1:
        lead = decisions[0]
        if lead.action == ACCEPT:
            lead = max(decisions, key=lambda d: (d.spam_flag or bool(d.subject_tag), _HEADER_RANK.get(d.reason, 0)))
            return outcome(ACCEPT, lead, headers_from=lead)
        rcpts = tuple(d.recipient for d in decisions) if lead.action == QUARANTINE else ()
        return outcome(lead.action, lead, quarantine=rcpts)
    if TEMPFAIL in actions:
        return outcome(TEMPFAIL, first(TEMPFAIL), note="mixed recipients: one tempfails, so all do")
    accepted = [d for d in decisions if d.action == ACCEPT]
    if accepted:
        others = [d for d in decisions if d.action != ACCEPT]
        if REJECT in actions and not policy.quarantine_available:
            return outcome(REJECT, first(REJECT),
                           note="mixed recipients: a reject cannot be kept per recipient without a "
                                "quarantine, so the message is rejected for all")
        lead = max(accepted, key=lambda d: (d.spam_flag or bool(d.subject_tag), _HEADER_RANK.get(d.reason, 0)))
        held = tuple(d.recipient for d in others if d.action in (REJECT, QUARANTINE))
        return Outcome(ACCEPT, lead.reason, direction, None, tuple(decisions), headers_from=lead,
                       remove=tuple(d.recipient for d in others), quarantine=held,
                       note=f"mixed recipients: delivered to {len(accepted)}, removed {len(others)}"
                            + (f", quarantined for {len(held)}" if held else ""))
    if REJECT in actions:
        return outcome(REJECT, first(REJECT), note="mixed recipients: none accepts; rejected for all")
    if QUARANTINE in actions:
        lead = first(QUARANTINE)
        return Outcome(QUARANTINE, lead.reason, direction, lead.reply, tuple(decisions),
                       quarantine=tuple(d.recipient for d in decisions if d.action == QUARANTINE),
                       note="mixed recipients: quarantined for some, discarded for the others")
    return outcome(DISCARD, first(DISCARD))


def decide(verdict: Verdict, env: Envelope, policy: Policy, verdicts: dict[str, Verdict] | None = None) -> Outcome:
    """`verdicts`: a recipient's own verdict where it has one (per-user spamd: its user's score),
    else `verdict`."""
    direction, _ = direction_of(env, policy)
    recipients = env.recipients or ("",)
    verdicts = verdicts or {}
    return combine_recipients([decide_recipient(verdicts.get(r, verdict), env, direction, r, policy)
                               for r in recipients], direction, policy)
