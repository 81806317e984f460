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
    """(macros, encrypted, error) of an OLE compound file, read from a seekable file object."""
    try:
        fileobj.seek(0)
        # always a file object: olefile takes a short bytes argument for a file name to open
        with olefile.OleFileIO(fileobj) as ole:
            paths = {tuple(p.lower() for p in entry) for entry in ole.listdir(streams=True, storages=True)}
    except Exception as e:  # olefile raises OSError, struct.error, IndexError... on broken files
        return False, False, f"OLE: {type(e).__name__}: {e}"[:200]
    macros = any(path[:len(s)] == s for path in paths for s in _VBA_STORAGES)
    return macros, bool(paths & _ENCRYPTED_STREAMS), ""


def ooxml_macro_part(member: str, head: bytes) -> bool:
    """Whether an archive member shows its Office Open XML package to hold VBA macros."""
    base = re.split(r"[/\\]", member)[-1].lower()
    if base == "vbaproject.bin":
        return True
    return base == "[content_types].xml" and bool(_MACRO_CONTENT_TYPES.search(head))
