"""Attachment facts: what every file in a message is, by name, real type, archive content and macros.

    report = attachments.walk(spool.reader(), Limits.from_settings(cfg), cfg.spool_directory or None)

`walk` reads the spooled message once with bounded memory and returns a `Report` (facts.py):
one FileFacts per leaf MIME part and per archive member, plus the message's own problems
(malformed MIME, limits reached). It decides nothing; the policy does.

Modules: parts.py (streaming MIME walk and decoding), names.py (file names out of headers and
their normal form), embedded.py (uuencode and yEnc inside a text), detect.py (libmagic),
office.py (VBA macros, olefile), archives.py (libarchive, and a zip's central directory), blob.py (first bytes in memory, whole file on disk only when needed), limits.py
(the named limits and the budget of one walk), walker.py (judging each file), bench.py (timing).
"""
from .facts import (ARCHIVE, CONTENT_TYPE, DISPOSITION, ENCRYPTED, LIMIT, MALFORMED, PROBLEM_KINDS, UNREADABLE,
                    FileFacts, Name, Problem, Report)
from .limits import Limits
from .walker import walk

__all__ = ["walk", "Limits", "Report", "FileFacts", "Name", "Problem", "PROBLEM_KINDS", "MALFORMED", "LIMIT",
           "ENCRYPTED", "UNREADABLE", "DISPOSITION", "CONTENT_TYPE", "ARCHIVE"]
