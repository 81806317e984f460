"""Every setting: name, default, unit and one line of documentation; load and validate.

Two files, one mechanism. The daemon's settings live in the configuration file given with
`-c`; the policy (levels, actions, reply texts) lives in `policy_file`, whose shipped form is
policies/default.toml. Unknown keys and bad values stop start-up with a message naming the key.
Names read `<scope>_<object>_<kind>`, as in Postfix: `clamd_timeout`, `spamd_size_limit`.
"""
from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from dataclasses import dataclass
from typing import Any, Callable

from .policy import PROBLEM_ACTIONS, VIRUS_ACTIONS
from .scancache import CACHE_IGNORED_HEADERS
from .scanners import parse_client_socket

KiB, MiB = 1024, 1024 * 1024
# quarantine_backend: a new kind of store is one more name here and a branch in quarantine.open_store
QUARANTINE_BACKENDS = ("files", "hold", "postgresql")


class ConfigError(Exception):
    """A configuration problem: start-up stops with this one line."""


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    unit: str          # bytes, seconds, score, mode, path, socket, choice, text, switch, count
    doc: str
    choices: tuple = ()
    check: Callable[[Any], str | None] | None = None   # returns an error text or None
    zero_is_off: bool = False    # seconds: 0 turns the feature off instead of being refused
    secret: bool = False         # a connection string: printed with its password as ****


def _milter_socket(v: str) -> str | None:
    if re.fullmatch(r"(unix|local):/.+|inet6?:\d{1,5}@[\w.:\[\]-]+", v):
        return None
    return 'expected "unix:/path" or "inet:PORT@HOST" (libmilter syntax)'


def _spamd_user(v: str) -> str | None:
    from .scanners.spamd import check_user_pattern
    return check_user_pattern(v)


def _spamd_user_name(v: str) -> str | None:
    from .scanners.spamd import safe_user
    return None if safe_user(v) == v else "expected letters, digits and . _ @ + - only"


_POOL_DOC = ("{}'s address: unix:/path or inet:HOST:PORT; a list of them: a pool (each message goes to the "
             "least busy member that answers)")


def _engine_connection(name: str, address: str, address_doc: str, check, timeout_doc: str) -> list[Setting]:
    """An engine's address and its two timeouts, named and documented alike for every engine."""
    return [Setting(f"{name}_socket", address, "socket", address_doc, check=check),
            Setting(f"{name}_connect_timeout", 2.0, "seconds", f"how long to wait for {name} to accept a connection"),
            Setting(f"{name}_timeout", 30.0, "seconds", timeout_doc)]


def _client_socket(v: str) -> str | None:
    try:
        parse_client_socket(v)
    except ValueError as e:
        return str(e)
    return None


def _client_sockets(v: Any) -> str | None:
    """One engine address, or a list of them: a pool whose members share the engine's work."""
    members = [v] if isinstance(v, str) else v
    if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
        return "expected an address or a non-empty list of addresses"
    if len(set(members)) != len(members):
        return "an address is listed twice"
    problems = [e for e in map(_client_socket, members) if e]
    return problems[0] if problems else None


def _absolute_or_empty(v: str) -> str | None:
    return None if v == "" or v.startswith("/") else "expected an absolute path, or empty"


def _octal(v: str) -> str | None:
    return None if re.fullmatch(r"0?[0-7]{3}", v) else 'expected an octal mode such as "0660"'


def _level(v: Any) -> str | None:
    if v == "spamd" or (isinstance(v, (int, float)) and not isinstance(v, bool)):
        return None
    return 'expected a score (number) or "spamd" (use spamd\'s own required score)'


def _cache_ignored(v: list) -> str | None:
    decoding = [n for n in v if n.lower().startswith("content-") or n.lower() == "mime-version"]
    if decoding:
        return f"{decoding[0]} tells the engines how to decode the message; its value must stay in the key"
    return None


def _reply_text(v: str) -> str | None:
    if any(ord(c) < 32 or ord(c) == 127 for c in v):
        return "control characters are not allowed in SMTP reply text"
    try:
        v.format(virus="x", score=0.0, level=0.0, file="x", rule="x", problem="x")
    except (KeyError, IndexError, ValueError) as e:
        return f"bad placeholder ({e}); known: {{virus}}, {{score}}, {{level}}, {{file}}, {{rule}}, {{problem}}"
    return None


DAEMON_SETTINGS = [
    Setting("milter_socket", "unix:/var/spool/postfix/scanmilter/scanmilter.sock", "socket",
            "where scanmilter listens for Postfix (libmilter syntax: unix:/path or inet:PORT@127.0.0.1); "
            "the default lies in Debian's Postfix chroot, where main.cf names it unix:/scanmilter/scanmilter.sock",
            check=_milter_socket),
    Setting("milter_socket_mode", "0660", "mode",
            "permissions of the unix socket (Postfix's smtpd must be able to write to it)", check=_octal),
    Setting("milter_timeout", 600, "seconds",
            "how long to wait for the next command from Postfix before dropping the session"),
    Setting("log_target", "stderr", "choice",
            "stderr (journald picks it up) or syslog (mail facility, beside Postfix's lines)",
            choices=("stderr", "syslog")),
    Setting("syslog_socket", "/dev/log", "path", "the syslog socket used when log_target = syslog"),
    Setting("log_level", "info", "choice", "least severe log level written",
            choices=("debug", "info", "warning", "error")),
    Setting("policy_file", "", "path",
            "policy file (levels, actions, replies); empty: the shipped policies/default.toml values"),
    Setting("spool_directory", "", "path",
            "where message spools larger than spool_memory_limit go (unnamed files); empty: $TMPDIR or /tmp"),
    Setting("spool_memory_limit", 1 * MiB, "bytes",
            "a message up to this size is held in memory; larger ones spill to spool_directory"),
    Setting("message_size_limit", 25 * MiB, "bytes",
            "bytes stored per message; beyond it the message is read but not stored and oversize_action applies"),
    # The attachment checks (attachments/): each limit reached is reported by its name, never passed as clean.
    Setting("mime_nesting_limit", 20, "count",
            "multipart and message/rfc822 levels looked into; deeper structure is reported malformed"),
    Setting("mime_part_limit", 500, "count",
            "MIME parts walked per message; past it the walk stops and the limit is reported"),
    Setting("mime_header_limit", 64 * KiB, "bytes",
            "bytes of Content-Type, Content-Disposition and Content-Transfer-Encoding kept per MIME part; "
            "more is reported malformed"),
    Setting("archive_depth_limit", 8, "count",
            "archives inside archives opened (an attached zip is depth 1); a deeper one is reported, not opened"),
    Setting("archive_member_limit", 1000, "count",
            "archive members listed per message, all archives together; past it no more archives are read"),
    Setting("archive_expansion_limit", 100 * MiB, "bytes",
            "bytes unpacked from the archives of one message, all together; past it no more archives are read"),
    Setting("archive_ratio_limit", 100, "count",
            "an archive that unpacks to more than this many times its own size (past archive_ratio_floor) is "
            "a bomb: it is not read further"),
    Setting("archive_ratio_floor", 1 * MiB, "bytes",
            "bytes an archive may unpack before archive_ratio_limit is applied to it"),
    Setting("attachment_timeout", 10.0, "seconds",
            "how long the attachment checks of one message may take; past it the walk stops and the limit "
            "is reported"),
    Setting("files_enabled", True, "switch",
            "run the attachment checks (file names, real types, archives, macros) beside the engines, judged "
            "by the policy's [files] rules; off: no [files] rule ever matches"),
    Setting("header_count_limit", 1000, "count",
            "header fields per message (real mail has a few dozen); past it the message is read, not kept, "
            "and refused with header_limit_action, unscanned"),
    Setting("verdict_header_limit", 50, "count",
            "X-Spam-*, X-Virus-* and X-Quarantine-* fields per message (each forged one costs Postfix an edit); "
            "past it the message is refused with header_limit_action, unscanned"),
    Setting("header_limit_action", "reject", "choice",
            "a message past header_count_limit or verdict_header_limit: reject (552 5.6.0) or tempfail (451 4.6.0)",
            choices=("reject", "tempfail")),
    Setting("scan_threads", 32, "count",
            "worker threads shared by all messages for scanning engines in parallel"),
    Setting("shutdown_timeout", 30.0, "seconds",
            "on SIGTERM, how long in-flight messages may take to finish before the process exits"),
    Setting("quarantine_directory", "", "path",
            "where held mail is kept (created 0700); with quarantine_backend = \"hold\" only the index of verdicts by "
            "queue id; empty: no quarantine, and policies that hold mail are refused"),
    Setting("quarantine_backend", "files", "choice",
            "files: messages and index in quarantine_directory; hold: messages on Postfix's hold queue "
            "(docs/hold-queue.md); postgresql: one quarantine in PostgreSQL for every host (the database_* settings, "
            "docs/multi-host.md)", choices=QUARANTINE_BACKENDS),
    Setting("postfix_config_directory", "", "path",
            "the Postfix instance the hold backend's postqueue, postsuper and postcat act on (their -c); "
            "empty: Postfix's default", check=_absolute_or_empty),
    Setting("postfix_command_timeout", 60.0, "seconds", "how long one postqueue, postsuper or postcat may take"),
    Setting("quarantine_release_address", "inet:127.0.0.1:10026", "socket",
            "the Postfix service that `quarantine release` re-injects into; it must not run scanmilter",
            check=_client_socket),
    Setting("quarantine_release_timeout", 60.0, "seconds", "how long a release may take over SMTP"),
    Setting("quarantine_max_age", 30 * 86400, "seconds",
            "`quarantine purge` without --older-than deletes entries older than this"),
    Setting("quarantine_fallback", "tempfail", "choice",
            "quarantine_backend = \"postgresql\" and the database cannot take a held message: tempfail it (the "
            "sender retries), or keep it in quarantine_directory until the database is back (local)",
            choices=("tempfail", "local")),
    Setting("quarantine_fallback_interval", 30.0, "seconds",
            "how often the daemon moves held mail from the local fallback store into PostgreSQL"),
    Setting("quarantine_central_release_address", "", "socket",
            "with quarantine_backend = \"postgresql\": every release goes through this Postfix service "
            "(inet:HOST:PORT); empty: through the one recorded in the entry by the host that held it",
            check=lambda v: (_client_socket(v) or (None if v.startswith("inet:") else "expected inet:HOST:PORT"))
            if v else None),
    Setting("database_dsn", "", "text",
            "PostgreSQL connection string (libpq: \"host=db.example dbname=scanmilter user=scanmilter\"); "
            "prefer database_dsn_file when it holds a password", secret=True),
    Setting("database_dsn_file", "", "path",
            "file whose first line is the connection string (not readable by others); wins over database_dsn"),
    Setting("database_pool_size", 4, "count", "most connections one process keeps open to PostgreSQL"),
    Setting("database_connect_timeout", 5.0, "seconds",
            "how long to wait for a connection to PostgreSQL (from the pool or a new one)"),
    Setting("database_statement_timeout", 10.0, "seconds", "the longest one SQL statement may run"),
    Setting("database_lock_timeout", 120.0, "seconds",
            "how long a quarantine command waits for an entry another host is releasing or deleting, and the "
            "longest such a command may keep the entry's row locked (at least quarantine_release_timeout)"),
    Setting("database_retry_interval", 5.0, "seconds",
            "after PostgreSQL failed, held mail goes straight to quarantine_fallback this long before the "
            "database is tried again (the daemon's check retries sooner when it answers)"),
    Setting("database_host_name", "", "text",
            "this host's name in the shared database (the entries it holds, who did what); empty: the "
            "machine's fully qualified name"),
    Setting("shared_lists", False, "switch",
            "also take allow/block lists and per-recipient settings from PostgreSQL (the database_* settings), "
            "applied without a reload (docs/shared-lists.md)"),
    Setting("shared_lists_refresh_interval", 10.0, "seconds",
            "the longest a change to the shared lists takes to apply (LISTEN/NOTIFY usually applies it at "
            "once); each host checks the database this often"),
    Setting("shared_lists_entry_limit", 100000, "count",
            "most shared list entries plus settings a host loads; a database holding more is refused and "
            "the last good copy stays in force"),
    # Digests of held mail to its recipients (`quarantine notify`, notify.py; who gets them: the
    # policy's [notify] table) and the review web page (`scanmilter web`, web/; docs/web.md).
    Setting("notify_from", "", "text",
            "From address of the digests; empty: postmaster@ this host's fully qualified name",
            check=lambda v: None if v == "" or re.fullmatch(r"[^@\s<>\"]+@[A-Za-z0-9.-]+", v)
            else "expected an address such as postmaster@example.org, or empty"),
    Setting("notify_max_age", 7 * 86400, "seconds",
            "held mail older than this is never put in a digest (the first run over an old quarantine)"),
    Setting("notify_max_entries", 100, "count",
            "most entries listed in one digest; the rest wait for the next digest"),
    Setting("notify_template_directory", "", "path",
            "templates found here (digest.txt, digest.html, digest_subject.txt) replace the shipped ones",
            check=_absolute_or_empty),
    Setting("web_base_url", "", "text",
            "where recipients reach `scanmilter web` (https://quarantine.example.org), for the links in digests; "
            "empty: digests carry no links",
            check=lambda v: None if v == "" or re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", v)
            else "expected an http(s) URL without query, or empty"),
    Setting("web_key_file", "", "path",
            "secret key file (at least 32 bytes, not readable by others) that signs the links in digests and "
            "the web page's forms; the notify timer and the web page read the same file", check=_absolute_or_empty),
    Setting("web_link_lifetime", 7 * 86400, "seconds",
            "how long a link in a digest may be used (never past quarantine_max_age after the mail was held)"),
    Setting("web_address", "127.0.0.1:8025", "address",
            "HOST:PORT where `scanmilter web` listens (plain HTTP: put a reverse proxy with TLS in front)"),
    Setting("web_threads", 4, "count", "requests the web page serves at once"),
    Setting("web_trusted_proxy", "", "text",
            "address of the reverse proxy whose X-Forwarded-For and X-Forwarded-Proto are believed (rate "
            "limits then count the real client); empty: none"),
    Setting("web_password_file", "", "path",
            "postmasters' logins for the web page, one login:hash per line (`scanmilter web passwd`); "
            "empty: no admin login", check=_absolute_or_empty),
    Setting("web_cookie_secure", True, "switch",
            "cookies only over HTTPS; false is allowed only with web_address on loopback (tests over plain http)"),
    Setting("web_session_lifetime", 8 * 3600, "seconds", "how long a postmaster's login lasts"),
    Setting("web_login_attempt_limit", 5, "count",
            "failed logins per client address, and per login, within web_login_window; further tries are "
            "refused (429) until the window has passed"),
    Setting("web_login_window", 900, "seconds", "the window of web_login_attempt_limit"),
    Setting("web_page_size", 50, "count", "entries per page of the postmasters' list"),
    Setting("web_bulk_limit", 200, "count", "most entries one bulk action of the postmasters' list acts on"),
    Setting("web_preview_limit", 256 * KiB, "bytes", "text of a message body shown at most (the rest is cut)"),
    Setting("web_render_timeout", 5.0, "seconds",
            "longest the page spends making one held message into text (in a child process, killed past it; "
            "the page then shows the entry without its body)"),
    Setting("web_metrics_address", "127.0.0.1:9926", "address",
            "HOST:PORT of the web page's own Prometheus /metrics (web actions, logins); empty: no endpoint"),
    Setting("metrics_address", "127.0.0.1:9925", "address",
            "HOST:PORT of the Prometheus /metrics endpoint; empty: no endpoint"),
    Setting("engine_check_interval", 15.0, "seconds",
            "how often clamd and spamd are pinged (and clamd's database version read) between messages"),
    Setting("engine_check_timeout", 5.0, "seconds",
            "how long one of those pings (or version queries) may take, at most the engine's own timeout"),
    Setting("engine_failure_threshold", 3, "count",
            "failures in a row after which an engine is skipped at once (circuit open) instead of waited for"),
    Setting("engine_retry_interval", 10.0, "seconds",
            "while the circuit is open, one message tries the engine again this often"),
    Setting("clamd_database_age_limit", 3 * 86400.0, "seconds",
            "clamd's signature database built longer ago than this is logged and announced (the "
            "clamd.database_old webhook event) once; 0: never", zero_is_off=True),
    # Webhooks (webhooks.py, docs/webhooks.md): the [[webhook]] tables name where events go;
    # these say how they are sent, for every webhook alike.
    Setting("webhook_queue_size", 1000, "count",
            "events waiting to be sent (and as many waiting for a retry); when full, new events are dropped, "
            "counted and logged: mail never waits for a webhook"),
    Setting("webhook_retry_interval", 1.0, "seconds",
            "wait before the first retry of a failed delivery; each further retry waits twice as long"),
    Setting("webhook_deadline", 300.0, "seconds",
            "a delivery not accepted this long after its event is given up (no retry starts past it)"),
    Setting("webhook_flush_timeout", 5.0, "seconds",
            "a command (quarantine release, delete, purge) or a stopping daemon waits at most this long for "
            "its events to be sent, then drops the rest with a warning"),
    Setting("webhook_field_limit", 1000, "count",
            "characters of one text field of an event (subject, sender, virus name, ...); longer is cut"),
    Setting("webhook_list_limit", 100, "count",
            "items of one list field of an event (recipients, viruses); the rest are left out (recipient_count "
            "says how many there were)"),
    Setting("scan_cache_seconds", 600.0, "seconds",
            "results of a message are reused for identical copies (same client, HELO and login, same headers "
            "but for scan_cache_ignored_headers, same body) this long; 0: off", zero_is_off=True),
    Setting("scan_cache_ignored_headers", list(CACHE_IGNORED_HEADERS), "list",
            "headers whose values may differ between copies that share a cached result (never a Content-* "
            "header; drop Received when a trusted relay stands between the client and this Postfix)",
            check=_cache_ignored),
    Setting("scan_cache_entries", 20000, "count", "most results kept in the scan cache (oldest go first)"),
    Setting("clamd_head_start", 0.1, "seconds",
            "spamd waits this long for clamd; mail clamd finds infected and policy refuses is never sent "
            "to spamd; 0: both at once", zero_is_off=True),
    Setting("clamd_enabled", True, "switch", "scan for viruses with clamd"),
    *_engine_connection("clamd", "unix:/run/clamav/clamd.ctl", _POOL_DOC.format("clamd"), _client_sockets,
                        "how long a clamd scan may take in all"),
    Setting("clamd_size_limit", 25 * MiB, "bytes",
            "messages larger than this are not sent to clamd and get oversize_action (at or below clamd's "
            "StreamMaxLength; at or above message_size_limit leaves no gap)"),
    Setting("spamd_enabled", True, "switch", "score spam with SpamAssassin's spamd"),
    *_engine_connection("spamd", "inet:127.0.0.1:783", _POOL_DOC.format("spamd"), _client_sockets,
                        "how long a spamd check may take in all"),
    Setting("spamd_size_limit", 512 * KiB, "bytes",
            "messages larger than this are skipped or truncated for spamd (spamc's default is 500 KB)"),
    Setting("spamd_oversize_action", "truncate", "choice",
            "for a message over spamd_size_limit: send spamd only its first spamd_size_limit bytes, or skip "
            "spamd (the message then gets oversize_action)", choices=("skip", "truncate")),
    Setting("spamd_user", "", "text",
            "user name passed to spamd for per-user preferences; empty: none; a pattern scans once per "
            "distinct user: %r the recipient, %d its domain, %% a percent sign", check=_spamd_user),
    Setting("spamd_user_limit", 10, "count",
            "most distinct spamd users scanned for one message (a spamd_user pattern); recipients beyond "
            "share one scan as spamd_user_fallback"),
    Setting("spamd_user_fallback", "", "text",
            "spamd user for recipients beyond spamd_user_limit, and for learning and checks when "
            "spamd_user is a pattern; empty: none", check=_spamd_user_name),
    Setting("spam_engine", "spamd", "choice",
            "which engine scores spam: SpamAssassin's spamd or rspamd (its normal worker over HTTP)",
            choices=("spamd", "rspamd")),
    Setting("rspamd_enabled", True, "switch", 'score spam with rspamd when spam_engine = "rspamd"'),
    *_engine_connection("rspamd", "inet:127.0.0.1:11333",
                        "rspamd's normal worker (/checkv2): unix:/path or inet:HOST:PORT", _client_socket,
                        "how long an rspamd check (or a learning) may take in all"),
    Setting("rspamd_size_limit", 25 * MiB, "bytes",
            "messages larger than this are not sent to rspamd (they get oversize_action); keep it at most "
            "rspamd's max_message"),
    Setting("rspamd_follow_action", False, "switch",
            "follow rspamd's own action instead of our levels: reject -> reject, soft reject and greylist -> "
            "tempfail, add header and rewrite subject -> tag"),
    Setting("rspamd_virus_symbols", ["CLAM_VIRUS"], "list",
            "rspamd symbols of its antivirus module whose options name viruses (they count as viruses found)"),
    Setting("rspamd_controller_address", "inet:127.0.0.1:11334", "socket",
            "rspamd's controller worker, for quarantine learning (/learnham, /learnspam)", check=_client_socket),
    Setting("rspamd_password_file", "", "path",
            "file holding the controller's password (its first line); empty: no password sent"),
]

def _cidrs(v: list) -> str | None:
    for item in v:
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            return f"{item!r} is not a network (CIDR such as 192.0.2.0/24 or 2001:db8::/32)"
        # a client that Postfix shows as ::ffff:a.b.c.d is matched as a.b.c.d, so such an
        # entry would never match anyone (a block that never blocks)
        if net.version == 6 and net.prefixlen >= 96 and net.network_address.ipv4_mapped is not None:
            four = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
            return f"{item!r} is an IPv4 network written as IPv6, and clients are matched as IPv4: write {four}"
    return None


def _addresses(v: list) -> str | None:
    for item in v:
        if not re.fullmatch(r"[^@\s]*@?[A-Za-z0-9.-]+", item) or item.endswith("@"):
            return f"{item!r} is neither an address (user@example.org) nor a domain (example.org)"
    return None


def _tag(v: str) -> str | None:
    return None if re.fullmatch(r"[\x20-\x7e]*", v) else "use printable ASCII (it goes into the Subject)"


# Settings of a direction ([inbound], [outbound]); the same keys may be overridden per recipient
# domain ([inbound.domains."example.org"]) and per recipient ([inbound.recipients."a@example.org"]).
DIRECTION_SETTINGS = [
    Setting("tag_level", 5.0, "score",
            'from this spam score X-Spam-Flag: YES is added; "spamd": spamd\'s own required score', check=_level),
    Setting("subject_tag_level", 5.0, "score", "from this spam score the Subject is prefixed with subject_tag",
            check=_level),
    Setting("quarantine_level", float("inf"), "score", "from this spam score the message is quarantined (inf: never)"),
    Setting("reject_level", 15.0, "score", "from this spam score the message is rejected (550 5.7.1)"),
    Setting("subject_tag", "[SPAM]", "text", 'prefix put once on the Subject of spam; "" leaves the Subject alone',
            check=_tag),
    Setting("add_scan_headers", True, "switch", "add X-Virus-Status, X-Spam-Status and X-Spam-Flag"),
    Setting("strip_verdict_headers", True, "switch",
            "remove X-Spam-*, X-Virus-* and X-Quarantine-* headers that arrive with the message"),
    Setting("virus_action", "reject", "choice", "what to do with a message carrying a virus",
            choices=VIRUS_ACTIONS),
    Setting("scan_failure_action", "tempfail", "choice",
            "a scanner failed or timed out: tempfail (451 4.7.1, the sender retries) or accept marked unscanned",
            choices=("tempfail", "accept")),
    Setting("oversize_action", "tag", "choice",
            "message over message_size_limit: skip (accept, no scan headers), tag (accept marked unscanned) "
            "or reject (552 5.3.4)", choices=("skip", "tag", "reject")),
    Setting("quarantine_action", "discard", "choice",
            "after quarantining: discard (the sender sees success) or reject (550 5.7.1 quarantine_reply)",
            choices=("discard", "reject")),
    Setting("virus_reply", "Message rejected: virus {virus} found", "text",
            "reply text for a rejected virus ({virus}: the names found)", check=_reply_text),
    Setting("spam_reply", "Message rejected as spam (score {score}, limit {level})", "text",
            "reply text for rejected spam ({score}, {level}: the level reached)", check=_reply_text),
    Setting("tempfail_reply", "Message could not be scanned, please try again later", "text",
            "reply text when a scan failed and the message is tempfailed", check=_reply_text),
    Setting("block_reply", "Message rejected by policy", "text",
            "reply text for a block-listed sender, client or recipient", check=_reply_text),
    Setting("quarantine_reply", "Message held for review by the postmaster", "text",
            "reply text when quarantine_action = reject", check=_reply_text),
    # The attachment checks: what a [files] rule matches is in [files.rules], its action per rule in
    # [DIRECTION.files]; these say what happens when the checks could not see everything.
    Setting("malformed_action", "tag", "choice",
            "broken MIME (a missing boundary, bad base64, nesting past mime_nesting_limit): tag (accept marked "
            "malformed), tempfail (451 4.6.0), reject (554 5.6.0) or quarantine", choices=PROBLEM_ACTIONS),
    Setting("limit_action", "reject", "choice",
            "an attachment check stopped at a limit (archive_depth_limit, archive_expansion_limit, a bomb, "
            "mime_part_limit, attachment_timeout...): reject (554 5.7.1 unchecked_reply: what lies past a limit "
            "was never seen, so a banned file could hide there), tag (accept marked unchecked), tempfail or "
            "quarantine (outbound default: tag)",
            choices=PROBLEM_ACTIONS),
    Setting("unreadable_action", "tag", "choice",
            "an archive or document its reader could not read: tag (accept marked unchecked), tempfail, reject "
            "or quarantine", choices=PROBLEM_ACTIONS),
    Setting("banned_reply", "Message rejected: banned attachment {file} ({rule})", "text",
            "reply text when a [files] rule rejects ({file}: the file, {rule}: the rule's name)", check=_reply_text),
    Setting("unchecked_reply", "Message not accepted: attachment {file} could not be checked ({problem})", "text",
            "reply text when limit_action or unreadable_action refuses ({problem}: the limit or the reason)",
            check=_reply_text),
    Setting("malformed_reply", "Message not accepted: malformed MIME ({problem})", "text",
            "reply text when malformed_action refuses ({problem}: what is broken)", check=_reply_text),
]

# Outbound mail (internal networks, authenticated senders) differs from inbound by default:
# no Subject rewrite and no scan headers (they break DKIM signatures and leak internals),
# replies that tell the local user what happened, a lower reject level.
OUTBOUND_DEFAULTS = {
    "reject_level": 10.0,
    "subject_tag": "",
    "add_scan_headers": False,
    "strip_verdict_headers": False,
    "virus_reply": "Your message was not sent: it contains a virus ({virus}); please contact your postmaster",
    "spam_reply": "Your message was not sent: it looks like spam (score {score}, limit {level}); "
                  "please contact your postmaster",
    "banned_reply": "Your message was not sent: attachment {file} is not allowed ({rule}); please contact your "
                    "postmaster",
    "limit_action": "tag",
}

DIRECTIONS_SETTINGS = [
    Setting("internal_networks", ["127.0.0.0/8", "::1/128"], "CIDR list",
            "clients in these networks send outbound mail", check=_cidrs),
    Setting("authenticated_is_outbound", True, "switch", "mail from SASL-authenticated senders is outbound"),
    Setting("outbound_services", [], "list",
            "Postfix services whose mail is outbound, by {daemon_name} (set it in master.cf with "
            "-o milter_macro_daemon_name=submission)"),
]

LISTS_SETTINGS = [
    Setting("allow_senders", [], "address list", "senders (user@example.org or example.org) exempt from spam "
            "checks; the envelope sender is the client's word, anyone can forge it (see allow_senders_clients)",
            check=_addresses),
    Setting("allow_senders_clients", [], "CIDR list",
            "when set, allow_senders counts only for mail from these client networks or from SASL-authenticated "
            "senders; empty: from anywhere", check=_cidrs),
    Setting("allow_clients", [], "CIDR list", "client networks exempt from spam checks", check=_cidrs),
    Setting("allow_recipients", [], "address list", "recipients who get their mail without spam checks",
            check=_addresses),
    Setting("block_senders", [], "address list", "senders whose mail is rejected (block_reply)", check=_addresses),
    Setting("block_clients", [], "CIDR list", "client networks whose mail is rejected", check=_cidrs),
    Setting("block_recipients", [], "address list", "recipients who get no mail at all", check=_addresses),
    Setting("allow_skips_virus_scan", False, "switch",
            "allow-listed mail skips the virus scan too (default: viruses are always looked for)"),
]

HEADER_REWRITE_ACTIONS = ("add", "remove", "replace")


def _webhook_url(v: str) -> str | None:
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(v)
        parts.port                          # raises ValueError for a port that is not a number
    except ValueError as e:
        return f"not a URL ({e})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "expected an http:// or https:// URL with a host"
    if parts.username is not None or parts.password is not None:
        return "no user or password in the URL: the receiver checks the signature (secret)"
    if any(ord(c) <= 32 or ord(c) == 127 for c in v):
        return "white space or control characters in the URL"
    return None


def _webhook_events(v: list) -> str | None:
    from .events import EVENTS
    for name in v:
        if name not in EVENTS:
            near = difflib.get_close_matches(name, EVENTS, n=1)
            return f"unknown event {name!r}" + (f" (did you mean {near[0]}?)" if near else "") + \
                f"; known: {', '.join(EVENTS)}"
    return None


# The keys of one [[webhook]] table of the daemon's configuration (docs/webhooks.md).
WEBHOOK_SETTINGS = [
    Setting("url", "", "text", "where events are POSTed: an http:// or https:// URL (required)", check=_webhook_url),
    Setting("events", [], "list", "the event names sent there (docs/webhooks.md); empty: every event",
            check=_webhook_events),
    Setting("secret", "", "text", "the key of the HMAC-SHA256 signature (prefer secret_file); never printed",
            secret=True),
    Setting("secret_file", "", "path",
            "file whose first line is the secret (not readable by others); wins over secret", check=_absolute_or_empty),
    Setting("timeout", 5.0, "seconds", "how long one attempt waits to connect, and then for each read of the answer"),
    Setting("name", "", "text", "the webhook's label in the metrics; empty: its position among the tables (0, 1, ...)",
            check=lambda v: None if re.fullmatch(r"[A-Za-z0-9_.-]{0,32}", v)
            else "expected up to 32 letters, digits, . _ -"),
]


def _locate_table(source: str, text: str | None, name: str, index: int, key: str | None = None) -> str:
    """"FILE:LINE" of `key` in the index-th [[name]] table (or of its header)."""
    if not text:
        return f"{source}: [[{name}]] #{index + 1}"
    seen, inside = -1, False
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("["):
            inside = re.fullmatch(rf"\[\[\s*{re.escape(name)}\s*\]\](\s*#.*)?", stripped) is not None
            seen += inside
            if inside and seen == index and key is None:
                return f"{source}:{number}"
            continue
        if inside and seen == index and key and re.match(rf'\s*["\']?{re.escape(key)}["\']?\s*=', line):
            return f"{source}:{number}"
    return f"{source}: [[{name}]] #{index + 1}"


def webhook_tables(tables: Any, source: str, text: str | None) -> tuple[dict, ...]:
    """The checked [[webhook]] tables, each with every key (defaults filled in)."""
    if tables is None:
        return ()
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{locate(source, text, (), 'webhook')}: webhook must be tables written [[webhook]]")
    out, names = [], set()
    for i, table in enumerate(tables):
        values = {s.name: s.default for s in WEBHOOK_SETTINGS} | \
            validate(WEBHOOK_SETTINGS, table, lambda key: _locate_table(source, text, "webhook", i, key))
        here = _locate_table(source, text, "webhook", i)
        if not values["url"]:
            raise ConfigError(f"{here}: [[webhook]] needs a url")
        if not (values["secret"] or values["secret_file"]):
            raise ConfigError(f"{here}: [[webhook]] needs secret_file (or secret): every request is signed")
        label = values["name"] or str(i)
        if label in names:
            raise ConfigError(f"{here}: two webhooks are named {label!r}")
        names.add(label)
        out.append(values)
    return tuple(out)


def redact_url(url: str) -> str:
    """A webhook URL as shown: its path and query may be the credential (a chat's incoming webhook)."""
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    hidden = "/****" if parts.path.strip("/") or parts.query else parts.path
    return f"{parts.scheme}://{parts.netloc}{hidden}"


def _same(s: Setting, value: Any) -> bool:
    """Whether a value means the setting's default: a mode is a number however it is written."""
    if s.unit == "mode":
        return int(value, 8) == int(s.default, 8)
    return value == s.default


class Values:
    """Effective settings: attribute access, plus which were changed from the defaults."""

    webhooks: tuple = ()        # the [[webhook]] tables (webhook_tables), set by load()

    def __init__(self, settings: list[Setting], values: dict[str, Any], source: str):
        self._settings = {s.name: s for s in settings}
        self._values = {s.name: s.default for s in settings} | values
        # like `postconf -n`: a value written out but equal to the default is no change
        self.changed = frozenset(k for k, v in values.items() if not _same(self._settings[k], v))
        self.source = source

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def items(self):
        return self._values.items()


def _check_value(s: Setting, value: Any, where: str) -> Any:
    d = s.default
    if s.check in (_level, _client_sockets):
        pass                     # a number or "spamd", an address or a list: its check says which
    elif isinstance(d, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {s.name} must be true or false, not {value!r}")
    elif isinstance(d, int):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if s.unit == "count" else 0):
            raise ConfigError(f"{where}: {s.name} must be a whole number of {s.unit}"
                              f"{' (at least 1)' if s.unit == 'count' else ''}, not {value!r}")
    elif isinstance(d, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {s.name} must be a number ({s.unit}), not {value!r}")
        if s.unit == "seconds" and (value < 0 or value == 0 and not s.zero_is_off):
            least = "0 (off) or more" if s.zero_is_off else "more than 0"
            raise ConfigError(f"{where}: {s.name} must be {least} seconds, not {value!r}")
        value = float(value)
    elif isinstance(d, list):
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise ConfigError(f"{where}: {s.name} must be a list of strings, not {value!r}")
    elif isinstance(d, str) and not isinstance(value, str):
        raise ConfigError(f"{where}: {s.name} must be a string, not {value!r}")
    if s.choices and value not in s.choices:
        raise ConfigError(f"{where}: {s.name} must be one of {', '.join(s.choices)}, not {value!r}")
    if s.check and (err := s.check(value)):
        raise ConfigError(f"{where}: {s.name}: {err}, not {value!r}")
    return value


def validate(settings: list[Setting], data: dict[str, Any], where: Callable[[str], str]) -> dict[str, Any]:
    """The checked values of one TOML table; `where(key)` names the file and line for messages."""
    known = {s.name: s for s in settings}
    values = {}
    for key, value in data.items():
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"{where(key)}: unknown setting {key!r}{hint}")
        values[key] = _check_value(known[key], value, where(key))
    return values


def parse(settings: list[Setting], data: dict[str, Any], source: str, text: str | None = None) -> Values:
    """Validate a decoded top-level TOML table against `settings`."""
    return Values(settings, validate(settings, data, lambda key: locate(source, text, (), key)), source)


def locate(source: str, text: str | None, table: tuple[str, ...], key: str | None = None) -> str:
    """"FILE:LINE" of `key` in `[table]` (or of the table header), found by reading the text;
    tomllib keeps no positions. Falls back to "FILE" when the text is not at hand."""
    if not text:
        return source
    current: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        header = re.fullmatch(r"\[\[?\s*(.+?)\s*\]\]?(\s*#.*)?", stripped)
        if header:
            current = tuple(p.strip().strip('"\'') for p in re.findall(r'"[^"]*"|\'[^\']*\'|[^.]+', header.group(1)))
            if key is None and current == table:
                return f"{source}:{number}"
            continue
        if key is not None and current == table and re.match(rf'\s*["\']?{re.escape(key)}["\']?\s*=', line):
            return f"{source}:{number}"
    return source


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load(path: str | None) -> Values:
    """The daemon settings from `path` (None: all defaults)."""
    data = read_toml(path) if path else {}
    tables = data.pop("webhook", None)          # [[webhook]]: the only tables of this file
    cfg = parse(DAEMON_SETTINGS, data, path or "defaults", read_text(path) if path else None)
    cfg.webhooks = webhook_tables(tables, cfg.source, read_text(path) if path else None)
    if cfg.quarantine_backend == "postgresql" and not (cfg.database_dsn or cfg.database_dsn_file):
        raise ConfigError(f"{cfg.source}: quarantine_backend = \"postgresql\" needs a database: set "
                          "database_dsn_file (or database_dsn)")
    if cfg.quarantine_backend == "postgresql" and cfg.quarantine_fallback == "local" and not cfg.quarantine_directory:
        raise ConfigError(f"{cfg.source}: quarantine_fallback = \"local\" needs quarantine_directory (where held "
                          "mail waits while PostgreSQL is down)")
    if cfg.shared_lists and not (cfg.database_dsn or cfg.database_dsn_file):
        raise ConfigError(f"{cfg.source}: shared_lists needs a database: set database_dsn_file (or database_dsn)")
    if cfg.spool_memory_limit > cfg.message_size_limit:
        raise ConfigError(f"{cfg.source}: spool_memory_limit ({cfg.spool_memory_limit}) is larger than "
                          f"message_size_limit ({cfg.message_size_limit})")
    return cfg


def size_gaps(cfg: Values) -> list[str]:
    """Bands of message sizes that an enabled engine does not scan, one line each. Such mail is
    never passed as scanned: it gets the policy's oversize_action, like mail over
    message_size_limit; these lines tell the operator that the band exists."""
    gaps = []
    if cfg.clamd_enabled and cfg.clamd_size_limit < cfg.message_size_limit:
        gaps.append(f"messages of {cfg.clamd_size_limit + 1} to {cfg.message_size_limit} bytes are not sent to "
                    f"clamd (clamd_size_limit {cfg.clamd_size_limit} < message_size_limit); they get oversize_action")
    if cfg.spamd_enabled and cfg.spam_engine == "spamd" and cfg.spamd_oversize_action == "skip" and cfg.spamd_size_limit < cfg.message_size_limit:
        gaps.append(f"messages of {cfg.spamd_size_limit + 1} to {cfg.message_size_limit} bytes are not sent to "
                    f"spamd (spamd_oversize_action = \"skip\", spamd_size_limit {cfg.spamd_size_limit}); they get "
                    "oversize_action")
    if cfg.spam_engine == "rspamd" and cfg.rspamd_enabled and cfg.rspamd_size_limit < cfg.message_size_limit:
        gaps.append(f"messages of {cfg.rspamd_size_limit + 1} to {cfg.message_size_limit} bytes are not sent to "
                    f"rspamd (rspamd_size_limit {cfg.rspamd_size_limit} < message_size_limit); they get "
                    "oversize_action")
    return gaps


_DURATION = re.compile(r"(\d+)([smhdw]?)")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str, default_unit: str = "") -> int:
    """"30d", "12h", "90m", "2w", "45s" -> seconds, as Postfix writes time values; a bare number
    counts in `default_unit` ("" : a unit is required). ValueError otherwise."""
    m = _DURATION.fullmatch(text.strip())
    unit = m and (m.group(2) or default_unit)
    if not unit:
        raise ValueError(f"{text!r} is not a duration such as 30d, 12h, 90m or 2w")
    return int(m.group(1)) * _DURATION_UNITS[unit]


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(values: Values, only_changed: bool = False, defaults: bool = False) -> str:
    """Settings as TOML lines, like `postconf` (-n: changed only, -d: defaults)."""
    out = []
    for s in values._settings.values():
        if only_changed and s.name not in values.changed:
            continue
        v = s.default if defaults else getattr(values, s.name)
        if s.secret and v:
            from .db import redact_dsn
            v = redact_dsn(v)
        note = f"# {s.unit}: {s.doc}"
        if not defaults and s.name in values.changed:
            note = f"# changed, default {toml_value(s.default)}"
        out.append(f"{s.name} = {toml_value(v)}  {note}")
    for table in () if defaults else values.webhooks:
        out.append("[[webhook]]")
        for s in WEBHOOK_SETTINGS:
            v = table[s.name]
            if s.name == "url":
                v = redact_url(v)
            elif s.secret and v:
                v = "****"
            out.append(f"{s.name} = {toml_value(v)}")
    return "\n".join(out)


def markdown_table(settings: list[Setting]) -> str:
    """The README's table of settings, generated so that it cannot drift from the code."""
    rows = ["| setting | default | unit | meaning |", "|---|---|---|---|"]
    for s in settings:
        unit = " / ".join(s.choices) if s.choices else s.unit
        rows.append(f"| `{s.name}` | `{toml_value(s.default)}` | {unit} | {s.doc.replace('|', '/')} |")
    return "\n".join(rows)
