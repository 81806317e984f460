"""The content of one file as it is decoded: its first bytes in memory, the rest only if needed.

libmagic needs the first HEAD_BYTES; an archive or an OLE document needs the whole file. The
blob keeps the head, and once the head is full asks `whole(head)` whether the rest is needed: if
so, everything goes to an unnamed temporary file (like the message spool: O_TMPFILE or unlinked
at once, 0600), else the rest is only counted. So no file of a message is ever held whole in
memory, and files that no check reads whole are never written anywhere.
"""
from __future__ import annotations

import ctypes
import os
import tempfile
from typing import Callable

from .detect import HEAD_BYTES


class Blob:
    def __init__(self, whole: Callable[[bytes], bool], directory: str | None = None):
        self._whole = whole
        self._directory = directory
        self.head = bytearray()
        self.size = 0
        self.file = None          # the unnamed temporary file holding everything, when kept
        self._decided = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if not self._decided:
            room = HEAD_BYTES - len(self.head)
            self.head += data[:room]
            if len(self.head) < HEAD_BYTES:
                return
            data = data[room:]
            self._decide()
        if self.file is not None and data:
            self.file.write(data)

    def _decide(self) -> None:
        self._decided = True
        if self._whole(bytes(self.head)):
            self.file = tempfile.TemporaryFile(dir=self._directory)
            self.file.write(self.head)

    def finish(self) -> None:
        """No more data: a file shorter than the head is whole in memory already."""
        self._decided = True
        if self.file is not None:
            self.file.flush()

    @property
    def complete(self) -> bool:
        """Whether all of the content can be read back (in memory or in the file)."""
        return self.file is not None or self.size == len(self.head)

    def open(self):
        """A seekable binary file object over all of the content (complete blobs only)."""
        if self.file is not None:
            self.file.seek(0)
            return _Unclosed(self.file)
        import io
        return io.BytesIO(bytes(self.head))

    def fd(self) -> int | None:
        """A descriptor positioned at the start of the content, or None when it is in memory."""
        if self.file is None:
            return None
        self.file.flush()
        os.lseek(self.file.fileno(), 0, os.SEEK_SET)
        return self.file.fileno()

    def buffer(self) -> ctypes.Array:
        """The content in memory as a C buffer that stays alive as long as the caller holds it."""
        return ctypes.create_string_buffer(bytes(self.head), len(self.head))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.head = bytearray()


class _Unclosed:
    """A view of the blob's file that readers may close without closing the file."""

    def __init__(self, f):
        self._f = f

    def close(self) -> None:
        pass

    def __getattr__(self, name):
        return getattr(self._f, name)
