"""A streaming MIME walker over the spooled message.

The message is read once, front to back, in blocks of READ_BYTES; nothing holds a whole part.
Body data is scanned block-wise for a line that starts with "--" (only there can a boundary
delimiter be), so a 40 MB base64 attachment costs a few hundred block searches rather than half
a million line reads. Each leaf part is decoded (base64, quoted-printable, or as is) on the fly
into a sink that the caller provides (walker.py keeps its first bytes, and the whole file only
when a check needs it).

What it reports, never raising on the sender's input: malformed structure (a multipart without
a boundary, a boundary that never comes, a multipart not closed, parts after the closing
boundary, nesting past mime_nesting_limit, duplicate Content-* fields, header lines that are no
header field) as message problems; broken encodings (bad base64, an unknown transfer encoding)
as problems of the part. A multipart whose boundary never appears is still a file: its body is
walked as one leaf, so a broken structure never reads as "no attachment". An attached message
sent in base64 or quoted-printable (RFC 2046 forbids it; mail clients open it all the same) is
decoded to a temporary file and walked like any other, and reported.

Part numbers follow IMAP (RFC 3501): the body of a single-part message is "1"; the parts of a
multipart are "1", "2", ...; inside part 2, "2.1", "2.2"; the body of an attached message/rfc822
part 3 is "3.1" (or its parts "3.1", "3.2" when it is a multipart).
"""
from __future__ import annotations

import binascii
import functools
import re
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Protocol

from . import names as N
from .facts import CONTENT_TYPE, DISPOSITION, Name
from .limits import Budget, Stop

READ_BYTES = 64 * 1024
# A delimiter line is "--" boundary (at most 70 characters) ["--"] and transport padding; a line
# that has not ended within this many bytes is not one.
DELIMITER_BYTES = 1024
_LOOKAHEAD = 4 * DELIMITER_BYTES
_WANTED = ("content-type", "content-disposition", "content-transfer-encoding")
_IDENTITY = ("", "7bit", "8bit", "binary")
KNOWN_ENCODINGS = _IDENTITY + ("base64", "quoted-printable")
_WHITESPACE = b" \t\r\n"
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/=]")
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+$")      # printable ASCII but ":" (RFC 5322)


@dataclass
class Part:
    """What a leaf part's headers say."""
    path: str
    declared_type: str = "text/plain"
    disposition: str = ""
    names: tuple[Name, ...] = ()
    problems: list[str] = field(default_factory=list)
    encoding: str = ""                  # Content-Transfer-Encoding, lower case ("" when none)


class Sink(Protocol):
    def write(self, data: bytes) -> None: ...
    def close(self, problems: list[str]) -> None: ...
    def discard(self) -> None: ...


# ---- decoders --------------------------------------------------------------------------------

class _Identity:
    def __init__(self):
        self.problems: list[str] = []

    def feed(self, data: bytes) -> bytes:
        return data

    def final(self) -> bytes:
        return b""


class _Base64(_Identity):
    """Lenient as mail clients are (characters outside the alphabet skipped, streams that
    follow a padding decoded too), and says where the data was not clean base64."""

    def __init__(self):
        super().__init__()
        self._rest = b""

    def _note(self, problem: str) -> None:
        if problem not in self.problems:
            self.problems.append(problem)

    def feed(self, data: bytes) -> bytes:
        data = self._rest + data.translate(None, _WHITESPACE)
        if _NOT_BASE64.search(data):
            self._note("bad base64: characters outside the alphabet")
            data = _NOT_BASE64.sub(b"", data)
        out = bytearray()
        # a run of "=" ends one encoded stream; anything after it is another one
        while (i := data.find(b"=")) != -1:
            j = i
            while j < len(data) and data[j] == 0x3D:
                j += 1
            if j == len(data):
                break                       # the padding may go on in the next block
            self._note("bad base64: data after the padding")
            out += self._decode(data[:j])
            data = data[j:]
        i = data.find(b"=")
        cut = i - i % 4 if i != -1 else len(data) - len(data) % 4
        out += self._decode(data[:cut])
        self._rest = data[cut:]
        return bytes(out)

    def _decode(self, data: bytes) -> bytes:
        if not data:
            return b""
        try:
            return binascii.a2b_base64(data)
        except binascii.Error:
            self._note("bad base64: wrong padding or length")
            stripped = data.rstrip(b"=")
            stripped = stripped[:len(stripped) - 1] if len(stripped) % 4 == 1 else stripped
            try:
                return binascii.a2b_base64(stripped + b"=" * (-len(stripped) % 4))
            except binascii.Error:
                return b""

    def final(self) -> bytes:
        rest, self._rest = self._rest, b""
        if rest and len(rest) % 4:
            self._note("bad base64: truncated")
        return self._decode(rest)


class _QuotedPrintable(_Identity):
    def __init__(self):
        super().__init__()
        self._rest = b""

    def feed(self, data: bytes) -> bytes:
        data = self._rest + data
        # an escape ("=XX" or the soft break "=\r\n") may be split between two blocks
        k = data.rfind(b"=", max(len(data) - 2, 0))
        self._rest, data = (data[k:], data[:k]) if k != -1 else (b"", data)
        return binascii.a2b_qp(data)

    def final(self) -> bytes:
        rest, self._rest = self._rest, b""
        return binascii.a2b_qp(rest)


def decoder(encoding: str) -> _Identity:
    if encoding == "base64":
        return _Base64()
    if encoding == "quoted-printable":
        return _QuotedPrintable()
    d = _Identity()
    if encoding not in _IDENTITY:
        d.problems.append(f"unknown Content-Transfer-Encoding {N.text(encoding.encode('latin-1'))[:40]!r}")
    return d


# ---- the block scanner -----------------------------------------------------------------------

def _match(line: bytes, stack: list[bytes]) -> tuple[int, bool] | None:
    """Whether `line` is a delimiter of a boundary in `stack` (innermost first)."""
    if not line.startswith(b"--"):
        return None
    body = line[2:].rstrip(b"\r\n").rstrip(b" \t")
    for i in range(len(stack) - 1, -1, -1):
        b = stack[i]
        if body == b:
            return i, False
        if body == b + b"--":
            return i, True
    return None


class _Scanner:
    def __init__(self, reader, budget: Budget):
        self._reader = reader
        self._budget = budget
        self._buf = bytearray()
        self._eof = False
        self.line_start = True          # whether the buffer's first byte begins a line

    def _fill(self, want: int) -> None:
        while len(self._buf) < want and not self._eof:
            self._budget.check_time()
            chunk = self._reader.read(READ_BYTES)
            if chunk:
                self._buf += chunk
            else:
                self._eof = True

    def at_end(self) -> bool:
        self._fill(1)
        return not self._buf

    def unread(self, line: bytes) -> None:
        self._buf[:0] = line
        self.line_start = True

    def line(self, limit: int) -> tuple[bytes, bool]:
        """Up to and including the next LF, at most `limit` bytes; (bytes, whether the line ended)."""
        while True:
            i = self._buf.find(b"\n", 0, limit)
            if i != -1 or len(self._buf) >= limit or self._eof:
                n = i + 1 if i != -1 else min(limit, len(self._buf))
                out = bytes(self._buf[:n])
                del self._buf[:n]
                self.line_start = i != -1 or (self._eof and not self._buf)
                return out, self.line_start
            self._fill(len(self._buf) + READ_BYTES)

    def body(self, stack: list[bytes], emit: Callable[[bytes], None]) -> tuple[int, bool] | None:
        """Feed everything up to the next delimiter line of a boundary in `stack` to `emit`, and
        consume that line; return (index of its boundary in `stack`, whether it closes), or None
        at the end of the data. The line break before a delimiter belongs to the delimiter (RFC 2046),
        so the last line break seen is held back until the next line proves not to be one.

        Delimiter lines are found by one compiled pattern of the boundaries in `stack`, searched
        over the whole buffer at C speed: a body made of lines that merely start with "--" (or
        with "--" and a boundary) costs no more than any other text."""
        held = b""
        buf = self._buf
        at_start, inside = _delimiters(tuple(stack)) if stack else (None, None)
        while True:
            if len(buf) < _LOOKAHEAD:
                self._fill(_LOOKAHEAD)       # from here on: at least _LOOKAHEAD bytes, or the end of the data
            if not buf:
                emit(held)
                return None
            if stack and self.line_start and buf[:2] == b"--":
                m = at_start.match(buf)
                found = _match(m.group(), stack) if m is not None else None
                if found is not None:
                    del buf[:m.end()]
                    self.line_start = True
                    return found
            cut = len(buf)
            if stack:
                for m in inside.finditer(buf):
                    if not m.group().endswith(b"\n") and not self._eof:
                        cut = m.start() + 1          # may be a delimiter once more data comes
                        break
                    if _match(m.group(1), stack) is not None:
                        cut = m.start() + 1          # up to and with the line break before it
                        break
                else:
                    if not self._eof:
                        # keep the last line if it could be a delimiter cut off by the end of the buffer
                        k = buf.rfind(b"\n", max(len(buf) - _DELIMITER_LINE, 0))
                        cut = k + 1 if k != -1 else len(buf) - _DELIMITER_LINE
            chunk = bytes(buf[:cut])
            del buf[:cut]
            self.line_start = chunk.endswith(b"\n")
            eol = b"\r\n" if chunk.endswith(b"\r\n") else b"\n" if self.line_start else b""
            emit(held + chunk[:len(chunk) - len(eol)])
            held = eol


# The longest delimiter line: "--", a boundary (at most DELIMITER_BYTES // 2, see Walker._entity),
# "--", transport padding and carriage returns (at most DELIMITER_BYTES each), the line feed.
_DELIMITER_LINE = 2 + DELIMITER_BYTES // 2 + 2 + 2 * DELIMITER_BYTES + 1


@functools.lru_cache(maxsize=256)
def _delimiters(stack: tuple[bytes, ...]) -> tuple[re.Pattern, re.Pattern]:
    """Patterns of a delimiter line of any boundary in `stack`: at the start of the buffer, and
    after a line feed inside it (group 1: the line). Padding is bounded and possessive, so no
    input makes the search go back over what it has read."""
    line = (rb"--(?:" + b"|".join(re.escape(b) for b in stack) + rb")(?:--)?"
            + rb"[ \t]{0,%d}+\r{0,%d}+(?:\n|\Z)" % (DELIMITER_BYTES, DELIMITER_BYTES))
    return re.compile(line), re.compile(rb"\n(" + line + rb")")


# ---- headers ---------------------------------------------------------------------------------

@dataclass
class _Headers:
    fields: dict[str, list[list[bytes]]] = field(default_factory=dict)   # wanted name -> each field's lines
    problems: list[str] = field(default_factory=list)
    terminator: object = None          # a delimiter met before the blank line
    ended: bool = False                # the blank line (or the end of data) was reached


def _unfold(lines: list[bytes]) -> bytes:
    return b"".join(lines).replace(b"\r\n", b"").replace(b"\n", b"").replace(b"\r", b"")


class Walker:
    """Walks one message; `open_leaf(part)` gives the sink for each leaf's decoded content."""

    def __init__(self, reader, budget: Budget, open_leaf: Callable[[Part], Sink], directory: str | None = None):
        self.scan = _Scanner(reader, budget)
        self.directory = directory          # where decoded attached messages are kept while walked
        self.budget = budget
        self.limits = budget.limits
        self.open_leaf = open_leaf
        self.problems: list[str] = []

    def _problem(self, text: str) -> None:
        if text not in self.problems:
            self.problems.append(text)

    def walk(self) -> None:
        """Raises limits.Stop when a limit of the whole walk is reached (the caller reports it)."""
        self._entity("", True, 0, [], "text/plain")

    def _headers(self, stack: list[bytes]) -> _Headers:
        h = _Headers()
        limit = self.limits.mime_header_limit
        kept = 0
        current: list[bytes] | None = None     # the wanted field being unfolded
        while True:
            if self.scan.at_end():
                h.ended = True
                return h
            line, whole = self.scan.line(limit)
            if not whole:                      # longer than the limit: the rest of it is dropped
                while not self.scan.line(limit)[1] and not self.scan.at_end():
                    pass
                if current is not None or line.split(b":", 1)[0].strip().lower().decode("latin-1") in _WANTED:
                    h.problems.append("a Content-* header longer than mime_header_limit")
                current = None
                continue
            if line in (b"\r\n", b"\n"):
                h.ended = True
                return h
            found = _match(line, stack) if stack else None
            if found is not None:
                h.terminator = found
                return h
            if line[:1] in (b" ", b"\t"):
                if current is not None:
                    kept += len(line)
                    if kept > limit:
                        h.problems.append("Content-* headers longer than mime_header_limit")
                        current = None
                    else:
                        current.append(line)
                continue
            name, colon, value = line.partition(b":")
            name = name.rstrip(b" \t")
            if not colon or not _FIELD_NAME.match(name):
                # as mail clients do: the body starts here, without its blank line
                h.problems.append("a line in the header block that is no header field")
                self.scan.unread(line)
                h.ended = True
                return h
            key = name.decode("ascii").lower()
            current = None
            if key in _WANTED:
                kept += len(value)
                if kept > limit:
                    h.problems.append("Content-* headers longer than mime_header_limit")
                    continue
                current = [value]
                h.fields.setdefault(key, []).append(current)      # unfolded below
        # not reached

    def _entity(self, number: str, is_message: bool, level: int, stack: list[bytes], default: str):
        """One entity: the body of a message (`is_message`; `number` is the message's own, "" at
        the top) or a part of a multipart (`number` is its own). Returns the terminator that ended it."""
        self.budget.parts += 1
        if self.budget.parts > self.limits.mime_part_limit:
            self.budget.reached("mime_part_limit")
            raise Stop("mime_part_limit")
        h = self._headers(stack)
        fields = {k: [_unfold(v) for v in vs] for k, vs in h.fields.items()}
        for k, vs in fields.items():
            if len(vs) > 1:
                self._problem(f"{len(vs)} {k.title()} fields in one part")
        path = (f"{number}.1" if number else "1") if is_message else number
        where = f"part {number or path}"
        raw_type = fields.get("content-type", [b""])[0]
        ctype, _pairs, problems = N.split_value(raw_type.decode("latin-1")) if raw_type else (default, [], [])
        if raw_type and not re.fullmatch(r"[\w.+-]+/[\w.+-]+", ctype):
            problems.append(f"invalid Content-Type {ctype[:60]!r}")
        problems += h.problems
        if h.terminator is not None:
            self._problem(f"{where}: headers run into a boundary, no body")
            self._leaf(path, fields, ctype, problems, stack, empty=True)
            return h.terminator
        encoding = N.split_value(fields.get("content-transfer-encoding", [b""])[0].decode("latin-1"))[0]
        nested = ctype.startswith("multipart/") or ctype in ("message/rfc822", "message/global")
        if nested and level >= self.limits.mime_nesting_limit:
            self._problem(f"parts nested deeper than mime_nesting_limit ({self.limits.mime_nesting_limit})")
        elif ctype.startswith("multipart/"):
            boundaries = self._params(fields, "content-type", "boundary", raw=True)
            if not boundaries:
                self._problem(f"{where}: multipart without a boundary")
            elif len(boundaries[0]) > DELIMITER_BYTES // 2:
                self._problem(f"{where}: boundary too long to be found")
            else:
                child_default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
                return self._multipart(number, path, level + 1, stack, boundaries[0], fields, ctype, problems,
                                       child_default)
        elif nested and encoding in _IDENTITY:
            # an attached message: its body is numbered under this part
            return self._entity(path, True, level + 1, stack, "text/plain")
        elif nested and encoding in ("base64", "quoted-printable"):
            # RFC 2046 allows only 7bit, 8bit and binary here, but mail clients decode the message
            # and show its attachments: so is it walked
            self._problem(f"part {path}: {ctype} part with {encoding} transfer encoding")
            return self._encoded_message(path, level + 1, stack, encoding)
        elif nested:
            problems.append(f"{ctype} part with {encoding} transfer encoding (not looked into)")
        return self._leaf(path, fields, ctype, problems, stack)

    def _encoded_message(self, path: str, level: int, stack: list[bytes], encoding: str):
        """An attached message sent in base64 or quoted-printable: decoded into an unnamed
        temporary file (never whole in memory) and walked from there, numbered under `path`.
        Each level decodes to at most the size of its input, so the files stay bounded."""
        d = decoder(encoding)
        with tempfile.TemporaryFile(dir=self.directory) as decoded:
            term = self.scan.body(stack, lambda data: decoded.write(d.feed(data)))
            decoded.write(d.final())
            decoded.seek(0)
            inner = Walker(decoded, self.budget, self.open_leaf, self.directory)
            inner.problems = self.problems
            inner._entity(path, True, level, [], "text/plain")
            for problem in d.problems:
                self._problem(f"part {path}: {problem}")
        return term

    def _params(self, fields, header: str, param: str, raw: bool = False) -> list:
        out = []
        for value in fields.get(header, []):
            _main, pairs, _problems = N.split_value(value.decode("latin-1") if raw else N.text(value))
            values, _ = N.params(pairs, param)
            out += [v.encode("latin-1", "replace") if raw else v for v in values]
        return out

    def _names(self, fields) -> tuple[tuple[Name, ...], list[str]]:
        found: list[Name] = []
        problems: list[str] = []
        for header, param, source in (("content-disposition", "filename", DISPOSITION),
                                      ("content-type", "name", CONTENT_TYPE)):
            for value in fields.get(header, []):
                _main, pairs, _ = N.split_value(N.text(value))
                values, more = N.params(pairs, param)
                problems += more
                found += [N.normalise(v, source) for v in values]
        distinct = {}
        for n in found:
            distinct.setdefault(n.sent, n)
        return tuple(distinct.values()), problems

    def _leaf(self, path: str, fields, ctype: str, problems: list[str], stack: list[bytes], empty: bool = False):
        names, more = self._names(fields)
        disposition = N.split_value(N.text(fields.get("content-disposition", [b""])[0]))[0]
        encoding = N.split_value(fields.get("content-transfer-encoding", [b""])[0].decode("latin-1"))[0]
        part = Part(path, ctype, disposition, names, list(dict.fromkeys(problems + more)), encoding)
        d = decoder(encoding)
        sink = self.open_leaf(part)
        term = None
        try:
            if not empty:
                term = self.scan.body(stack, lambda data: sink.write(d.feed(data)))
            sink.write(d.final())
        finally:
            sink.close(part.problems + d.problems)
        return term

    def _multipart(self, number, path, level, stack, boundary, fields, ctype, problems, child_default):
        where = f"part {number or 'message'}"
        if boundary in stack:
            self._problem(f"{where}: a nested multipart reuses an enclosing boundary")
        inner = stack + [boundary]
        ours = len(stack)
        # The preamble: ignored by mail clients once a delimiter comes. If none ever does, the
        # whole body is one leaf, reported malformed.
        names, more = self._names(fields)
        preamble = self.open_leaf(Part(path, ctype, "", names, problems + more))
        term = self.scan.body(inner, preamble.write)
        if term is None or term[0] != ours:
            self._problem(f"{where}: the multipart boundary never comes")
            preamble.close(problems + more + ["multipart boundary not found"])
            return term
        preamble.discard()
        count = 0
        while True:
            while term == (ours, False):
                count += 1
                term = self._entity(f"{number}.{count}" if number else str(count), False, level, inner, child_default)
            if term is None:
                self._problem(f"{where}: multipart not closed")
                return None
            if term[0] != ours:
                self._problem(f"{where}: multipart not closed before an enclosing boundary")
                return term
            if count == 0:
                self._problem(f"{where}: multipart without parts")
            # closed; the epilogue runs to the enclosing boundary. A delimiter of ours there is a
            # part that some clients show and others do not: walked too, and reported.
            term = self.scan.body(inner, lambda data: None)
            if term is not None and term[0] == ours:
                self._problem(f"{where}: parts after the closing boundary")
                continue
            return term
