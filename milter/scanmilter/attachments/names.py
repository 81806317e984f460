"""File names out of MIME headers, and the normal form rules match them in. Pure functions.

Header parameters are parsed here rather than with the email package: its parameter parser
rescans the value for every semicolon (quadratic on a hostile header) and its RFC 2047 decoder
backtracks; these parsers make one pass. What they handle:
  - RFC 2045 parameters: token or quoted string (backslash escapes), `;` separated;
  - RFC 2231: `filename*=utf-8''%E2%80%AE...`, continuations `filename*0*=`, `filename*1=`, with
    the charset of the first segment;
  - RFC 2047 encoded words inside a parameter (not allowed there, but sent by common clients);
  - raw 8-bit names (UTF-8, else Latin-1).
Every distinct name a part carries is kept: filename= and name=, the plain and the RFC 2231
form, repeated parameters. Mail clients disagree on which one wins, so rules look at all.

The normal form undoes what makes a name look unlike what the system will do with it:
compatibility forms (NFKC: fullwidth letters, the one-dot leader), format characters (bidi
controls such as U+202E RIGHT-TO-LEFT OVERRIDE, zero-width characters), control characters,
trailing dots and spaces (Windows drops them), case. What it undid is reported as a trick.
"""
from __future__ import annotations

import binascii
import codecs
import re
import unicodedata
from urllib.parse import unquote_to_bytes

from .facts import Name

# Tricks: a small closed set, so that they can label metrics and log lines.
BIDI = "bidi controls"
INVISIBLE = "invisible characters"
CONTROL = "control characters"
TRAILING = "trailing dots or spaces"
COMPATIBILITY = "compatibility characters"
MIXED_SCRIPTS = "mixed scripts"
LOOKALIKE = "look-alike letters"
DIRECTORY = "directory part"

# Explicit embeddings, overrides and isolates, and the implicit marks (LRM, RLM, ALM).
_BIDI_CONTROLS = frozenset(map(chr, [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C]))

# Letters of other scripts that look like Latin ones in common fonts (after case folding):
# enough to see "invoice.еxе" (Cyrillic е) as "invoice.exe". Unicode's confusables list is far
# longer; these are the ones seen in file-name spoofing.
_LOOKALIKES = str.maketrans({
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "ё": "e", "һ": "h", "і": "i", "ї": "i", "ј": "j", "к": "k", "ӏ": "l",
    "м": "m", "н": "h", "о": "o", "р": "p", "ԛ": "q", "с": "c", "ѕ": "s", "т": "t", "у": "y", "ԝ": "w",
    "х": "x", "ԁ": "d", "ɡ": "g",
    # Greek
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",
    "υ": "u", "χ": "x", "ω": "w",
    # Latin letters that pass for others
    "ı": "i", "ȷ": "j", "ɑ": "a", "ɩ": "i", "ʏ": "y",
})

# Scripts that mix within one word in ordinary writing (Japanese), counted as one.
_SCRIPT_GROUPS = {"HIRAGANA": "CJK", "KATAKANA": "CJK", "HALFWIDTH": "CJK", "IDEOGRAPHIC": "CJK"}

# Python codecs that are no mail charset: the escape codecs read backslashes as Python does,
# punycode and idna are domain name codecs whose decoders grow faster than their input.
_NOT_CHARSETS = frozenset({"punycode", "idna", "unicode-escape", "raw-unicode-escape"})
_SURROGATES = re.compile("[\ud800-\udfff]")

_EXTENDED = re.compile(r"(?P<name>[^*]+)\*(?:(?P<index>\d{1,3})(?P<ext>\*)?|)$")
# One RFC 2047 encoded word; encoded text holds neither "?" nor white space, so no backtracking.
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"(?<=\?=)[ \t\r\n]+(?==\?)")


# ---- header values ---------------------------------------------------------------------------

def text(raw: bytes) -> str:
    """A header value's bytes as text: UTF-8 (RFC 6532), else Latin-1 (never fails)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _decode_bytes(data: bytes, charset: str) -> str:
    """`data` in the sender's charset; an unknown or unfit one falls back to text()."""
    try:
        codec = codecs.lookup(charset.strip() or "us-ascii").name
        if codec in _NOT_CHARSETS:
            raise LookupError(codec)
        decoded = data.decode(codec)
    except (LookupError, UnicodeError, ValueError):
        return text(data)
    return _SURROGATES.sub("\ufffd", decoded)       # utf-7 and friends can decode to lone surrogates


def split_value(value: str) -> tuple[str, list[tuple[str, str]], list[str]]:
    """'attachment; filename="a.pdf"' -> ("attachment", [("filename", "a.pdf")], problems).

    One pass over the value; quoted strings may hold `;` and backslash escapes and keep their
    white space. Parameter names are lower-cased; values are returned as sent (RFC 2231 and 2047
    not yet applied)."""
    items: list[tuple[str, bool]] = []          # (text, whether its value was quoted)
    current: list[str] = []
    in_quotes = escaped = was_quoted = False
    problems = []
    for ch in value:
        if in_quotes:
            if escaped:
                current.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_quotes = False
            else:
                current.append(ch)
        elif ch == '"':
            # white space between "=" and the quote is not part of the value
            while current and current[-1] in " \t\r\n":
                current.pop()
            in_quotes = was_quoted = True
        elif ch == ";":
            items.append(("".join(current), was_quoted))
            current, was_quoted = [], False
        elif not (was_quoted and ch in " \t\r\n"):       # white space after a closing quote
            current.append(ch)
    if in_quotes:
        problems.append("unterminated quoted string in a header")
    items.append(("".join(current), was_quoted))
    main = items[0][0].strip().lower()
    params = []
    for item, was_quoted in items[1:]:
        name, eq, val = item.partition("=")
        name = name.strip().lower()
        if not eq or not name:
            if item.strip():
                problems.append("a header parameter without a value")
            continue
        params.append((name, val if was_quoted else val.strip()))
    return main, params, problems


def decode_words(value: str) -> tuple[str, bool]:
    """RFC 2047 encoded words in `value` decoded; (text, whether one was broken)."""
    if "=?" not in value:
        return value, False
    broken = False

    def one(m: re.Match) -> str:
        nonlocal broken
        charset, encoding, encoded = m.group(1).partition("*")[0], m.group(2).lower(), m.group(3)
        try:
            if encoding == "b":
                data = binascii.a2b_base64(encoded + "=" * (-len(encoded) % 4), strict_mode=True)
            else:
                data = binascii.a2b_qp(encoded.replace("_", " "))
        except (binascii.Error, ValueError):
            broken = True
            return m.group(0)
        return _decode_bytes(data, charset)
    return _ENCODED_WORD.sub(one, _BETWEEN_WORDS.sub("", value)), broken


def params(pairs: list[tuple[str, str]], wanted: str) -> tuple[list[str], list[str]]:
    """Every value of parameter `wanted` (plain, RFC 2231 extended, continued), decoded, each
    distinct value once; and problems seen."""
    values: list[str] = []
    problems: list[str] = []
    segments: dict[int, tuple[str, bool]] = {}
    plain = 0
    for name, raw in pairs:
        if name == wanted:
            plain += 1
            decoded, broken = decode_words(raw)
            values.append(decoded)
            if broken:
                problems.append("a broken RFC 2047 encoded word in a file name")
            continue
        m = _EXTENDED.match(name)
        if not m or m.group("name") != wanted:
            continue
        if m.group("index") is None:                       # filename*=charset'lang'%XX
            values.append(_extended(raw))
        else:
            index = int(m.group("index"))
            if index in segments:
                problems.append(f"repeated RFC 2231 segment {wanted}*{index}")
            else:
                segments[index] = (raw, bool(m.group("ext")))
    if plain > 1:
        problems.append(f"{plain} {wanted} parameters")
    if segments:
        values.append(_continued(segments, problems))
    return list(dict.fromkeys(v for v in values if v)), problems


def _extended(raw: str, charset: str | None = None) -> str:
    """An RFC 2231 extended value: "charset'language'%XX..." (or, for a later segment, "%XX...")."""
    if charset is None:
        charset, quote1, rest = raw.partition("'")
        if not quote1:
            return text(unquote_to_bytes(raw))
        _language, _, raw = rest.partition("'")
    return _decode_bytes(unquote_to_bytes(raw), charset)


def _continued(segments: dict[int, tuple[str, bool]], problems: list[str]) -> str:
    if sorted(segments) != list(range(len(segments))):
        problems.append("RFC 2231 continuation segments missing")
    first, first_ext = segments[min(segments)]
    charset = "us-ascii"
    if first_ext and "'" in first:
        charset, _, rest = first.partition("'")
        first = rest.partition("'")[2]
    out = []
    for i in sorted(segments):
        raw, ext = segments[i]
        if i == min(segments):
            raw = first
        out.append(_decode_bytes(unquote_to_bytes(raw), charset or "us-ascii") if ext else raw)
    return "".join(out)


# ---- the normal form -------------------------------------------------------------------------

def extensions(basename: str) -> tuple[str, ...]:
    """Every extension of a file name, in order: "x.pdf.exe" -> ("pdf", "exe")."""
    return tuple(e for e in (p.strip() for p in basename.split(".")[1:]) if e)


def _script(ch: str) -> str:
    word = unicodedata.name(ch, "UNKNOWN").split(" ", 1)[0]
    return _SCRIPT_GROUPS.get(word, word)


def _mixed_words(name: str) -> list[str]:
    """The scripts of each word that mixes letters of more than one script."""
    mixed = set()
    for word in re.split(r"[\W\d_]+", name):
        scripts = {_script(c) for c in word if c.isalpha()}
        if len(scripts) > 1:
            mixed |= scripts
    return sorted(s.lower() for s in mixed)


def normalise(sent: str, source: str) -> Name:
    """The Name record of one name as sent."""
    tricks = []
    compat = unicodedata.normalize("NFKC", sent)
    if compat != unicodedata.normalize("NFC", sent):
        tricks.append(COMPATIBILITY)
    kept = []
    for ch in compat:
        category = unicodedata.category(ch)
        if ch in _BIDI_CONTROLS:
            tricks.append(BIDI)
        elif category == "Cf":
            tricks.append(INVISIBLE)
        elif category == "Cc":
            tricks.append(CONTROL)
        else:
            kept.append(ch)
    clean = "".join(kept)
    stripped = clean.rstrip(". \t").strip()
    if clean.rstrip(". \t") != clean:
        tricks.append(TRAILING)
    normal = unicodedata.normalize("NFKC", stripped.casefold())
    parts = [p for p in re.split(r"[/\\]", normal) if p.strip()]
    basename = parts[-1].rstrip(". ").strip() if parts else ""
    if len(parts) > 1:
        tricks.append(DIRECTORY)
    skeleton = basename.translate(_LOOKALIKES)
    mixed = _mixed_words(basename)
    if mixed:
        tricks.append(MIXED_SCRIPTS)
        if skeleton != basename:
            tricks.append(LOOKALIKE)
    return Name(sent, source, normal, basename, extensions(basename), skeleton, tuple(dict.fromkeys(tricks)))
