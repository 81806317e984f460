"""clamd: INSTREAM over its unix socket or TCP, through the `clamd` package's client.

The package's own instream() writes with send() (a partial write would corrupt the stream),
connects without a timeout and passes unexpected replies through; this client keeps the
package's connection classes and tightens those points: every send and every receive is
bounded by one deadline, and only a complete, NUL-terminated answer about the stream counts.
"""
from __future__ import annotations

import re
import struct
import time

import clamd as clamd_client

from . import (CLEAN, FOUND, LIMITS, PROTOCOL, SIZE, SKIPPED, Deadline, EngineError, ScanResult, connect,
               members, parse_client_socket, run, words_before_hangup)

CHUNK = 64 * 1024   # INSTREAM chunk; clamd accepts chunks up to its StreamMaxLength
REPLY_LIMIT = 4096   # bytes; clamd answers with one short line, anything longer is not clamd

_FOUND = re.compile(r"stream: (\S[^\0\r\n]*) FOUND")
# With AlertExceedsMax, clamd names the limit it stopped at (MaxFileSize, MaxScanSize, MaxRecursion,
# MaxFiles, MaxScanTime...): the content went unscanned past it, no virus was found
_LIMITS = re.compile(r"Heuristics\.Limits\.Exceeded(?:\.[A-Za-z]+)?")


class _Client(clamd_client.ClamdNetworkSocket):
    """The package's client, connected with a connect timeout and a total deadline."""

    def __init__(self, address, connect_timeout: float, deadline: Deadline):
        super().__init__(timeout=None)
        self.address, self.connect_timeout, self.deadline = address, connect_timeout, deadline

    def _init_socket(self):
        self.clamd_socket = connect(self.address, self.connect_timeout, self.deadline)

    def _send(self, data: bytes) -> None:
        self.clamd_socket.settimeout(self.deadline.left())
        self.clamd_socket.sendall(data)

    def _reply(self) -> str:
        """clamd's answer up to its NUL terminator. The deadline is checked before every receive:
        a server that sends its answer a byte at a time cannot stretch the timeout."""
        reply = b""
        while not reply.endswith(b"\0"):
            self.clamd_socket.settimeout(self.deadline.left())
            data = self.clamd_socket.recv(REPLY_LIMIT)
            if not data:
                if reply:
                    raise EngineError(PROTOCOL, f"clamd reply cut short: {reply[:200]!r}")
                raise EngineError(PROTOCOL, "clamd closed the connection without a reply")
            reply += data
            if len(reply) > REPLY_LIMIT:
                raise EngineError(PROTOCOL, f"clamd reply over {REPLY_LIMIT} bytes: {reply[:100]!r}")
        if b"\0" in reply[:-1]:
            raise EngineError(PROTOCOL, f"more than one clamd reply: {reply[:200]!r}")
        return reply[:-1].decode("utf-8", "replace").strip()

    def command(self, name: str) -> str:
        """A one-line command (PING, VERSION) and its reply."""
        self._init_socket()
        try:
            self._send(f"z{name}\0".encode())
            return self._reply()
        finally:
            self._close_socket()

    def instream_reply(self, reader) -> str:
        self._init_socket()
        try:
            try:
                self._send(b"zINSTREAM\0")
                while chunk := reader.read(CHUNK):
                    self._send(struct.pack("!L", len(chunk)) + chunk)
                self._send(struct.pack("!L", 0))
            except (BrokenPipeError, ConnectionResetError):
                said = words_before_hangup(self.clamd_socket).rstrip(b"\0").decode("utf-8", "replace").strip()
                raise EngineError(PROTOCOL, f"clamd hung up mid-stream: {said[:200]!r}" if said
                                  else "clamd hung up mid-stream") from None
            return self._reply()
        finally:
            self._close_socket()


def from_settings(cfg) -> ClamdScanner:
    # one server: the first member of a pool (scanners.from_settings builds each member apart)
    address = parse_client_socket(members(cfg.clamd_socket)[0])
    return ClamdScanner(address, cfg.clamd_connect_timeout, cfg.clamd_timeout,
                        cfg.clamd_size_limit, cfg.engine_check_timeout)


class ClamdScanner:
    name = "clamd"

    def __init__(self, address, connect_timeout: float, timeout: float, size_limit: int,
                 check_timeout: float | None = None):
        """check_timeout: seconds for PING and VERSION (engine_check_timeout); None: timeout."""
        self.address, self.connect_timeout = address, connect_timeout
        self.timeout, self.size_limit = timeout, size_limit
        self.check_timeout = timeout if check_timeout is None else min(timeout, check_timeout)

    def scan(self, spool) -> ScanResult:
        return run(self.name, lambda: self._scan(spool))

    def _scan(self, spool) -> ScanResult:
        if spool.stored > self.size_limit:
            return ScanResult(self.name, SKIPPED, SIZE)
        client = _Client(self.address, self.connect_timeout, Deadline(self.timeout))
        with spool.reader() as reader:
            reply = client.instream_reply(reader)
        return parse_reply(reply)

    def _client(self) -> _Client:
        return _Client(self.address, self.connect_timeout, Deadline(self.check_timeout))

    def ping(self) -> str:
        """"" when clamd answers PONG, else what went wrong."""
        try:
            reply = self._client().command("PING")
        except (EngineError, OSError) as e:
            return str(e) or type(e).__name__
        return "" if reply == "PONG" else f"unexpected reply {reply[:80]!r}"

    def version(self) -> tuple[int, float] | None:
        """(database version, database build time) from "ClamAV 1.4.6/27000/Tue Nov 24 09:30:00 2026"."""
        try:
            reply = self._client().command("VERSION")
        except (EngineError, OSError):
            return None
        parts = reply.split("/")
        if len(parts) < 3 or not parts[1].isdigit():
            return None
        try:
            built = time.mktime(time.strptime(parts[2].strip(), "%a %b %d %H:%M:%S %Y"))
        except ValueError:
            built = float("nan")
        return int(parts[1]), built


def parse_reply(reply: str) -> ScanResult:
    """Only an exact "stream: OK" is clean; "stream: NAME FOUND" is a virus, unless NAME is one of
    clamd's limit alerts (a skipped scan); anything else is an error."""
    if reply == "stream: OK":
        return ScanResult(ClamdScanner.name, CLEAN)
    match = _FOUND.fullmatch(reply)
    if match and _LIMITS.fullmatch(match.group(1)):
        return ScanResult(ClamdScanner.name, SKIPPED, LIMITS)
    if match:
        return ScanResult(ClamdScanner.name, FOUND, viruses=(match.group(1),))
    if not reply:
        raise EngineError(PROTOCOL, "clamd closed the connection without a reply")
    raise EngineError(PROTOCOL, f"unexpected clamd reply {reply[:200]!r}")

