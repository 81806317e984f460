"""Every setting: name, default, unit and one line of documentation; load and validate.

Two files, one mechanism. The daemon's settings live in the configuration file given with
`-c`; the policy (levels, actions, reply texts) lives in `policy_file`, whose shipped form is
policies/default.toml. Unknown keys and bad values stop start-up with a message naming the key.
Names read `<scope>_<object>_<kind>`, as in Postfix: `clamd_timeout`, `spamd_size_limit`.
"""
from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass
from typing import Any, Callable

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


def _milter_socket(v: str) -> str | None:
    if re.fullmatch(r"(unix|local):/.+|inet6?:\d{1,5}@[\w.:\[\]-]+", v):
        return None
    return 'expected "unix:/path" or "inet:PORT@HOST" (libmilter syntax)'


def _client_socket(v: str) -> str | None:
    try:
        parse_client_socket(v)
    except ValueError as e:
        return str(e)
    return None


def _octal(v: str) -> str | None:
    return None if re.fullmatch(r"0?[0-7]{3}", v) else 'expected an octal mode such as "0660"'


def _level(v: Any) -> str | None:
    if v == "spamd" or (isinstance(v, (int, float)) and not isinstance(v, bool)):
        return None
    return 'expected a score (number) or "spamd" (use spamd\'s own required score)'


def _reply_text(v: str) -> str | None:
    if any(ord(c) < 32 or ord(c) == 127 for c in v):
        return "control characters are not allowed in SMTP reply text"
    try:
        v.format(virus="x", score=0.0, required=0.0)
    except (KeyError, IndexError, ValueError) as e:
        return f"bad placeholder ({e}); known: {{virus}}, {{score}}, {{required}}"
    return None


DAEMON_SETTINGS = [
    Setting("milter_socket", "unix:/run/scanmilter/scanmilter.sock", "socket",
            "where scanmilter listens for Postfix (libmilter syntax: unix:/path or inet:PORT@127.0.0.1)",
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
    Setting("message_size_limit", 50 * MiB, "bytes",
            "bytes stored per message; beyond it the message is read but not stored and oversize_action applies"),
    Setting("scan_threads", 32, "count",
            "worker threads shared by all messages for scanning engines in parallel"),
    Setting("shutdown_timeout", 30.0, "seconds",
            "on SIGTERM, how long in-flight messages may take to finish before the process exits"),
    Setting("clamd_enabled", True, "switch", "scan for viruses with clamd"),
    Setting("clamd_socket", "unix:/run/clamav/clamd.ctl", "socket",
            "clamd's address: unix:/path or inet:HOST:PORT", check=_client_socket),
    Setting("clamd_connect_timeout", 2.0, "seconds", "how long to wait for clamd to accept a connection"),
    Setting("clamd_timeout", 30.0, "seconds", "how long a clamd scan may take in all"),
    Setting("clamd_size_limit", 25 * MiB, "bytes",
            "messages larger than this are not sent to clamd (keep it at or below clamd's StreamMaxLength)"),
    Setting("spamd_enabled", True, "switch", "score spam with SpamAssassin's spamd"),
    Setting("spamd_socket", "inet:127.0.0.1:783", "socket",
            "spamd's address: unix:/path or inet:HOST:PORT", check=_client_socket),
    Setting("spamd_connect_timeout", 2.0, "seconds", "how long to wait for spamd to accept a connection"),
    Setting("spamd_timeout", 30.0, "seconds", "how long a spamd check may take in all"),
    Setting("spamd_size_limit", 512 * KiB, "bytes",
            "messages larger than this are skipped or truncated for spamd (spamc's default is 500 KB)"),
    Setting("spamd_oversize_action", "skip", "choice",
            "for a message over spamd_size_limit: skip spamd, or send only its first spamd_size_limit bytes",
            choices=("skip", "truncate")),
    Setting("spamd_user", "", "text", "user name passed to spamd for per-user preferences; empty: none"),
]

POLICY_SETTINGS = [
    Setting("tag_level", 5.0, "score",
            'spam score from which X-Spam-Flag: YES is added and the Subject tagged; "spamd": spamd\'s required score',
            check=_level),
    Setting("reject_level", 15.0, "score", "spam score from which the message is rejected"),
    Setting("subject_tag", "[SPAM]", "text", "prefix put once on the Subject of tagged spam; empty: leave the Subject"),
    Setting("virus_action", "reject", "choice", "what to do with a message carrying a virus",
            choices=("reject", "tempfail", "discard", "accept")),
    Setting("virus_reply", "Message rejected: virus {virus} found", "text",
            "SMTP reply text for a rejected virus ({virus}: the names found)", check=_reply_text),
    Setting("spam_reply", "Message rejected as spam (score {score}, required {required})", "text",
            "SMTP reply text for rejected spam", check=_reply_text),
    Setting("scan_failure_action", "tempfail", "choice",
            "a scanner failed or timed out: tempfail (451 4.7.1, the sender retries) or accept with "
            "an unscanned header", choices=("tempfail", "accept")),
    Setting("tempfail_reply", "Message could not be scanned, please try again later", "text",
            "SMTP reply text when a scan failed and the message is tempfailed", check=_reply_text),
    Setting("oversize_action", "tag", "choice",
            "message over message_size_limit: skip (accept, no scan headers), tag (accept with "
            "unscanned headers) or reject (552 5.3.4)", choices=("skip", "tag", "reject")),
]


class Values:
    """Effective settings: attribute access, plus which were changed from the defaults."""

    def __init__(self, settings: list[Setting], values: dict[str, Any], source: str):
        self._settings = {s.name: s for s in settings}
        self._values = {s.name: s.default for s in settings} | values
        self.changed = frozenset(values)
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
    if s.check is _level:
        pass                     # a number or "spamd": its check says which
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
        if s.unit == "seconds" and value <= 0:
            raise ConfigError(f"{where}: {s.name} must be more than 0 seconds, not {value!r}")
        value = float(value)
    elif isinstance(d, str) and not isinstance(value, str):
        raise ConfigError(f"{where}: {s.name} must be a string, not {value!r}")
    if s.choices and value not in s.choices:
        raise ConfigError(f"{where}: {s.name} must be one of {', '.join(s.choices)}, not {value!r}")
    if s.check and (err := s.check(value)):
        raise ConfigError(f"{where}: {s.name}: {err}, not {value!r}")
    return value


def parse(settings: list[Setting], data: dict[str, Any], source: str) -> Values:
    """Validate a decoded TOML table against `settings`."""
    known = {s.name: s for s in settings}
    values = {}
    for key, value in data.items():
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"{source}: unknown setting {key!r}{hint}")
        values[key] = _check_value(known[key], value, source)
    return Values(settings, values, source)


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
    cfg = parse(DAEMON_SETTINGS, data, path or "defaults")
    if cfg.spool_memory_limit > cfg.message_size_limit:
        raise ConfigError(f"{cfg.source}: spool_memory_limit ({cfg.spool_memory_limit}) is larger than "
                          f"message_size_limit ({cfg.message_size_limit})")
    return cfg


def load_policy(path: str) -> Values:
    """The policy from `path` ("" : the shipped defaults)."""
    data = read_toml(path) if path else {}
    pol = parse(POLICY_SETTINGS, data, path or "default policy")
    if isinstance(pol.tag_level, (int, float)) and pol.tag_level > pol.reject_level:
        raise ConfigError(f"{pol.source}: tag_level ({pol.tag_level}) is above reject_level ({pol.reject_level})")
    return pol


def parse_client_socket(v: str) -> tuple[str, Any]:
    """"unix:/path" -> ("unix", "/path"); "inet:HOST:PORT" -> ("inet", (host, port))."""
    kind, _, rest = v.partition(":")
    if kind == "unix" and rest.startswith("/"):
        return "unix", rest
    if kind == "inet":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return "inet", (host.strip("[]"), int(port))
    raise ValueError('expected "unix:/path" or "inet:HOST:PORT"')


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(values: Values, only_changed: bool = False, defaults: bool = False) -> str:
    """Settings as TOML lines, like `postconf` (-n: changed only, -d: defaults)."""
    out = []
    for s in values._settings.values():
        if only_changed and s.name not in values.changed:
            continue
        v = s.default if defaults else getattr(values, s.name)
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
