"""spamd: the SPAMC protocol (SYMBOLS) over TCP or a unix socket.

SYMBOLS returns the score, spamd's own required score and the names of the rules that hit,
without sending the message back. Messages over the size limit are skipped, or only their
first bytes are sent, by setting (spamc itself skips anything over 500 KB).
"""
from __future__ import annotations

import io
import re
import socket

from . import (CLEAN, FOUND, PROTOCOL, SKIPPED, Deadline, EngineError, ScanResult, connect, run,
               words_before_hangup)

CHUNK = 64 * 1024
CHECK_TIMEOUT = 5.0          # seconds for PING
REPLY_LIMIT = 256 * 1024     # a SYMBOLS reply is a line of rule names; more than this is garbage

_STATUS = re.compile(rb"SPAMD/\d+\.\d+ +(\d+) +([^\r\n]*)")
_SPAM = re.compile(rb"(?im)^Spam: *(True|False|Yes|No) *; *(-?\d+(?:\.\d+)?) */ *(-?\d+(?:\.\d+)?)\s*$")
_RULE = re.compile(r"[A-Za-z0-9_.-]{1,100}")


class SpamdScanner:
    name = "spamd"

    def __init__(self, address, connect_timeout: float, timeout: float, size_limit: int,
                 oversize_action: str = "skip", user: str = ""):
        self.address, self.connect_timeout, self.timeout = address, connect_timeout, timeout
        self.size_limit, self.oversize_action, self.user = size_limit, oversize_action, user

    def scan(self, spool) -> ScanResult:
        return run(self.name, lambda: self._scan(spool))

    def _scan(self, spool) -> ScanResult:
        size = spool.stored
        if size > self.size_limit:
            if self.oversize_action == "skip":
                return ScanResult(self.name, SKIPPED, "size")
            size = self.size_limit
        return parse_reply(self._exchange("SYMBOLS", {}, size, lambda: spool.reader(size)))

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

    def _exchange(self, command: str, headers: dict[str, str], size: int, open_body) -> bytes:
        """One SPAMC request: `command`, `headers`, then `size` bytes read from `open_body()`;
        returns spamd's whole reply, within one deadline of spamd_timeout."""
        deadline = Deadline(self.timeout)
        sock = connect(self.address, self.connect_timeout, deadline)
        try:
            head = f"{command} SPAMC/1.5\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            head += f"Content-length: {size}\r\n" + (f"User: {self.user}\r\n" if self.user else "")
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
            while len(reply) <= REPLY_LIMIT:
                sock.settimeout(deadline.left())
                data = sock.recv(CHUNK)
                if not data:
                    break
                reply += data
        finally:
            sock.close()
        return reply

    def ping(self) -> str:
        """"" when spamd answers PONG, else what went wrong."""
        try:
            deadline = Deadline(min(self.timeout, CHECK_TIMEOUT))
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
    """Read a SPAMD/1.x reply to SYMBOLS; anything malformed is a protocol error."""
    check_status(reply)
    head, sep, body = reply.partition(b"\r\n\r\n")
    spam = _SPAM.search(head)
    if not spam or not sep:
        raise EngineError(PROTOCOL, f"spamd reply without a Spam header {reply[:100]!r}")
    score, required = float(spam.group(2)), float(spam.group(3))
    rules = tuple(r for r in body.decode("ascii", "replace").replace("\r\n", "").split(",")
                  if _RULE.fullmatch(r.strip()))
    outcome = FOUND if spam.group(1) in (b"True", b"Yes") else CLEAN
    return ScanResult(SpamdScanner.name, outcome, score=score, required=required,
                      rules=tuple(r.strip() for r in rules))
