"""The attachment checks as an engine: every file of the message by name, real type, archive
content and macros (scanmilter.attachments), run in the scan pool beside clamd and spamd.

Its result is CLEAN with the facts in `report`, whatever they are: which of them are banned is
the policy's business ([files] rules), so a policy reload judges cached facts by the new rules.
The walk stops itself at attachment_timeout (a limit in the report); the pipeline's deadline
(that timeout plus its grace) catches a walk stuck inside a library call, and any exception
the walk raises is an ERROR, never a clean result.
"""
from __future__ import annotations

import time

from ..attachments import Limits, walk
from . import CLEAN, ERROR, FAILED, ScanResult


class FilesScanner:
    name = "files"

    def __init__(self, limits: Limits, directory: str | None = None):
        self.limits, self.directory = limits, directory
        self.timeout = limits.attachment_timeout

    def scan(self, spool) -> ScanResult:
        start = time.monotonic()
        try:
            with spool.reader() as reader:
                report = walk(reader, self.limits, self.directory)
        except Exception as e:    # a bug or a library's surprise: the message was not checked
            return ScanResult(self.name, ERROR, f"{FAILED}: {type(e).__name__}: {e}"[:300],
                              time.monotonic() - start)
        return ScanResult(self.name, CLEAN, seconds=time.monotonic() - start, report=report)

    def ping(self) -> str:
        """Nothing to reach: the checks run in this process."""
        return ""


def from_settings(cfg) -> FilesScanner:
    return FilesScanner(Limits.from_settings(cfg), cfg.spool_directory or None)
