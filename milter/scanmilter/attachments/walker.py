"""walk(spool): every file of a message, judged by name, real type, archive content and macros.

parts.py walks the MIME structure and decodes each leaf into a Blob (its first bytes in memory,
the whole file in an unnamed temporary file only when an archive or OLE check needs it). Each
file is then judged: libmagic on its first bytes (detect.py), olefile on OLE files (office.py),
libarchive on archives (archives.py), whose members are judged the same way in turn, down to
archive_depth_limit. A file uuencoded or yEncoded inside a text (embedded.py) is a file of that
part, judged the same way. Everything runs under one Budget (limits.py): a limit reached is a fact
in the report, never an exception and never a clean result.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

from . import archives, names as N, office
from .blob import Blob
from .detect import ARCHIVE_EXTENSIONS, detect, is_archive_type, is_compressed_type, is_ole
from .embedded import Embedded
from .facts import ARCHIVE, EMBEDDED, ENCRYPTED, LIMIT, MALFORMED, UNREADABLE, FileBuilder, Problem, Report
from .limits import Budget, Limits, Stop
from .parts import KNOWN_ENCODINGS, Part, Walker as PartWalker


class _Walk:
    def __init__(self, limits: Limits, directory: str | None, clock: Callable[[], float]):
        self.budget = Budget(limits, clock)
        self.directory = directory
        self.files: list = []          # FileFacts, or a FileBuilder still being filled in

    # -- MIME leaves ---------------------------------------------------------------------------

    def open_leaf(self, part: Part) -> "_Leaf":
        facts = FileBuilder(part.path, part.names, part.declared_type, part.disposition)
        leaf = _Leaf(self, facts, self.blob_for(facts))
        # uuencode and yEnc inside a text, or a part sent in a transfer encoding of theirs
        # (x-uuencode, x-yencode: passed on as they are, and mail clients decode them)
        if part.declared_type == "text/plain" or part.encoding not in KNOWN_ENCODINGS:
            leaf.embedded = Embedded(lambda name: self.embedded_file(part, name))
        return leaf

    def embedded_file(self, part: Part, name: str) -> "_Leaf":
        """A file encoded inside the text of `part` (embedded.py): a file of that part, counted
        against mime_part_limit as a part of its own."""
        self.budget.parts += 1
        if self.budget.parts > self.budget.limits.mime_part_limit:
            self.budget.reached("mime_part_limit")
            raise Stop("mime_part_limit")
        facts = FileBuilder(part.path, (N.normalise(name, EMBEDDED),))
        return _Leaf(self, facts, self.blob_for(facts))

    def blob_for(self, facts: FileBuilder) -> Blob:
        def whole(head: bytes) -> bool:
            facts.detected_type, facts.description, error = detect(head)
            if error:
                facts.problem(UNREADABLE, error)
            return is_ole(head) or self.archive_candidate(facts)
        return Blob(whole, self.directory)

    def archive_candidate(self, facts: FileBuilder) -> bool:
        """Read as an archive: by real type, or when the name or the declared type says archive
        (then content libarchive cannot read is reported unreadable, not passed as harmless)."""
        return (is_archive_type(facts.detected_type) or is_archive_type(facts.declared_type)
                or any(n.extension in ARCHIVE_EXTENSIONS for n in facts.names))

    # -- judging one file ----------------------------------------------------------------------

    def judge(self, facts: FileBuilder, blob: Blob) -> None:
        """Fill in `facts` from `blob` (and list its members after it when it is an archive)."""
        index = len(self.files)
        self.files.append(facts)              # the archive comes before its members
        try:
            facts.size = blob.size
            if facts.encrypted:
                facts.description = facts.description or "encrypted"
                facts.problem(ENCRYPTED, "encrypted member")
                return
            head = bytes(blob.head)
            if not facts.detected_type:
                facts.detected_type, facts.description, error = detect(head)
                if error:
                    facts.problem(UNREADABLE, error)
            if is_ole(head):
                self.ole(facts, blob)
            if self.archive_candidate(facts):
                self.archive(facts, blob)
        finally:
            self.files[index] = facts.freeze()

    def ole(self, facts: FileBuilder, blob: Blob) -> None:
        if not blob.complete:
            facts.problem(UNREADABLE, "OLE file not kept whole")
            return
        macros, encrypted, error = office.ole_facts(blob.open())
        facts.macros = facts.macros or macros
        if encrypted:
            facts.encrypted = True
            facts.problem(ENCRYPTED, "encrypted Office document")
        if error:
            facts.problem(UNREADABLE, error)

    def archive(self, facts: FileBuilder, blob: Blob) -> None:
        limits = self.budget.limits
        if len(facts.container) >= limits.archive_depth_limit:
            facts.problem(LIMIT, self.budget.reached("archive_depth_limit"))
            return
        if self.budget.closed:
            facts.problem(LIMIT, self.budget.closed)
            return
        if not blob.complete:
            facts.problem(UNREADABLE, "archive not kept whole")
            return
        label = facts.names[0].sent if facts.names else f"part {facts.part}"
        chain = facts.container + (label,)
        raw_name = _stem(facts) if is_compressed_type(facts.detected_type) else None
        member_facts: list[FileBuilder] = []

        def new_blob(name: str) -> Blob:
            member_facts.append(FileBuilder(facts.part, (N.normalise(name, ARCHIVE),) if name else (),
                                            container=chain))
            return self.blob_for(member_facts[-1])

        with contextlib.closing(archives.members(blob, facts, self.budget, raw_name, new_blob)) as listing:
            for member in listing:
                mf = member_facts[-1]
                mf.encrypted = member.encrypted
                if member.problem is not None:
                    mf.problem(*member.problem)
                try:
                    if member.unread:       # named by a zip's central directory only: judged by name
                        self.files.append(mf.freeze())
                    else:
                        self.judge(mf, member.blob)
                finally:
                    member.blob.close()


def _stem(facts: FileBuilder) -> str:
    """The name of the one file a compressed file holds: "invoice.exe.gz" -> "invoice.exe"."""
    if not facts.names:
        return "data"
    sent = facts.names[0].sent
    return sent.rsplit(".", 1)[0] if "." in sent else sent


class _Leaf:
    """The sink of one MIME leaf: content goes to its blob; closing it judges the file."""

    def __init__(self, walk: _Walk, facts: FileBuilder, blob: Blob):
        self.walk, self.facts, self.blob = walk, facts, blob
        self.embedded: Embedded | None = None

    def write(self, data: bytes) -> None:
        self.blob.write(data)
        if self.embedded is not None:
            self.embedded.feed(data)

    def close(self, problems: list[str]) -> None:
        try:
            for p in problems:
                self.facts.problem(MALFORMED, p)
            self.blob.finish()
            self.walk.judge(self.facts, self.blob)
            if self.embedded is not None:
                self.embedded.close()
        finally:
            self.blob.close()

    def discard(self) -> None:
        self.blob.close()


def walk(reader, limits: Limits, directory: str | None = None,
         clock: Callable[[], float] = time.monotonic) -> Report:
    """The facts of every file in the message read from `reader` (a binary file object over the
    whole message as spooled: header lines, blank line, body). Never raises on the message's
    content: what could not be done is a problem in the report."""
    w = _Walk(limits, directory, clock)
    mime = PartWalker(reader, w.budget, w.open_leaf, directory)
    complete = True
    problems: list[Problem] = []
    try:
        mime.walk()
    except Stop as stop:
        complete = False
        problems.append(Problem(LIMIT, stop.setting))
    problems[:0] = [Problem(MALFORMED, p) for p in mime.problems]
    for setting in w.budget.hit:
        if Problem(LIMIT, setting) not in problems:
            problems.append(Problem(LIMIT, setting))
    files = tuple(f if not isinstance(f, FileBuilder) else f.freeze() for f in w.files)
    return Report(files, tuple(problems), w.budget.parts, w.budget.seconds(), complete)
