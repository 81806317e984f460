"""The facts the attachment checks find: plain frozen data, no I/O, nothing decided.

A `Report` covers one message: every leaf MIME part and every member of every archive in it is a
`FileFacts`, in walk order (an archive comes before its members). What the facts mean (banned,
tagged, quarantined) is the policy's business; these structures only say what was seen.

Problems are typed, so that the policy can give each kind its own action:
  malformed   the MIME structure or an encoding is broken (missing boundary, bad base64, ...)
  limit       a named setting stopped the checks (its name is the detail, e.g. archive_depth_limit)
  encrypted   an archive, one of its members, or an Office document is encrypted
  unreadable  an archive or document that its reader could not read

SECURITY: every name here came from the sender. `Name.sent` is kept as it was decoded, bidi
controls and all, so that the policy and the logs can show what the recipient would see; log
lines and replies must pass it through verdict.safe_name or an equivalent first.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MALFORMED, LIMIT, ENCRYPTED, UNREADABLE = "malformed", "limit", "encrypted", "unreadable"
PROBLEM_KINDS = (MALFORMED, LIMIT, ENCRYPTED, UNREADABLE)

# Where a name came from.
DISPOSITION = "content-disposition"      # Content-Disposition: ...; filename=
CONTENT_TYPE = "content-type"            # Content-Type: ...; name=
ARCHIVE = "archive"                      # a member's path inside its archive
EMBEDDED = "embedded"                    # "begin 644 NAME" or "=ybegin ... name=" in a text body


@dataclass(frozen=True)
class Problem:
    kind: str          # one of PROBLEM_KINDS
    detail: str        # why, in a few words; for LIMIT the name of the setting

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


@dataclass(frozen=True)
class Name:
    """One file name as sent, and the forms it is matched in."""
    sent: str                      # after RFC 2231 / RFC 2047 decoding, otherwise untouched
    source: str                    # DISPOSITION, CONTENT_TYPE or ARCHIVE
    normal: str                    # NFKC, invisible and bidi controls removed, trailing dots and
                                   # spaces stripped, case folded: the form rules match
    basename: str                  # `normal` without any directory part ("a/b/x.exe" -> "x.exe")
    extensions: tuple[str, ...]    # every extension of basename, in order: "x.pdf.exe" -> ("pdf", "exe")
    skeleton: str                  # basename with known look-alike letters replaced by ASCII ones
    tricks: tuple[str, ...] = ()   # what the normal form undid or noticed (bidi controls, mixed scripts, ...)

    @property
    def extension(self) -> str:
        """The last extension: the one the recipient's system opens the file by."""
        return self.extensions[-1] if self.extensions else ""


@dataclass(frozen=True)
class FileFacts:
    """One file: a leaf MIME part or a member of an archive."""
    part: str                            # MIME part path, IMAP style: "1", "2.1", "2.1.3"
    names: tuple[Name, ...] = ()         # MIME: filename= and name= (both when both sent); member: its path
                                         # (or the zip central directory's, when that differs); a file
                                         # uuencoded in a text: its "begin" line's
    declared_type: str = ""              # Content-Type as sent, lower case, no parameters; "" for members
    disposition: str = ""                # "attachment", "inline" or "" (none sent; members: "")
    detected_type: str = ""              # libmagic's MIME type of the content
    description: str = ""                # libmagic's description of the content ("" for text: see detect.py)
    size: int = 0                        # bytes of decoded content seen (all of it unless a problem says why not)
    container: tuple[str, ...] = ()      # for a member: the archives it lies in, outermost first
    archive_format: str = ""             # libarchive's name of the format when it was read as an archive
    members: int = 0                     # files listed inside it, when it is an archive
    encrypted: bool = False
    macros: bool = False                 # VBA macros (OLE storage or OOXML vbaProject part)
    problems: tuple[Problem, ...] = ()

    @property
    def depth(self) -> int:
        """0 for a MIME part, 1 for a member of an attached archive, and so on."""
        return len(self.container)

    @property
    def name(self) -> Name | None:
        """The name to show: the filename= one when both are present."""
        return self.names[0] if self.names else None

    @property
    def names_disagree(self) -> bool:
        return len({n.normal for n in self.names}) > 1

    @property
    def where(self) -> str:
        """Part path and container chain, for logs: "2: a.7z > b.zip > c.js"."""
        chain = [*self.container, self.name.sent if self.name else ""]
        return f"{self.part}: {' > '.join(chain)}" if self.container or self.names else self.part


@dataclass(frozen=True)
class Report:
    """Everything the walk of one message found."""
    files: tuple[FileFacts, ...] = ()
    problems: tuple[Problem, ...] = ()   # of the message as a whole (MIME structure, limits)
    parts: int = 0                       # MIME entities walked
    seconds: float = 0.0
    complete: bool = True                # False: a limit stopped the walk before the end of the message

    def all_problems(self) -> tuple[Problem, ...]:
        """The message's problems and every file's, each once, in walk order."""
        seen = dict.fromkeys(self.problems)
        for f in self.files:
            seen.update(dict.fromkeys(f.problems))
        return tuple(seen)

    def kinds(self) -> frozenset[str]:
        return frozenset(p.kind for p in self.all_problems())

    @property
    def malformed(self) -> tuple[str, ...]:
        return tuple(p.detail for p in self.all_problems() if p.kind == MALFORMED)

    @property
    def limits(self) -> tuple[str, ...]:
        """The settings whose limits were reached, each once."""
        return tuple(dict.fromkeys(p.detail for p in self.all_problems() if p.kind == LIMIT))

    @property
    def encrypted(self) -> tuple[FileFacts, ...]:
        return tuple(f for f in self.files if f.encrypted)

    @property
    def macros(self) -> tuple[FileFacts, ...]:
        return tuple(f for f in self.files if f.macros)


@dataclass
class FileBuilder:
    """A FileFacts being filled in (an archive's facts are complete only after its members)."""
    part: str
    names: tuple[Name, ...] = ()
    declared_type: str = ""
    disposition: str = ""
    container: tuple[str, ...] = ()
    detected_type: str = ""
    description: str = ""
    size: int = 0
    archive_format: str = ""
    members: int = 0
    encrypted: bool = False
    macros: bool = False
    problems: list[Problem] = field(default_factory=list)

    def problem(self, kind: str, detail: str) -> None:
        p = Problem(kind, detail)
        if p not in self.problems:
            self.problems.append(p)

    def freeze(self) -> FileFacts:
        return FileFacts(self.part, self.names, self.declared_type, self.disposition, self.detected_type,
                         self.description, self.size, self.container, self.archive_format, self.members,
                         self.encrypted, self.macros, tuple(self.problems))
