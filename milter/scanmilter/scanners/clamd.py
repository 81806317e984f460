"""clamd: INSTREAM over its unix socket or TCP, through the `clamd` package's client.

The package's own instream() writes with send() (a partial write would corrupt the stream),
connects without a timeout and passes unexpected replies through; this client keeps the
package's connection classes and reply grammar and tightens those three points.
"""
from __future__ import annotations

import struct

import clamd as clamd_client

from . import CLEAN, FOUND, PROTOCOL, SKIPPED, Deadline, EngineError, ScanResult, connect, run

CHUNK = 64 * 1024   # INSTREAM chunk; clamd accepts chunks up to its StreamMaxLength


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

    def instream_reply(self, reader) -> str:
        self._init_socket()
        try:
            self._send(b"zINSTREAM\0")
            while chunk := reader.read(CHUNK):
                self._send(struct.pack("!L", len(chunk)) + chunk)
            self._send(struct.pack("!L", 0))
            self.clamd_socket.settimeout(self.deadline.left())
            reply = b""
            while not reply.endswith(b"\0") and len(reply) < 4096:
                data = self.clamd_socket.recv(4096)
                if not data:
                    break
                reply += data
            return reply.rstrip(b"\0").decode("utf-8", "replace").strip()
        finally:
            self._close_socket()


class ClamdScanner:
    name = "clamd"

    def __init__(self, address, connect_timeout: float, timeout: float, size_limit: int):
        self.address, self.connect_timeout = address, connect_timeout
        self.timeout, self.size_limit = timeout, size_limit

    def scan(self, spool) -> ScanResult:
        return run(self.name, lambda: self._scan(spool))

    def _scan(self, spool) -> ScanResult:
        if spool.stored > self.size_limit:
            return ScanResult(self.name, SKIPPED, "size")
        client = _Client(self.address, self.connect_timeout, Deadline(self.timeout))
        with spool.reader() as reader:
            reply = client.instream_reply(reader)
        return parse_reply(reply)


def parse_reply(reply: str) -> ScanResult:
    """Only an exact "stream: OK" is clean; "NAME FOUND" is a virus; anything else an error."""
    if reply == "stream: OK":
        return ScanResult(ClamdScanner.name, CLEAN)
    match = clamd_client.scan_response.match(reply)
    if match and match.group("status") == "FOUND" and match.group("virus"):
        return ScanResult(ClamdScanner.name, FOUND, viruses=(match.group("virus"),))
    if not reply:
        raise EngineError(PROTOCOL, "clamd closed the connection without a reply")
    raise EngineError(PROTOCOL, f"unexpected clamd reply {reply[:200]!r}")

