"""Real types from the content's first bytes, through libmagic.

libmagic (the engine of file(1)) is used through python-magic: a thin ctypes binding to the
system's libmagic1, with no compiled code of its own, so Debian's security updates of the
library and of its magic database apply to us as they do to file(1). Its database knows every
type a rule needs here (PE and ELF executables, scripts with a #! line, Office, OLE, archives,
ISO 9660 images); pure-Python detectors carry a much smaller table of their own.

libmagic sees only HEAD_BYTES of each file: its tests for the types we act on lie within them
(the ISO 9660 signature sits at 32 KiB, the deepest).

SECURITY: libmagic parses hostile bytes in our process. It is given at most HEAD_BYTES, never
asked to decompress (python-magic's default), and a failure is a fact ("unreadable"), never a type.
"""
from __future__ import annotations

import threading

import magic

HEAD_BYTES = 64 * 1024
OCTET_STREAM = "application/octet-stream"
OLE_SIGNATURE = bytes.fromhex("D0CF11E0A1B11AE1")

_lock = threading.Lock()
_cookies: dict[bool, magic.Magic] = {}


def _magic(mime: bool) -> magic.Magic:
    # One cookie each for the MIME type and the description, shared by all threads: python-magic
    # serialises calls on a cookie itself, and each cookie holds the whole database in memory.
    with _lock:
        if mime not in _cookies:
            _cookies[mime] = magic.Magic(mime=mime)
        return _cookies[mime]


# Bytes of content without a NUL byte that libmagic is given. Its text rules cost about 3 ms on
# 8 KiB and more, under 1 ms on 1 KiB, and every mail has a text body or two; the types of text
# (scripts by their #! line, HTML, batch files) are told by the first lines. Binary formats carry
# a NUL in their first bytes (ISO 9660's 32 KiB of zeros, the zip, PE and OLE headers) and get
# all of HEAD_BYTES.
TEXT_PROBE_BYTES = 1024


def detect(head: bytes) -> tuple[str, str, str]:
    """(MIME type, description, error) of content starting with `head`. Text gets no description:
    libmagic's text rules are its slowest (about 2 ms for a few KB, on every mail body), and
    "ASCII text" says nothing the type does not."""
    if b"\0" not in head:
        head = head[:TEXT_PROBE_BYTES]
    try:
        mime = _magic(True).from_buffer(head)
        return mime, "" if mime.startswith("text/") else _magic(False).from_buffer(head), ""
    except Exception as e:  # libmagic's own errors and any surprise from the binding
        return OCTET_STREAM, "", f"libmagic: {type(e).__name__}: {e}"[:200]


# Types that are read as archives (libarchive lists their members). Office Open XML, OpenDocument,
# Java and Android packages and EPUB books are zip files and are listed too: their members can
# be macros (vbaProject.bin) or embedded programs.
ARCHIVE_TYPES = frozenset({
    "application/zip", "application/x-zip-compressed", "application/x-7z-compressed",
    "application/vnd.rar", "application/x-rar", "application/x-rar-compressed",
    "application/vnd.ms-cab-compressed", "application/x-iso9660-image", "application/x-tar",
    "application/x-ustar", "application/x-gtar", "application/x-cpio", "application/x-archive",
    "application/x-lha", "application/x-lzh-compressed", "application/x-xar", "application/java-archive",
    "application/vnd.android.package-archive",
})
# Compressed single files (a .gz that is not a tarball): read as one member named after the file.
COMPRESSED_TYPES = frozenset({
    "application/gzip", "application/x-gzip", "application/x-bzip2", "application/x-xz", "application/x-lzma",
    "application/zstd", "application/x-zstd", "application/x-lz4", "application/x-compress", "application/x-lzip",
})
ARCHIVE_EXTENSIONS = frozenset({
    "zip", "zipx", "7z", "rar", "cab", "iso", "img", "udf", "tar", "gz", "tgz", "bz2", "tbz", "tbz2", "xz", "txz",
    "zst", "lz", "lzma", "lz4", "z", "lzh", "lha", "cpio", "xar", "arj", "ace", "jar", "apk",
})


def is_archive_type(mime: str) -> bool:
    mime = mime.lower()
    return (mime in ARCHIVE_TYPES or mime in COMPRESSED_TYPES or mime.endswith("+zip")
            or mime.startswith(("application/vnd.openxmlformats-officedocument.", "application/vnd.oasis.opendocument."))
            or mime.startswith("application/vnd.ms-") and "macroenabled" in mime)


def is_compressed_type(mime: str) -> bool:
    return mime.lower() in COMPRESSED_TYPES


def is_ole(head: bytes) -> bool:
    return head.startswith(OLE_SIGNATURE)
