"""spamd: the SPAMC protocol (SYMBOLS) over TCP or a unix socket.

SYMBOLS returns the score, spamd's own required score and the names of the rules that hit,
without sending the message back. Messages over the size limit are skipped, or only their
first bytes are sent, by setting (spamc itself skips anything over 500 KB).
"""
from __future__ import annotations

import email.utils
import io
import ipaddress
import re
import socket

from . import (CLEAN, FOUND, PROTOCOL, SIZE, SKIPPED, Deadline, EngineError, Origin, ScanResult, connect,
               members, parse_client_socket, run, words_before_hangup)

CHUNK = 64 * 1024
REPLY_LIMIT = 256 * 1024     # bytes; a SYMBOLS reply is a line of rule names, a longer one is garbage

_STATUS = re.compile(rb"SPAMD/\d+\.\d+ +(\d+) +([^\r\n]*)")
_HEADER = re.compile(rb"([A-Za-z][A-Za-z0-9-]*): *([^\r\n]*?) *")
_SPAM = re.compile(rb"(True|False) *; *(-?\d+(?:\.\d+)?) */ *(-?\d+(?:\.\d+)?)")
_LENGTH = re.compile(rb"\d{1,9}")
# SpamAssassin refuses any other rule name (RULENAME_RE in Mail::SpamAssassin::Constants)
_RULE = re.compile(rb"[A-Za-z_][A-Za-z0-9_]{0,127}")


# SpamAssassin's own required score when spamd does not say (its shipped required_score)
SPAMD_DEFAULT_REQUIRED = 5.0
# The Generic Test for Unsolicited Bulk Email: any SpamAssassin scores a message holding it as spam
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

_TOKEN_UNSAFE = re.compile(r"[^A-Za-z0-9._:@+=-]")


def _token(text: str, fallback: str = "unknown") -> str:
    """A client-supplied name (HELO, reverse name, login) reduced to one safe word, so that it
    can neither break the Received line nor mislead SpamAssassin's parser of it."""
    return _TOKEN_UNSAFE.sub("_", text)[:255] or fallback


def received_line(origin: Origin) -> bytes:
    """The Received header Postfix writes for this hop, which a milter never sees: put in front
    of what spamd scans (as spamass-milter does), it lets SpamAssassin judge the client (its
    relay, HELO, reverse name and authentication rules); the delivered message is unchanged.
    Empty when the client's address is unknown."""
    try:
        ip = ipaddress.ip_address(origin.client_address.removeprefix("IPv6:"))
    except ValueError:
        return b""
    address = f"IPv6:{ip.compressed}" if ip.version == 6 else str(ip)
    # Postfix hands a milter "[ADDR]" (or nothing) for a client without a verified name; its own
    # Received line says "unknown", which is what SpamAssassin's RDNS_NONE looks for
    unnamed = not origin.client_name or origin.client_name.startswith("[") or origin.client_name == "unknown"
    name = "unknown" if unnamed else _token(origin.client_name)
    helo = _token(origin.helo, name)
    protocol = "ESMTP" + ("S" if origin.tls else "") + ("A" if origin.auth_user else "")
    auth = f"\r\n\t(Authenticated sender: {_token(origin.auth_user)})" if origin.auth_user else ""
    queue_id = f" id {_token(origin.queue_id)}" if origin.queue_id else ""
    return (f"Received: from {helo} ({name} [{address}]){auth}\r\n\tby {_token(origin.hostname, 'localhost')} "
            f"(Postfix) with {protocol}{queue_id};\r\n\t{email.utils.formatdate(localtime=True)}\r\n").encode()


class _Prefixed:
    """The trace header, then the message: the body of a SPAMC request."""

    def __init__(self, head: bytes, rest):
        self.head, self.rest = head, rest

    def read(self, size: int) -> bytes:
        if self.head:
            out, self.head = self.head[:size], self.head[size:]
            return out
        return self.rest.read(size)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.rest.close()


# spamd_user: a fixed name, or a pattern expanded per recipient (as spamass-milter's -u):
# %r the recipient's address, %d its domain, %% a percent sign
_PATTERN = re.compile(r"%(.)", re.S)
_USER_UNSAFE = re.compile(r"[^A-Za-z0-9._@+-]")
USER_LENGTH = 128      # characters of a user name sent to spamd


def check_user_pattern(pattern: str) -> str | None:
    bad = sorted({m.group(1) for m in _PATTERN.finditer(pattern) if m.group(1) not in "rd%"})
    if bad or pattern.endswith("%") and not pattern.endswith("%%"):
        return 'expected a name, or a pattern with %r (the recipient), %d (its domain), %% (a percent sign)'
    return None


def is_user_pattern(pattern: str) -> bool:
    """True when the user depends on the recipient (%r or %d), False for a fixed name."""
    return any(m.group(1) in "rd" for m in _PATTERN.finditer(pattern))


def safe_user(name: str) -> str:
    """A user name for spamd's User header: the recipient's text comes from the sender, so it is
    reduced to a safe alphabet (no line break can add a SPAMC header, no / or .. can reach a
    per-user directory outside spamd's)."""
    name = _USER_UNSAFE.sub("_", name)[:USER_LENGTH]
    return "_" + name[1:] if name.startswith(".") else name


def user_for(pattern: str, recipient: str) -> str:
    """spamd_user expanded for one recipient, then made safe."""
    address = recipient.strip().strip("<>").lower()
    expand = {"r": address, "d": address.rpartition("@")[2], "%": "%"}
    return safe_user(_PATTERN.sub(lambda m: expand.get(m.group(1), ""), pattern))


def fixed_user(cfg) -> str:
    """The user for a scan or a learning that is not for one recipient: spamd_user itself when it
    is a plain name, else spamd_user_fallback."""
    return cfg.spamd_user_fallback if is_user_pattern(cfg.spamd_user) else cfg.spamd_user.replace("%%", "%")


class ForUser:
    """A spool to be scanned by spamd as `user` (a per-recipient spamd_user): reads like the spool."""

    def __init__(self, spool, user: str):
        self.spool, self.spamd_user = spool, user

    def __getattr__(self, name):
        return getattr(self.spool, name)


def from_settings(cfg) -> SpamdScanner:
    """The client for spamd_socket (whether or not spamd_enabled: quarantine learning uses it too)."""
    # the first member of a pool (learning and the bench talk to one spamd)
    address = parse_client_socket(members(cfg.spamd_socket)[0])
    return SpamdScanner(address, cfg.spamd_connect_timeout, cfg.spamd_timeout,
                        cfg.spamd_size_limit, cfg.spamd_oversize_action, fixed_user(cfg), cfg.engine_check_timeout)


class SpamdScanner:
    name = "spamd"

    def __init__(self, address, connect_timeout: float, timeout: float, size_limit: int,
                 oversize_action: str = "skip", user: str = "", check_timeout: float | None = None):
        """check_timeout: seconds for PING (engine_check_timeout); None: timeout."""
        self.address, self.connect_timeout, self.timeout = address, connect_timeout, timeout
        self.size_limit, self.oversize_action, self.user = size_limit, oversize_action, user
        self.check_timeout = timeout if check_timeout is None else min(timeout, check_timeout)

    def scan(self, spool) -> ScanResult:
        return run(self.name, lambda: self._scan(spool))

    def _scan(self, spool) -> ScanResult:
        size = spool.stored
        if size > self.size_limit:
            if self.oversize_action == "skip":
                return ScanResult(self.name, SKIPPED, SIZE)
            size = self.size_limit
        origin = getattr(spool, "origin", None)
        trace = received_line(origin) if origin is not None else b""
        user = getattr(spool, "spamd_user", None)
        result = parse_reply(self._exchange("SYMBOLS", {}, len(trace) + size,
                                            lambda: _Prefixed(trace, spool.reader(size)), user))
        return result if user is None else ScanResult(**{**result.__dict__, "user": user})

    def tell(self, data: bytes, message_class: str) -> bool:
        """Teach spamd's Bayes filter that `data` is "ham" or "spam" (SPAMC TELL; spamd needs
        --allow-tell). True when it learned, False when it had learned this message before.
        Raises EngineError (with spamd's own words) when it cannot."""
        if message_class not in ("ham", "spam"):
            raise ValueError(message_class)
        if len(data) > self.size_limit:
            raise EngineError(PROTOCOL, f"message of {len(data)} bytes is over spamd_size_limit ({self.size_limit})")
        reply = self._exchange("TELL", {"Message-class": message_class, "Set": "local"}, len(data),
                               lambda: io.BytesIO(data))
        check_status(reply)
        return bool(re.search(rb"(?im)^DidSet: *local", reply))

    def _exchange(self, command: str, headers: dict[str, str], size: int, open_body,
                  user: str | None = None) -> bytes:
        """One SPAMC request: `command`, `headers`, then `size` bytes read from `open_body()`;
        returns spamd's whole reply, within one deadline of spamd_timeout. `user`: this request's
        user instead of the scanner's own (None)."""
        user = self.user if user is None else safe_user(user)
        deadline = Deadline(self.timeout)
        sock = connect(self.address, self.connect_timeout, deadline)
        try:
            head = f"{command} SPAMC/1.5\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            head += f"Content-length: {size}\r\n" + (f"User: {user}\r\n" if user else "")
            try:
                sock.settimeout(deadline.left())
                sock.sendall(head.encode("ascii") + b"\r\n")
                with open_body() as body:
                    while chunk := body.read(CHUNK):
                        sock.settimeout(deadline.left())
                        sock.sendall(chunk)
                sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                said = words_before_hangup(sock)
                check_status(said)    # a well-formed spamd error explains the hang-up best
                raise EngineError(PROTOCOL, f"spamd hung up mid-message: {said[:100]!r}") from None
            reply = b""
            while True:
                sock.settimeout(deadline.left())     # every receive: a dribbling spamd cannot stretch it
                data = sock.recv(CHUNK)
                if not data:
                    break
                reply += data
                if len(reply) > REPLY_LIMIT:          # cut, it could pass for a shorter list of rules
                    raise EngineError(PROTOCOL, f"spamd reply over {REPLY_LIMIT} bytes: {reply[:100]!r}")
        finally:
            sock.close()
        return reply

    def ping(self) -> str:
        """"" when spamd answers PONG, else what went wrong."""
        try:
            deadline = Deadline(self.check_timeout)
            sock = connect(self.address, self.connect_timeout, deadline)
            try:
                sock.settimeout(deadline.left())
                sock.sendall(b"PING SPAMC/1.5\r\n\r\n")
                reply = sock.recv(1024)
            finally:
                sock.close()
        except (EngineError, OSError) as e:
            return str(e) or type(e).__name__
        return "" if re.match(rb"SPAMD/\d+\.\d+ 0 PONG", reply) else f"unexpected reply {reply[:80]!r}"


def check_status(reply: bytes) -> None:
    """A SPAMD/1.x status line with code 0, or a protocol error carrying spamd's words."""
    status = _STATUS.match(reply)
    if not status:
        raise EngineError(PROTOCOL, f"unexpected spamd reply {reply[:100]!r}")
    if status.group(1) != b"0":
        raise EngineError(PROTOCOL, f"spamd error {status.group(1).decode()}: "
                                    f"{status.group(2)[:200].decode('utf-8', 'replace')}")


def parse_reply(reply: bytes) -> ScanResult:
    r"""Read a reply to SYMBOLS as spamd writes it to a SPAMC/1.5 client:

        SPAMD/1.1 0 EX_OK\r\nContent-length: 13\r\nSpam: False ; 1.2 / 5.0\r\n\r\nRULE_A,RULE_B

    The body is exactly Content-length bytes of comma-separated rule names (none when no rule hit).
    Anything else is a protocol error, never a clean message."""
    check_status(reply)
    head, sep, body = reply.partition(b"\r\n\r\n")
    if not sep:
        raise EngineError(PROTOCOL, f"spamd reply without an end of headers {reply[:100]!r}")
    headers: dict[bytes, bytes] = {}
    for line in head.split(b"\r\n")[1:]:
        field = _HEADER.fullmatch(line)
        if not field or field.group(1).lower() in headers:
            raise EngineError(PROTOCOL, f"spamd reply header malformed or repeated: {line[:100]!r}")
        headers[field.group(1).lower()] = field.group(2)
    length = _LENGTH.fullmatch(headers.get(b"content-length", b""))
    if not length:
        raise EngineError(PROTOCOL, f"spamd reply without a Content-length {head[:100]!r}")
    if int(length.group()) != len(body):
        raise EngineError(PROTOCOL, f"spamd reply body of {len(body)} bytes, "
                                    f"Content-length says {length.group().decode()}")
    spam = _SPAM.fullmatch(headers.get(b"spam", b""))
    if not spam:
        raise EngineError(PROTOCOL, f"spamd reply without a Spam header {head[:100]!r}")
    rules = body.split(b",") if body else []
    for rule in rules:
        if not _RULE.fullmatch(rule):
            raise EngineError(PROTOCOL, f"spamd reply names a rule that cannot exist: {rule[:100]!r}")
    outcome = FOUND if spam.group(1) == b"True" else CLEAN
    return ScanResult(SpamdScanner.name, outcome, score=float(spam.group(2)), required=float(spam.group(3)),
                      rules=tuple(r.decode("ascii") for r in rules))
