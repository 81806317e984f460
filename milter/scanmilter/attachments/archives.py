"""Archives read member by member through libarchive, within the walk's budget.

libarchive (Debian's libarchive13, the library of bsdtar) is used through libarchive-c, a thin
ctypes binding: one library reads zip, 7z, RAR 4 and 5, CAB, ISO 9660, tar and cpio, compressed
with gzip, bzip2, xz, zstd or lz4, streaming each member in blocks of our size, and tells
encrypted entries apart. Debian's security updates of the library apply to us. Python's own
zipfile and tarfile read two of those formats; the pure-Python 7z and RAR readers are slow and
memory hungry, and RAR ones call an external unrar.

Bounded by the walk's Limits: members listed (archive_member_limit) and bytes unpacked
(archive_expansion_limit) across all archives of the message, unpacked bytes per byte of archive
(archive_ratio_limit, once past archive_ratio_floor), depth (archive_depth_limit, decided by the
caller) and time (attachment_timeout, checked between blocks). Every member is read through,
never skipped: skipping inside a solid or compressed stream unpacks just the same, only
without being counted.

SECURITY: libarchive parses hostile bytes in our process. Only the formats and filters listed
here are enabled: never mtree (its entries name files on our own disk, which the reader opens)
and never a filter that runs an external program (lrzip, lzop, grzip; and any other that
libarchive was built without and would run as a program): FILTERS keeps only those that
register without a warning. Members are never written to disk under their names: a member
that must be read whole (a nested archive, an OLE file) goes to an unnamed temporary file.
"""
from __future__ import annotations

import ctypes
import logging
import re
import struct
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import libarchive
from libarchive import ffi
from libarchive.read import ArchiveRead

from . import office
from .blob import Blob
from .facts import ENCRYPTED, LIMIT, MALFORMED, UNREADABLE, FileBuilder
from .limits import Budget

FORMATS = ("zip", "7zip", "rar", "rar5", "cab", "iso9660", "tar", "cpio", "lha", "xar", "ar")
_WANTED_FILTERS = ("gzip", "bzip2", "xz", "lzma", "lzip", "zstd", "lz4", "compress")
BLOCK = 64 * 1024

_lib = ffi.libarchive
_is_encrypted = _lib.archive_entry_is_encrypted
_is_encrypted.argtypes, _is_encrypted.restype = [ctypes.c_void_p], ctypes.c_int
_setup_lock = threading.Lock()
_filters: tuple[str, ...] | None = None
_local = threading.local()


class _Warnings(logging.Filter):
    """libarchive-c logs libarchive's warnings (ARCHIVE_WARN: a wrong size, a name it could not
    convert). For an archive being read here they are facts about the sender's archive, not log
    lines: they are collected for it and kept out of the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        notes = getattr(_local, "notes", None)
        if notes is None:
            return True
        if len(notes) < 5:
            notes.append(re.sub(r"\s+", " ", record.getMessage()).strip()[:200])
        return False


logging.getLogger("libarchive").addFilter(_Warnings())


def filters() -> tuple[str, ...]:
    """The decompression filters libarchive runs in-process (registered with ARCHIVE_OK)."""
    global _filters
    with _setup_lock:
        if _filters is None:
            usable = []
            for name in _WANTED_FILTERS:
                p = ffi.read_new()
                try:
                    support = getattr(_lib, f"archive_read_support_filter_{name}", None)
                    if support is not None:
                        support.argtypes, support.restype = [ctypes.c_void_p], ctypes.c_int
                        if support(p) == 0:
                            usable.append(name)
                finally:
                    ffi.read_free(p)
            _filters = tuple(usable)
        return _filters


def _support(p, names: tuple[str, ...]) -> None:
    for name in names:
        try:
            ffi.get_read_format_function(name)(p)
        except ValueError:        # a format this libarchive lacks
            pass


@dataclass
class Member:
    """One member, read: its path in the archive, its content, and what was in the way."""
    name: str
    blob: Blob
    encrypted: bool = False
    problem: tuple[str, str] | None = None     # (kind, detail) when its data could not be read
    unread: bool = False                       # known by name only (a zip's central directory)


def _error(e: Exception) -> str:
    text = getattr(e, "msg", None) or str(e)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return re.sub(r"\s+", " ", str(text)).strip()[:200] or type(e).__name__


def _encryption_error(text: str) -> bool:
    return bool(re.search(r"encrypt|passphrase|password", text, re.I))


def _format(p) -> str:
    name = ffi.format_name(p)
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else (name or "")


def members(blob: Blob, facts: FileBuilder, budget: Budget, raw_name: str | None,
            new_blob: Callable[[str], Blob]) -> Iterator[Member]:
    """The members of the archive in `blob`, each read into `new_blob(name)` before it is yielded
    (the caller judges it, may open it as an archive in turn, and closes its blob). Notes on
    `facts` the format, the member count, encryption, macros and the problems met. `raw_name`:
    read a compressed single file as one member of that name (content libmagic calls compressed).

    A zip is listed twice: by libarchive, which names each member by its local header, and by
    its central directory, which is what Windows Explorer and 7-Zip list and extract by. A name
    the central directory gives and libarchive did not (the two disagree, or libarchive stopped
    at a limit or an error before that member) is yielded as a member of that name that was not
    read (`Member.unread`), so that every name a recipient can see is judged."""
    listed: list[str] = []
    stopped = yield from _listing(blob, facts, budget, raw_name, new_blob, listed)
    if raw_name is None and (facts.archive_format.upper().startswith("ZIP") or not facts.archive_format):
        yield from _central_members(blob, facts, budget, new_blob, listed, stopped)


def _listing(blob: Blob, facts: FileBuilder, budget: Budget, raw_name: str | None,
             new_blob: Callable[[str], Blob], listed: list[str]) -> Iterator[Member]:
    """libarchive's listing (see `members`); returns (kind, detail) when it stopped before the
    end of the archive, else None. The names of the members it yields are added to `listed`."""
    limits = budget.limits
    stopped = None
    p = ffi.read_new()
    keep = None
    outer_notes, notes = getattr(_local, "notes", None), []
    _local.notes = notes            # nested archives are read while this one waits: each has its own
    try:
        for name in filters():
            ffi.get_read_filter_function(name)(p)
        _support(p, FORMATS + (("raw",) if raw_name is not None else ()))
        fd = blob.fd()
        if fd is not None:
            ffi.read_open_fd(p, fd, BLOCK)
        else:
            keep = blob.buffer()
            ffi.read_open_memory(p, ctypes.cast(keep, ctypes.c_void_p), len(keep))
        produced = 0
        for entry in ArchiveRead(p):
            budget.check_time()
            if budget.closed:           # reached while a member of this one was being read
                facts.problem(LIMIT, budget.closed)
                return LIMIT, budget.closed
            facts.archive_format = facts.archive_format or _format(p)
            name = entry.pathname
            name = name.decode("utf-8", "replace") if isinstance(name, bytes) else (name or "")
            if raw_name is not None and facts.archive_format == "raw":
                name = raw_name
            listed.append(name)
            if entry.isdir:               # no content of its own
                continue
            budget.members += 1
            if budget.members > limits.archive_member_limit:
                facts.problem(LIMIT, budget.reached("archive_member_limit"))
                budget.closed = "archive_member_limit"
                return LIMIT, "archive_member_limit"
            facts.members += 1
            member = Member(name, new_blob(name), bool(_is_encrypted(entry._entry_p)))
            stop = ""
            try:
                if not entry.isreg:
                    # a link (or a device): Windows Explorer and 7-Zip on Windows know no Unix
                    # modes and write a file of this name holding the link's target
                    target = entry.linkpath or ""
                    member.blob.write(target.encode("utf-8", "surrogateescape") if isinstance(target, str)
                                      else target)
                elif not member.encrypted:
                    for block in entry.get_blocks(BLOCK):
                        member.blob.write(block)
                        produced += len(block)
                        budget.expanded += len(block)
                        if budget.expanded > limits.archive_expansion_limit:
                            stop = budget.closed = "archive_expansion_limit"
                        elif produced > max(limits.archive_ratio_floor, limits.archive_ratio_limit * blob.size):
                            stop = "archive_ratio_limit"
                        if stop:
                            break
                        budget.check_time()
            except libarchive.ArchiveError as e:
                text = _error(e)
                if _encryption_error(text):
                    member.encrypted = True
                else:
                    member.problem = (UNREADABLE, text)
            except BaseException:           # the walk's time is up (limits.Stop), or worse
                member.blob.close()
                raise
            member.blob.finish()
            if stop:
                # the member is still judged (by its name and first bytes), but not read further
                member.problem = (LIMIT, stop)
                facts.problem(LIMIT, budget.reached(stop))
            if member.encrypted:
                facts.encrypted = True
            if office.ooxml_macro_part(name, bytes(member.blob.head)):
                facts.macros = True
            yield member
            if stop:
                return LIMIT, stop
            if member.problem is not None:
                facts.problem(UNREADABLE, f"a member could not be read: {member.problem[1]}")
                return member.problem     # after a data error libarchive's state is not to be trusted
    except libarchive.ArchiveError as e:
        text = _error(e)
        if _encryption_error(text):
            facts.encrypted = True
            facts.problem(ENCRYPTED, text)
            stopped = ENCRYPTED, text
        else:
            facts.problem(UNREADABLE, text)
            stopped = UNREADABLE, text
    finally:
        ffi.read_free(p)
        del keep
        _local.notes = outer_notes
        for note in notes:
            facts.problem(MALFORMED, f"archive: {note}")
        if facts.encrypted and not any(p.kind == ENCRYPTED for p in facts.problems):
            facts.problem(ENCRYPTED, "encrypted members")
    return stopped


# ---- the zip central directory ----------------------------------------------------------------

_END = struct.Struct("<4s4H2IH")                 # end of central directory record
_END64_LOCATOR = struct.Struct("<4sIQI")
_END64 = struct.Struct("<4sQ2H2I2Q2Q")
_CENTRAL = struct.Struct("<4s6H3I5H2I")          # a central directory file header, before its name
_UNICODE_PATH = 0x7075                           # Info-ZIP Unicode Path extra field


def _extra_names(extra: bytes) -> list[bytes]:
    """UTF-8 names in Info-ZIP Unicode Path fields (7-Zip and Info-ZIP show these instead)."""
    names, pos = [], 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4:pos + 4 + size]
        if tag == _UNICODE_PATH and len(body) > 5 and body[0] == 1:
            names.append(body[5:])
        pos += 4 + size
    return names


def central_names(f, size: int, limit: int) -> list[str] | None:
    """The names a zip's central directory gives its files (and their Unicode Path fields),
    decoded as libarchive's names are; None when there is no central directory to read. At most
    `limit` records are read, one at a time: a directory of any size costs no more memory."""
    tail = min(size, _END.size + 0xFFFF)
    f.seek(size - tail)
    data = f.read(tail)
    at = data.rfind(b"PK\x05\x06")
    if at < 0 or len(data) - at < _END.size:
        return None
    end = size - tail + at
    _sig, _disk, _cd_disk, _here, _total, cd_size, cd_offset, _comment = _END.unpack_from(data, at)
    if (cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF) and end >= _END64_LOCATOR.size:
        f.seek(end - _END64_LOCATOR.size)
        sig, _disk, where, _disks = _END64_LOCATOR.unpack(f.read(_END64_LOCATOR.size))
        if sig == b"PK\x06\x07" and where + _END64.size <= end:
            f.seek(where)
            record = f.read(_END64.size)
            if record[:4] == b"PK\x06\x06":
                cd_size, cd_offset = _END64.unpack(record)[-2:]
                end = where
    # readers differ: some start where the offset says, others where the directory must begin
    # to end at the end record (bytes put in front of the zip shift both); read both
    names: list[str] = []
    for start in dict.fromkeys((end - cd_size, cd_offset)):
        if not 0 <= start <= end:
            continue
        f.seek(start)
        pos, records = start, 0
        while pos + _CENTRAL.size <= end and records < limit:
            head = f.read(_CENTRAL.size)
            if len(head) < _CENTRAL.size or head[:4] != b"PK\x01\x02":
                break
            fields = _CENTRAL.unpack(head)
            n, m, k = fields[10], fields[11], fields[12]
            raw, extra = f.read(n), f.read(m)
            f.seek(k, 1)
            pos += _CENTRAL.size + n + m + k
            records += 1
            for name in (raw, *_extra_names(extra)):
                text = name.decode("utf-8", "replace")
                if text and not text.endswith(("/", "\\")):   # a directory: no content of its own
                    names.append(text)
    return list(dict.fromkeys(names))


def _central_members(blob: Blob, facts: FileBuilder, budget: Budget, new_blob: Callable[[str], Blob],
                     listed: list[str], stopped: tuple[str, str] | None) -> Iterator[Member]:
    """Members named by the zip's central directory that libarchive did not list, by name only."""
    if not blob.complete:
        return
    try:
        names = central_names(blob.open(), blob.size, budget.limits.archive_member_limit + 1)
    except (OSError, struct.error):
        return
    # libarchive writes a Windows zip's "docs\\a.txt" as "docs/a.txt", as Windows itself reads it
    seen = {n.replace("\\", "/") for n in listed}
    for name in names or ():
        if name.replace("\\", "/") in seen:
            continue
        seen.add(name.replace("\\", "/"))
        budget.check_time()
        budget.members += 1
        if budget.members > budget.limits.archive_member_limit:
            facts.problem(LIMIT, budget.reached("archive_member_limit"))
            budget.closed = "archive_member_limit"
            return
        facts.members += 1
        if stopped is None:
            problem = (MALFORMED, "zip: the central directory names a file no local header does")
            facts.problem(*problem)
        else:
            problem = stopped
        member = Member(name, new_blob(name), problem=problem, unread=True)
        member.blob.finish()
        yield member
