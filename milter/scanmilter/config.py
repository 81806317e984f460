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

from .policy import VIRUS_ACTIONS
from .scancache import CACHE_IGNORED_HEADERS
from .scanners import parse_client_socket

KiB, MiB = 1024, 1024 * 1024


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
        v.format(virus="x", score=0.0, level=0.0)
    except (KeyError, IndexError, ValueError) as e:
        return f"bad placeholder ({e}); known: {{virus}}, {{score}}, {{level}}"
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
            "where held mail is kept (created 0700); empty: no quarantine, and policies that hold mail are refused"),
    Setting("quarantine_release_address", "inet:127.0.0.1:10026", "socket",
            "the Postfix service that `quarantine release` re-injects into; it must not run scanmilter",
            check=_client_socket),
    Setting("quarantine_release_timeout", 60.0, "seconds", "how long a release may take over SMTP"),
    Setting("quarantine_max_age", 30 * 86400, "seconds",
            "`quarantine purge` without --older-than deletes entries older than this"),
    Setting("database_dsn", "", "text",
            "PostgreSQL connection string (libpq: \"host=db.example dbname=scanmilter user=scanmilter\"); "
            "prefer database_dsn_file when it holds a password", secret=True),
    Setting("database_dsn_file", "", "path",
            "file whose first line is the connection string (not readable by others); wins over database_dsn"),
    Setting("database_pool_size", 4, "count", "most connections one process keeps open to PostgreSQL"),
    Setting("database_connect_timeout", 5.0, "seconds",
            "how long to wait for a connection to PostgreSQL (from the pool or a new one)"),
    Setting("database_statement_timeout", 10.0, "seconds", "the longest one SQL statement may run"),
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
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            return f"{item!r} is not a network (CIDR such as 192.0.2.0/24 or 2001:db8::/32)"
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


def _same(s: Setting, value: Any) -> bool:
    """Whether a value means the setting's default: a mode is a number however it is written."""
    if s.unit == "mode":
        return int(value, 8) == int(s.default, 8)
    return value == s.default


class Values:
    """Effective settings: attribute access, plus which were changed from the defaults."""

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
    cfg = parse(DAEMON_SETTINGS, data, path or "defaults", read_text(path) if path else None)
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
    return "\n".join(out)


def markdown_table(settings: list[Setting]) -> str:
    """The README's table of settings, generated so that it cannot drift from the code."""
    rows = ["| setting | default | unit | meaning |", "|---|---|---|---|"]
    for s in settings:
        unit = " / ".join(s.choices) if s.choices else s.unit
        rows.append(f"| `{s.name}` | `{toml_value(s.default)}` | {unit} | {s.doc.replace('|', '/')} |")
    return "\n".join(rows)
