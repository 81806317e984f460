"""Scanning engines behind one small interface, and the table that builds them from settings.

An engine has a `name`, a `timeout` (its deadline for one scan, in seconds) and
`scan(spool) -> ScanResult` with one of four outcomes: CLEAN, FOUND, ERROR, SKIPPED. It never
raises and never decides anything: every failure is an error result with its kind, so a dead or
slow engine can never look like a clean message. Between messages the daemon calls `ping()`
("" when the engine answers). The spool an engine gets may be a `Submission`: the message
together with its `Origin` (where it came from), for engines that judge the client as well as
the content.

Adding an engine: a module here with the engine's class and `from_settings(cfg)`, an entry in
ENGINES, and its settings (`<name>_enabled`, its socket and limits) in config.py. When the socket
setting is `<name>_socket`, it may list several servers: from_settings then calls the module's
from_settings once per address and puts them in a Pool (pool.py), which looks like one engine.

SECURITY: an engine's reply is untrusted input (a compromised or impostor server could send
anything). Replies are read within one deadline and a size cap, parsed strictly, and anything
unexpected is an error, never a clean result; names taken from replies are reduced to a safe
alphabet before they reach headers or logs (verdict.safe_name). The message itself is only
passed through, never interpreted here.
"""
from __future__ import annotations

import importlib
import socket
import time
from dataclasses import dataclass
from typing import Any

CLEAN, FOUND, ERROR, SKIPPED = "clean", "found", "error", "skipped"

# The detail of a result: a small closed set, so that it can label metrics and log lines.
# Error kinds:
TIMEOUT, REFUSED, PROTOCOL = "timeout", "refused", "protocol"
CIRCUIT = "circuit"      # not tried: the engine's circuit breaker is open
FAILED = "failed"        # the check raised inside our own process (the attachment checks: a library's surprise)
# Skip reasons:
SIZE = "size"            # over the engine's own size limit
LIMITS = "limits"        # clamd stopped at one of its limits on what it unpacks (AlertExceedsMax)
OVERSIZE = "oversize"    # over message_size_limit: only part of the message was kept
DECIDED = "decided"      # not asked: the verdict was final without this engine
# A clean or found result that came from the scan cache, not from the engine:
CACHED = "cached"

# The engines, slowest first (the calling thread runs the first one): name -> its module
# (relative to this package). Each module has `from_settings(cfg)`; the engine is on when the
# setting `<name>_enabled` is true.
# "files" is not a server: the attachment checks (files.py) run in our own pool beside the others.
ENGINES = {"spamd": ".spamd", "rspamd": ".rspamd", "clamd": ".clamd", "files": ".files"}


# Engines that score spam: their result's score is the message's spam score. One of them runs,
# the one named by the setting spam_engine.
SPAM_ENGINES = ("spamd", "rspamd")


def from_settings(cfg, health=None, metrics=None) -> list:
    """The engines that are on, slowest first. An engine whose `<name>_socket` lists several
    addresses is a pool of them (pool.py); one address is a pool of one, the same engine as
    before pools. `health` and `metrics` follow each member of a pool."""
    return [_build(name, module, cfg, health, metrics)
            for name, module in ENGINES.items() if getattr(cfg, f"{name}_enabled")
            and (name not in SPAM_ENGINES or name == cfg.spam_engine)]


def _build(name: str, module: str, cfg, health, metrics):
    from .pool import Member, Pool
    build = importlib.import_module(module, __name__).from_settings
    addresses = members(getattr(cfg, f"{name}_socket", None))
    if addresses is None:       # an engine without a socket setting builds itself whole
        return build(cfg)
    servers = [Member(a, build(_MemberSettings(cfg, f"{name}_socket", a))) for a in addresses]
    return Pool(name, servers, servers[0].scanner.timeout, health, metrics)


def members(value) -> list[str] | None:
    """The addresses of a socket setting: one address, or a list of them (a pool)."""
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


class _MemberSettings:
    """The settings as one member of a pool sees them: its own address in the socket setting."""

    def __init__(self, cfg, setting: str, address: str):
        self._cfg, self._setting, self._address = cfg, setting, address

    def __getattr__(self, name):
        return self._address if name == self._setting else getattr(self._cfg, name)


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


@dataclass(frozen=True)
class Origin:
    """Where a message came from, as Postfix told the milter. Postfix never shows a milter its
    own Received header, so an engine that judges the client (spamd's network and HELO rules)
    learns it from here."""
    client_address: str = ""
    client_name: str = ""          # Postfix's verified name, or "unknown"
    helo: str = ""
    auth_user: str = ""            # SASL login, "" when not authenticated
    tls: bool = False
    hostname: str = ""             # our own host name (Postfix's macro j)
    queue_id: str = ""
    # The envelope and direction, set at the end of the message, for engines told them (rspamd);
    # not part of key(): they change between the copies of one mailing, as the To header does
    sender: str | None = None      # None: not known yet; "" the null sender
    recipients: tuple[str, ...] = ()
    direction: str = ""            # inbound | outbound

    def key(self) -> bytes:
        """What of the origin can change an engine's verdict (the queue id cannot): part of the
        scan cache's key."""
        return "\0".join((self.client_address, self.client_name, self.helo, self.auth_user,
                           str(self.tls), self.hostname)).encode("utf-8", "backslashreplace")


class Submission:
    """A spool handed to the engines with its origin: reads like the spool itself."""

    def __init__(self, spool, origin: Origin):
        self.spool, self.origin = spool, origin

    def __getattr__(self, name):
        return getattr(self.spool, name)


@dataclass(frozen=True)
class ScanResult:
    engine: str
    outcome: str                      # clean | found | error | skipped
    detail: str = ""                  # error kind or skip reason
    seconds: float = 0.0
    viruses: tuple[str, ...] = ()     # clamd: signature names found
    score: float | None = None        # spamd: the message's score
    required: float | None = None     # spamd: its own required score
    rules: tuple[str, ...] = ()       # spamd: names of the rules that hit
    rule_scores: tuple[float, ...] = ()   # rspamd: the score of each of `rules`
    action: str = ""                  # rspamd: its own action, when the admin follows it (rspamd_follow_action)
    user: str | None = None           # spamd: the per-recipient user it scanned as (spamd_user pattern)
    report: Any = None                # files: the attachment facts (attachments.Report)


class EngineError(Exception):
    """A failed scan; `kind` is one of TIMEOUT, REFUSED, PROTOCOL."""

    def __init__(self, kind: str, text: str):
        super().__init__(text)
        self.kind = kind


class Deadline:
    """One time budget for a whole exchange, turned into per-operation socket timeouts."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise EngineError(TIMEOUT, "deadline passed")
        return left


def connect(address: tuple[str, object], connect_timeout: float, deadline: Deadline) -> socket.socket:
    """Open a stream socket to ("unix", path) or ("inet", (host, port))."""
    kind, where = address
    family = socket.AF_UNIX if kind == "unix" else socket.AF_INET6 if ":" in where[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(min(connect_timeout, deadline.left()))
        sock.connect(where)
    except socket.timeout:
        sock.close()
        raise EngineError(TIMEOUT, f"connect to {where} timed out") from None
    except OSError as e:
        sock.close()
        raise EngineError(REFUSED, f"connect to {where}: {e.strerror or e}") from None
    return sock


HANGUP_READ = 0.5     # seconds to collect what a server said before it hung up mid-request


def words_before_hangup(sock: socket.socket, limit: int = 4096) -> bytes:
    """A server may answer and close before it has read the whole request (clamd does so
    when a stream passes its StreamMaxLength); the answer says why, so read what arrived."""
    data = b""
    try:
        sock.settimeout(HANGUP_READ)
        while len(data) < limit and (chunk := sock.recv(limit)):
            data += chunk
    except OSError:
        pass
    return data


def run(engine: str, scan) -> ScanResult:
    """Time `scan()` and turn any failure into an error result."""
    start = time.monotonic()
    try:
        result = scan()
    except EngineError as e:
        result = ScanResult(engine, ERROR, f"{e.kind}: {e}")
    except socket.timeout:
        result = ScanResult(engine, ERROR, f"{TIMEOUT}: no answer in time")
    except OSError as e:
        result = ScanResult(engine, ERROR, f"{REFUSED}: {e.strerror or e}")
    except Exception as e:  # a bug or a surprise from a library: still never "clean"
        result = ScanResult(engine, ERROR, f"{PROTOCOL}: {type(e).__name__}: {e}")
    return ScanResult(**{**result.__dict__, "seconds": time.monotonic() - start})


def error_kind(detail: str) -> str:
    return detail.partition(":")[0]
