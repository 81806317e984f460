"""Office documents: VBA macros and encryption.

Two forms carry VBA:
  - OLE compound files (.doc, .xls, .dot, .xla, and the vbaProject.bin inside OOXML): a storage
    named VBA under Macros (Word), _VBA_PROJECT_CUR (Excel), or at the root (vbaProject.bin);
  - Office Open XML (.docm, .xlsm, .pptm, ...): a zip part named vbaProject.bin, announced in
    [Content_Types].xml as application/vnd.ms-office.vbaProject or a macroEnabled type.
An OLE file with EncryptedPackage and EncryptionInfo streams is a password-protected OOXML file.

olefile reads the OLE directory: pure Python with no dependencies, by the author of oletools,
and all we need is whether a storage exists. oletools (olevba) decompresses and analyses the
VBA source, which no rule here uses, and pulls in pyparsing, msoffcrypto-tool (and so
cryptography), colorclass and easygui; olefile is what it reads OLE files with anyway.

Not seen: VBA inside PowerPoint 97 files (a compressed stream within the PowerPoint Document
stream), Excel 4.0 (XLM) macro sheets, and files embedded in OLE documents (Ole10Native).
"""
from __future__ import annotations

import io
import re

import olefile

_VBA_STORAGES = (("macros", "vba"), ("_vba_project_cur", "vba"), ("vba",))
_ENCRYPTED_STREAMS = {("encryptedpackage",), ("encryptioninfo",)}
_MACRO_CONTENT_TYPES = re.compile(rb"vnd\.ms-office\.vbaproject|macroenabled", re.I)


def ole_facts(fileobj: io.RawIOBase | io.BufferedIOBase) -> tuple[bool, bool, str]:
    """(macros, encrypted, error) of an OLE compound file, read from a seekable file object.

    olefile builds the directory's tree and only logs what it cannot follow (a loop, an entry
    used twice): the branch is dropped, and with it a VBA storage. So every entry of the
    directory is also read flat, whatever the tree says; entries the tree does not reach make
    the file unreadable (an error), and a VBA storage among them still counts as macros."""
    try:
        fileobj.seek(0)
        # always a file object: olefile takes a short bytes argument for a file name to open
        with olefile.OleFileIO(fileobj) as ole:
            listed = ole.listdir(streams=True, storages=True)
            paths = {tuple(p.lower() for p in entry) for entry in listed}
            flat = _flat_entries(ole.directory_fp.getvalue())
            issues = [message for _kind, message in ole.parsing_issues]
    except Exception as e:  # olefile raises OSError, struct.error, IndexError... on broken files
        return False, False, f"OLE: {type(e).__name__}: {e}"[:200]
    names = set(flat)
    macros = any(path[:len(s)] == s for path in paths for s in _VBA_STORAGES) or (_STORAGE, "vba") in names
    encrypted = bool(paths & _ENCRYPTED_STREAMS) or {(_STREAM, p[0]) for p in _ENCRYPTED_STREAMS} <= names
    error = ""
    if len(flat) > len(listed):
        error = (f"OLE: {len(flat) - len(listed)} of {len(flat)} directory entries outside its tree"
                 + (f" ({issues[0]})" if issues else ""))[:200]
    return macros, encrypted, error


_STORAGE, _STREAM = 1, 2


def _flat_entries(directory: bytes) -> list[tuple[int, str]]:
    """(type, lower-case name) of every storage and stream in an OLE directory stream (entries of
    128 bytes: the name in UTF-16, its length in bytes with the final NUL, the entry's type)."""
    entries = []
    for at in range(0, len(directory) - 127, 128):
        size = int.from_bytes(directory[at + 64:at + 66], "little")
        kind = directory[at + 66]
        if 2 <= size <= 64 and kind in (_STORAGE, _STREAM):
            entries.append((kind, directory[at:at + size - 2].decode("utf-16-le", "replace").lower()))
    return entries


def ooxml_macro_part(member: str, head: bytes) -> bool:
    """Whether an archive member shows its Office Open XML package to hold VBA macros."""
    base = re.split(r"[/\\]", member)[-1].lower()
    if base == "vbaproject.bin":
        return True
    return base == "[content_types].xml" and bool(_MACRO_CONTENT_TYPES.search(head))
