"""Files encoded inside a plain text body, which mail clients show as attachments.

Before MIME, a file travelled inside the text: uuencode ("begin 644 NAME" ... "end"), its base64
form ("begin-base64 644 NAME" ... "===="), and on Usenet yEnc ("=ybegin ... name=NAME" ...
"=yend"). Thunderbird and Outlook still decode these in a text/plain part and offer the file
under its name, so each is a file here too: decoded as the text goes by and judged like an
attachment (by its name and its real type). Only the text's own bytes are looked at, line by
line; nothing is kept but the line being read and the file being decoded (a Blob).
"""
from __future__ import annotations

import binascii
import re
from typing import Callable, Protocol

from .parts import decoder

LINE_BYTES = 8 * 1024             # a longer line is no line of these encodings
_BEGIN = re.compile(rb"begin(-base64)? +[0-7]{1,4} +(.+?)[ \t]*$")
_YBEGIN = re.compile(rb"=ybegin .*?\bname=(.+?)[ \t]*$")
# where a file may start: only from such a line on is the text split into lines
_START = re.compile(rb"^(?:begin(?:-base64)? +[0-7]{1,4} +\S|=ybegin .*?\bname=)", re.M)
# yEnc: every byte is sent plus 42; "=" escapes the next one, sent plus 64 more
_YENC = bytes((i - 42) & 0xFF for i in range(256))
_YENC_ESCAPED = bytes((i - 106) & 0xFF for i in range(256))


class File(Protocol):
    def write(self, data: bytes) -> None: ...
    def close(self, problems: list[str]) -> None: ...


class Embedded:
    """Feed it a text part's decoded bytes; `open_file(name)` receives each embedded file."""

    def __init__(self, open_file: Callable[[str], File]):
        self.open_file = open_file
        self._rest = b""                 # the line not yet ended
        self._long = False               # the line being skipped is longer than LINE_BYTES
        self._file: File | None = None
        self._kind = ""                  # "uu", "base64" or "yenc" while a file is open
        self._decoder = None
        self._problems: list[str] = []

    def feed(self, data: bytes) -> None:
        data = self._rest + data
        if self._file is None:
            # the common case, ordinary text: nothing is looked at line by line before a line
            # that can begin a file
            cut = data.rfind(b"\n") + 1
            start = 0
            if self._long:                # the end of a line too long to matter
                start = data.find(b"\n") + 1
                self._long = start == 0
            m = _START.search(data, start, cut) if cut > start else None
            if m is None:
                self._rest = data[max(cut, start):] if not self._long else b""
                if len(self._rest) > LINE_BYTES:
                    self._rest, self._long = b"", True
                return
            data = data[m.start():]
        lines = data.split(b"\n")
        self._rest = lines.pop()
        for line in lines:
            if self._long:                # the end of a line too long to matter
                self._long = False
                continue
            self._line(line[:-1] if line.endswith(b"\r") else line)
        if len(self._rest) > LINE_BYTES:
            self._rest, self._long = b"", True
            if self._file is not None:
                self._end("a line too long for its encoding")

    def close(self) -> None:
        """The text ended: a file still open is judged on what it got."""
        if self._rest and not self._long:
            self._line(self._rest.rstrip(b"\r"))
        self._rest = b""
        if self._file is not None:
            self._end("the text ends before the encoded file does")

    # ---- one line

    def _line(self, line: bytes) -> None:
        if self._file is None:
            if line.startswith(b"begin"):
                m = _BEGIN.match(line)
                if m:
                    self._start("base64" if m.group(1) else "uu", m.group(2))
            elif line.startswith(b"=ybegin "):
                m = _YBEGIN.match(line)
                if m:
                    self._start("yenc", m.group(1))
            return
        if self._kind == "uu":
            if line.rstrip() == b"end":
                self._end()
                return
            if not line.strip():
                return                    # a2b_uu would make 32 zero bytes of it
            try:
                self._file.write(binascii.a2b_uu(line))
            except binascii.Error:
                # what uudecode accepts: the characters the length byte announces, padding ignored
                n = (line[:1] or b" ")[0] - 32 & 63
                try:
                    self._file.write(binascii.a2b_uu(line[:1 + (n + 2) // 3 * 4]))
                except binascii.Error:
                    self._end("bad uuencode line")
        elif self._kind == "base64":
            if line.rstrip() == b"====":
                self._file.write(self._decoder.final())
                self._end()
            else:
                self._file.write(self._decoder.feed(line))
        elif line.startswith(b"=yend"):
            self._end()
        elif not line.startswith((b"=ypart ", b"=ycrc")):
            self._file.write(_yenc(line))

    def _start(self, kind: str, raw_name: bytes) -> None:
        name = raw_name.decode("utf-8", "replace")
        self._kind, self._problems = kind, []
        self._decoder = decoder("base64") if kind == "base64" else None
        self._file = self.open_file(name)

    def _end(self, problem: str = "") -> None:
        file, self._file = self._file, None
        problems = self._problems + ([f"{self._kind} encoded file: {problem}"] if problem else [])
        if self._decoder is not None:
            problems += self._decoder.problems
        self._decoder = None
        file.close(problems)


def _yenc(line: bytes) -> bytes:
    parts = line.split(b"=")
    out = [parts[0].translate(_YENC)]
    for p in parts[1:]:
        if p:
            out.append(p[:1].translate(_YENC_ESCAPED) + p[1:].translate(_YENC))
    return b"".join(out)
