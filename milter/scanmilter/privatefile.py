"""Reading a file that holds a secret (a connection string with a password, a webhook's key).

The file must be a regular file, not a link, and closed to other users: one who can read it has
the secret, one who can write it can point scanmilter elsewhere. It is checked on the open
descriptor, so that nothing can be swapped in between the check and the read.
"""
from __future__ import annotations

import os
import stat

READ_LIMIT = 64 * 1024      # bytes read: a secret is one short line


class PrivateFileError(ValueError):
    """What is wrong with the file, as a sentence ending the caller's own prefix."""


def first_line(path: str) -> str:
    """The file's first line, stripped; PrivateFileError when it cannot be read, is not closed to
    others, is not UTF-8 text, or the line is empty."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise PrivateFileError(f"cannot read: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise PrivateFileError("not a regular file")
        if mode & 0o006:
            what = "readable" if mode & 0o004 else "writable"
            raise PrivateFileError(f"{what} by every user; it holds a secret (chmod o-rw)")
        data = f.read(READ_LIMIT)
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise PrivateFileError("not UTF-8 text") from None
    line = lines[0].strip() if lines else ""
    if not line:
        raise PrivateFileError("empty")
    return line
