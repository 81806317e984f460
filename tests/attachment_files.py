"""Real files and messages for the attachment tests, built here (nothing downloaded, nothing binary
committed): executables, documents, archives of every format libarchive can write, bombs, and
MIME messages around them, well-formed or not."""
from __future__ import annotations

import base64
import io
import struct
import zlib

import libarchive

# ---- single files ----------------------------------------------------------------------------


def pe_exe() -> bytes:
    """A minimal PE32 executable: DOS header, PE signature, COFF header, optional header (GUI)."""
    dos = bytearray(64)
    dos[0:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, 64)                       # e_lfanew: the PE header follows
    coff = struct.pack("<HHIIIHH", 0x14C, 0, 0, 0, 0, 224, 0x0102)   # i386, optional header size, executable
    optional = bytearray(224)
    struct.pack_into("<H", optional, 0, 0x10B)                  # PE32
    struct.pack_into("<H", optional, 68, 2)                     # subsystem: Windows GUI
    return bytes(dos) + b"PE\0\0" + coff + bytes(optional)


def pdf() -> bytes:
    """A minimal valid PDF: catalog, an empty page tree, cross-reference table, trailer."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>"]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def png() -> bytes:
    """A valid 1x1 grey PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0\x80")) + chunk(b"IEND", b""))


JS = b"var shell = new ActiveXObject('WScript.Shell');\r\nshell.Run('calc.exe');\r\n"


# ---- archives through libarchive's writer ----------------------------------------------------

def archive(fmt: str, members: list[tuple[str, bytes]], filter_name: str | None = None, **options) -> bytes:
    """An archive written by libarchive: fmt "zip", "7zip", "iso9660", "ustar", ..."""
    out = io.BytesIO()
    with libarchive.custom_writer(lambda data: out.write(data) or len(data), fmt, filter_name=filter_name,
                                  **options) as writer:
        for name, data in members:
            writer.add_file_from_memory(name, len(data), data, mtime=0)
    return out.getvalue()


def zipcrypto(members: list[tuple[str, bytes]], password: str = "infected") -> bytes:
    """A zip whose members are encrypted with the traditional PKWARE cipher (ZipCrypto)."""
    return archive("zip", members, options="zip:encryption=zipcrypt", passphrase=password)


def docm() -> bytes:
    """A Word macro-enabled document: the OOXML package with its vbaProject.bin part."""
    types = (b'<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/'
             b'content-types"><Default Extension="bin" ContentType="application/vnd.ms-office.vbaProject"/>'
             b'<Override PartName="/word/document.xml" ContentType="application/vnd.ms-word.document.macroEnabled.'
             b'main+xml"/></Types>')
    return archive("zip", [("[Content_Types].xml", types),
                           ("_rels/.rels", b'<?xml version="1.0"?><Relationships/>'),
                           ("word/document.xml", b'<?xml version="1.0"?><w:document/>'),
                           ("word/vbaProject.bin", ole({"VBA/dir": b"\x01" * 4096, "PROJECT": b"ID=x\r\n" * 700}))])


def docx() -> bytes:
    """The same document without macros."""
    types = (b'<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/'
             b'content-types"><Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-'
             b'officedocument.wordprocessingml.document.main+xml"/></Types>')
    return archive("zip", [("[Content_Types].xml", types),
                           ("_rels/.rels", b'<?xml version="1.0"?><Relationships/>'),
                           ("word/document.xml", b'<?xml version="1.0"?><w:document/>')])


# ---- formats libarchive reads but does not write, by hand ----------------------------------------

def cab(name: str, data: bytes) -> bytes:
    """A Microsoft Cabinet with one uncompressed file (data under 32 KiB: one data block)."""
    raw = name.encode() + b"\0"
    entry = struct.pack("<IIHHHH", len(data), 0, 0, 0, 0, 0x20) + raw           # size, offset, folder, date, time, attrs
    data_offset = 36 + 8 + len(entry)
    block = struct.pack("<IHH", 0, len(data), len(data)) + data                  # no checksum
    header = b"MSCF" + struct.pack("<IIIIIBBHHHHH", 0, data_offset + len(block), 0, 36 + 8, 0, 3, 1, 1, 1, 0, 0, 0)
    return header + struct.pack("<IHH", data_offset, 1, 0) + entry + block      # one folder, stored


def rar4(name: str, data: bytes) -> bytes:
    """A RAR 4 archive with one stored file."""
    def block(kind: int, flags: int, body: bytes) -> bytes:
        head = struct.pack("<BHH", kind, flags, 7 + len(body)) + body
        return struct.pack("<H", zlib.crc32(head) & 0xFFFF) + head
    raw = name.encode()
    file_head = struct.pack("<IIBIIBBHI", len(data), len(data), 2, zlib.crc32(data), 0, 29, 0x30, len(raw), 0x20) + raw
    return (b"Rar!\x1a\x07\x00" + block(0x73, 0, bytes(6)) + block(0x74, 0x8000, file_head) + data
            + block(0x7B, 0x4000, b""))


# ---- OLE compound files, written by hand (olefile reads but does not create them) -------------

_FREE, _END, _FATSECT, _NOSTREAM = 0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFD, 0xFFFFFFFF


def ole(streams: dict[str, bytes]) -> bytes:
    """A version 3 compound file holding `streams` ("Storage/Sub/Stream": data, each at least
    4096 bytes so that it lives in ordinary sectors, not the mini stream)."""
    entries = [{"name": "Root Entry", "type": 5, "children": [], "data": b""}]
    index = {"": 0}
    for path, data in streams.items():
        assert len(data) >= 4096, path
        parent = ""
        parts = path.split("/")
        for depth, part in enumerate(parts):
            key = "/".join(parts[:depth + 1])
            if key not in index:
                index[key] = len(entries)
                last = depth == len(parts) - 1
                entries.append({"name": part, "type": 2 if last else 1, "children": [],
                                "data": data if last else b""})
                entries[index[parent]]["children"].append(index[key])
            parent = key
    sectors: list[bytes] = []
    chains: list[tuple[int, int]] = []          # (first sector, count) per entry with data
    starts = {}
    for i, e in enumerate(entries):
        if e["data"]:
            n = -(-len(e["data"]) // 512)
            starts[i] = (len(sectors), n)
            sectors += [e["data"][k * 512:(k + 1) * 512].ljust(512, b"\0") for k in range(n)]
            chains.append(starts[i])
    dir_bytes = bytearray()
    for i, e in enumerate(entries):
        kids = e["children"]
        # children as a chain of right siblings (all black: a valid, if unbalanced, tree)
        right = _NOSTREAM
        for pi, p in enumerate(entries):
            if i in p["children"]:
                k = p["children"].index(i)
                right = p["children"][k + 1] if k + 1 < len(p["children"]) else _NOSTREAM
        name = e["name"].encode("utf-16-le") + b"\0\0"
        start, _n = starts.get(i, (_END, 0))
        dir_bytes += (name.ljust(64, b"\0") + struct.pack("<HBBIII", len(name), e["type"], 1, _NOSTREAM, right,
                                                           kids[0] if kids else _NOSTREAM)
                      + bytes(16) + bytes(4) + bytes(16) + struct.pack("<IQ", start, len(e["data"])))
    dir_bytes += bytes(-len(dir_bytes) % 512)
    n_dir = len(dir_bytes) // 512
    first_dir = len(sectors) + 1          # sector 0 will be the FAT
    fat = [_FATSECT]
    for start, n in chains:
        fat += [start + 1 + k + 1 if k + 1 < n else _END for k in range(n)]
    fat += [first_dir + k + 1 if k + 1 < n_dir else _END for k in range(n_dir)]
    assert len(fat) <= 128
    fat_sector = struct.pack("<128I", *(fat + [_FREE] * (128 - len(fat))))
    header = (bytes.fromhex("D0CF11E0A1B11AE1") + bytes(16) + struct.pack("<HHHHH", 0x3E, 3, 0xFFFE, 9, 6)
              + bytes(6) + struct.pack("<IIIIIIIII", 0, 1, first_dir, 0, 4096, _END, 0, _END, 0)
              + struct.pack("<109I", 0, *([_FREE] * 108)))
    return header + fat_sector + b"".join(sectors) + bytes(dir_bytes)


def doc_with_macros() -> bytes:
    """A Word 97 document with a VBA project (Macros/VBA storage)."""
    return ole({"WordDocument": b"\xec\xa5" + bytes(4094), "Macros/VBA/dir": b"\x01" * 4096,
                "Macros/PROJECT": b"ID=x\r\n" * 700})


# ---- zips by hand, for bombs: deflate streams of zeros are repeated, not computed ---------------

def deflated_zeros(size: int, block: int = 1 << 20) -> tuple[bytes, int]:
    """(raw deflate stream, CRC-32) of `size` zero bytes (a multiple of `block`). After a full
    flush the compressor starts afresh, so one compressed block repeated is the whole stream."""
    assert size % block == 0
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(block)
    one = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    assert one == again
    crc = 0
    for _ in range(size // block):
        crc = zlib.crc32(zeros, crc)
    return one * (size // block) + c.flush(), crc


def zip_of(members: list[tuple[str, bytes, int, int]], stored: bool = False) -> bytes:
    """A zip of already deflated members: (name, deflate stream, CRC-32, size); sizes < 4 GiB.
    `stored`: the members' data is stored as it is (no compression)."""
    out = bytearray()
    central = bytearray()
    method = 0 if stored else 8
    for name, data, crc, size in members:
        raw = name.encode()
        offset = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(data), size, len(raw), 0) + raw
        out += data
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc, len(data), size,
                               len(raw), 0, 0, 0, 0, 0, offset) + raw
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(out), 0)
    return bytes(out + central + end)


def deflated(data: bytes) -> tuple[bytes, int, int]:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush(), zlib.crc32(data), len(data)


def zip_bomb(size: int = 3 << 30) -> bytes:
    """One member of `size` zero bytes (3 GiB: about 3 MB of zip)."""
    data, crc = deflated_zeros(size)
    return zip_of([("zeros.bin", data, crc, size)])


def nested_bomb(levels: int = 3, fan: int = 16, leaf: int = 256 << 20) -> bytes:
    """42.zip in small: `fan` copies of a zip, `levels` deep, around `fan` files of `leaf` zeros."""
    data, crc = deflated_zeros(leaf)
    current = zip_of([(f"{i}.dll", data, crc, leaf) for i in range(fan)])
    for level in range(1, levels):
        packed = deflated(current)
        current = zip_of([(f"lib {level} {i}.zip", *packed) for i in range(fan)])
    return current


# ---- messages --------------------------------------------------------------------------------

def b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def attachment(data: bytes, content_type: str = "application/octet-stream", filename: str | None = None,
               name: str | None = None, disposition: str | None = "attachment", headers: tuple[str, ...] = ()) -> bytes:
    """One MIME part, base64 encoded; `filename` and `name` go into the headers as given (quote or
    encode them there); disposition None: no Content-Disposition field."""
    lines = [f"Content-Type: {content_type}" + (f"; name={name}" if name is not None else ""),
             "Content-Transfer-Encoding: base64"]
    if disposition is not None:
        lines.append(f"Content-Disposition: {disposition}" + (f"; filename={filename}" if filename is not None else ""))
    lines += list(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + b64(data)


def message(*parts: bytes, boundary: str = "=-=boundary=-=", headers: str = "") -> bytes:
    """A multipart/mixed message of a text body and `parts`."""
    head = (f"From: sender@example.org\r\nTo: rcpt@example.com\r\nSubject: test\r\nMIME-Version: 1.0\r\n{headers}"
            f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n').encode()
    body = b"This is a multi-part message in MIME format.\r\n"
    sep = f"--{boundary}\r\n".encode()
    body += sep + b"Content-Type: text/plain; charset=utf-8\r\n\r\nHello, please find the file attached.\r\n"
    for part in parts:
        body += sep + part + b"\r\n"
    return head + body + f"--{boundary}--\r\n".encode()


# ---- what an attacker writes by hand -----------------------------------------------------------

def zip_names(entries: list[tuple[bytes, bytes, bytes, bytes]]) -> bytes:
    """A zip of (local header name, central directory name, data, central extra field) members:
    the two names may disagree (Windows Explorer and 7-Zip go by the central directory's)."""
    out, central = bytearray(), bytearray()
    for local, listed, data, extra in entries:
        packed, crc, size = deflated(data)
        offset = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(packed), size, len(local), 0)
        out += local + packed
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0, crc, len(packed), size,
                               len(listed), len(extra), 0, 0, 0, 0, offset) + listed + extra
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), len(out), 0)
    return bytes(out + central + end)


def unicode_path_field(name: str, plain: bytes) -> bytes:
    """An Info-ZIP Unicode Path extra field (0x7075) naming `name` for the plain name `plain`."""
    raw = name.encode()
    return struct.pack("<HHBI", 0x7075, 5 + len(raw), 1, zlib.crc32(plain)) + raw


def uuencoded(name: str, data: bytes, base64_form: bool = False) -> bytes:
    """`data` as uuencode writes it into a text ("begin 644 NAME" ... "end"; -m: base64)."""
    import binascii
    if base64_form:
        return (f"begin-base64 644 {name}\r\n".encode() + base64.encodebytes(data).replace(b"\n", b"\r\n")
                + b"====\r\n")
    lines = b"".join(binascii.b2a_uu(data[i:i + 45]).replace(b"\n", b"\r\n") for i in range(0, len(data), 45))
    return f"begin 644 {name}\r\n".encode() + lines + b"`\r\nend\r\n"


def yencoded(name: str, data: bytes) -> bytes:
    """`data` as yEnc writes it into a text ("=ybegin ... name=NAME" ... "=yend")."""
    out = bytearray()
    for b in data:
        c = (b + 42) & 0xFF
        out += bytes((0x3D, (c + 64) & 0xFF)) if c in (0, 10, 13, 0x3D) else bytes((c,))
    return (f"=ybegin line=128 size={len(data)} name={name}\r\n".encode() + bytes(out) + b"\r\n"
            + f"=yend size={len(data)}\r\n".encode())
