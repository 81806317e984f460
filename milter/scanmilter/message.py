"""Connection (one SMTP session) and Message (one transaction), with the bounded spool.

Nothing here does network I/O. The handler feeds the callbacks' data in; the pipeline
and the scanners read the spool back out through independent readers.

SECURITY: everything here came from the SMTP client, through Postfix, and is kept as bytes:
nothing is decoded or interpreted but header names. Memory is bounded by spool_memory_limit
(the rest goes to an unnamed 0600 file that vanishes with the process) and what is kept by
message_size_limit, header_count_limit and verdict_header_limit; past a limit the message is
marked, never cut silently and passed as whole.
"""
from __future__ import annotations

import io
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

from .policy import VERDICT_HEADER_PREFIXES
from .scancache import Fingerprint
from .scanners import Origin


class Spool:
    """The message as received (header lines, blank line, body), bounded in memory.

    Bytes stay in memory up to `memory_limit`; past it they move to a private,
    unnamed temporary file (O_TMPFILE where the kernel has it, so nothing is ever
    visible in the directory). Past `size_limit` bytes are counted but not stored, and
    the spool is marked `oversize`: the sender's data is consumed either way, and what
    to do with an oversize message is decided at end of message.
    """

    def __init__(self, memory_limit: int, size_limit: int, directory: str | None = None):
        self.memory_limit = memory_limit
        self.size_limit = size_limit
        self.directory = directory
        self.received = 0          # bytes offered, stored or not
        self.stored = 0            # bytes kept
        self.oversize = False
        self._memory = bytearray()
        self._file = None          # raw unbuffered file once rolled over

    def write(self, data: bytes) -> None:
        self.received += len(data)
        room = self.size_limit - self.stored
        if len(data) > room:
            self.oversize = True
            data = data[:max(room, 0)]
        if not data:
            return
        if self._file is None and self.stored + len(data) > self.memory_limit:
            self._rollover()
        if self._file is None:
            self._memory += data
        else:
            self._file.write(data)
        self.stored += len(data)

    def _rollover(self) -> None:
        # TemporaryFile: O_TMPFILE or unlinked at once, mode 0600, in our own directory.
        self._file = tempfile.TemporaryFile(dir=self.directory, buffering=0)
        self._file.write(self._memory)
        self._memory = bytearray()

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def reader(self, limit: int | None = None) -> io.RawIOBase:
        """An independent reader from the start, at most `limit` bytes.

        Several scanners read the same spool at the same time; each gets its own
        position (pread on the shared descriptor), so no copy of a large message is made.
        """
        size = self.stored if limit is None else min(limit, self.stored)
        if self._file is None:
            return io.BytesIO(bytes(self._memory[:size]))
        return _PReader(self._file.fileno(), size)

    def getvalue(self) -> bytes:
        with self.reader() as r:
            return r.read()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._memory = bytearray()


class _PReader(io.RawIOBase):
    """Read-only view of the first `size` bytes of a file descriptor, own offset."""

    def __init__(self, fd: int, size: int):
        # A descriptor of our own: an engine thread still reading after its deadline
        # must never read whatever file later reuses the spool's descriptor number.
        self._fd, self._size, self._pos = os.dup(fd), size, 0

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        want = min(len(buf), self._size - self._pos)
        if want <= 0:
            return 0
        data = os.pread(self._fd, want, self._pos)
        buf[:len(data)] = data
        self._pos += len(data)
        return len(data)


@dataclass(frozen=True)
class Seen:
    """A header of the message as received: name, 1-based index among its name, raw value."""
    name: str
    index: int
    value: bytes

    def text(self) -> str:
        return self.value.decode("utf-8", "replace").replace("\r\n", "\n").strip()


@dataclass
class Connection:
    """What Postfix told us about one SMTP session."""
    client_address: str = ""
    client_name: str = ""
    daemon_name: str = ""
    hostname: str = ""          # our own name, Postfix's macro j
    helo: str = ""              # as the client gave it, or "" before HELO/EHLO
    messages: int = 0


@dataclass
class Message:
    """One transaction: MAIL FROM up to end of message or abort."""
    sender: str
    spool: Spool
    auth_user: str = ""
    policy: object = None            # the policy in force when the transaction began
    recipients: list[str] = field(default_factory=list)
    raw_recipients: dict[str, str] = field(default_factory=dict)   # address -> as Postfix gave it
    queue_id: str = ""
    # headers whose values the policy needs (verdict headers to strip, rewrite targets, Subject)
    seen: list[Seen] = field(default_factory=list)
    header_count: int = 0
    started: float = field(default_factory=time.monotonic)
    fingerprint: Fingerprint | None = None   # for the scan cache, when it is on
    origin: Origin = field(default_factory=Origin)   # where it came from, for the engines
    # Header caps (header_count_limit, verdict_header_limit; None: none, for `explain`). Past one,
    # nothing more is kept and `over_limit` names the setting: the message is refused unscanned.
    header_limit: int | None = None
    verdict_limit: int | None = None
    verdict_count: int = 0
    over_limit: str = ""
    _counts: dict[str, int] = field(default_factory=dict)

    def add_recipient(self, raw: str) -> None:
        address = raw.strip().strip("<>")
        self.recipients.append(address)
        self.raw_recipients[address] = raw

    def add_header(self, name: str, value: bytes, keep: Callable[[str], bool]) -> None:
        """Record one header exactly as Postfix passed it (value with its leading space)."""
        self.header_count += 1
        self.spool.write(name.encode("ascii", "replace") + b":" + value + b"\r\n")
        key = name.lower()
        if not self.over_limit:
            self.verdict_count += key.startswith(VERDICT_HEADER_PREFIXES)
            if self.header_limit is not None and self.header_count > self.header_limit:
                self.over_limit = "header_count_limit"
            elif self.verdict_limit is not None and self.verdict_count > self.verdict_limit:
                self.over_limit = "verdict_header_limit"
            if self.over_limit:             # memory stays bounded however many more arrive
                self.seen.clear()
                self._counts.clear()
        if self.over_limit:                 # the spool goes on, within its own size limit
            return
        index = self._counts[key] = self._counts.get(key, 0) + 1
        if keep(key):
            self.seen.append(Seen(name, index, value))
        if self.fingerprint is not None:
            self.fingerprint.header(name, value)      # as sent: clamd types mail by the names' exact bytes

    def end_headers(self) -> None:
        self.spool.write(b"\r\n")

    def add_body(self, chunk: bytes) -> None:
        self.spool.write(chunk)
        if self.fingerprint is not None:
            self.fingerprint.body(chunk)

    @property
    def size(self) -> int:
        return self.spool.received

    def close(self) -> None:
        self.spool.close()
