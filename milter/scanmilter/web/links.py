"""Signed links (the digests' "review this message" links) and form tokens (the web page's CSRF
defence), both HMAC-SHA256 under keys derived from one secret (web_key_file).

A link is  v1.ENTRY.EXPIRES.NONCE.RECIPIENT.MAC  (RECIPIENT and MAC in unpadded base64url): it names
one entry and one recipient, and is good until EXPIRES (Unix time). NONCE is the one recorded
with the digest in the entry (notify.py), which is how a link used once is known as used: the
record is marked when the link acts. A link whose MAC does not match is forged (or cut), whatever
else it says; only then are its fields believed.

SECURITY: every check is on the whole token before anything in it is used: its length, its shape
(fixed alphabets), then the MAC in constant time, then the expiry. The key file must not be
readable by others: whoever reads it can sign links for any entry and recipient.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import stat
from dataclasses import dataclass

from ..config import ConfigError

KEY_MIN_BYTES = 32              # 256 bits: as much as HMAC-SHA256 can use
TOKEN_MAX_CHARS = 1024          # a recipient address is at most a few hundred bytes
VERSION = "v1"
_ID = re.compile(r"[0-9A-Za-z]{1,40}")        # file and PostgreSQL ids (24 hex), Postfix queue ids
_B64 = re.compile(r"[A-Za-z0-9_-]+")


class LinkError(Exception):
    """A link that cannot be used. kind: "forged" (malformed, cut or not signed by us) or "expired"."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Link:
    entry_id: str
    recipient: str
    expires: int
    nonce: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Keys:
    """The keys derived from the secret: one per use, so that a MAC made for one purpose is never
    valid for another."""

    def __init__(self, secret: bytes):
        if len(secret) < KEY_MIN_BYTES:
            raise ConfigError(f"the web key must have at least {KEY_MIN_BYTES} bytes, not {len(secret)}")
        self.link = hmac.new(secret, b"scanmilter link v1", hashlib.sha256).digest()
        self.form = hmac.new(secret, b"scanmilter form v1", hashlib.sha256).digest()

    @classmethod
    def from_file(cls, path: str) -> Keys:
        """The key in `path` (its bytes, trailing white space removed). ConfigError when it is not
        set, not a regular file, readable or writable by others, or too short."""
        if not path:
            raise ConfigError("web_key_file is not set: links and forms cannot be signed")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"web_key_file {path}: cannot read: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"web_key_file {path}: not a regular file")
            if st.st_mode & 0o007:
                raise ConfigError(f"web_key_file {path}: readable or writable by others (mode "
                                  f"{stat.S_IMODE(st.st_mode):04o}); make it 0640 root:scanmilter or tighter")
            secret = f.read(4096).rstrip()
        try:
            return cls(secret)
        except ConfigError as e:
            raise ConfigError(f"web_key_file {path}: {e}") from None

    # ---- links

    def sign(self, entry_id: str, recipient: str, expires: int, nonce: str | None = None) -> str:
        if not _ID.fullmatch(entry_id):
            raise ValueError(f"{entry_id!r} is not an entry id")
        nonce = nonce or secrets.token_hex(8)
        body = f"{VERSION}.{entry_id}.{int(expires)}.{nonce}.{_b64(recipient.encode('utf-8', 'surrogateescape'))}"
        return f"{body}.{_b64(hmac.new(self.link, body.encode('ascii'), hashlib.sha256).digest())}"

    def verify(self, token: str, now: float) -> Link:
        """The link a token carries, if we signed it and it has not expired; LinkError otherwise."""
        forged = LinkError("forged", "this link is not valid: it is damaged, cut short, or was not made by this site")
        if not isinstance(token, str) or len(token) > TOKEN_MAX_CHARS or not token.isascii():
            raise forged
        parts = token.split(".")
        if len(parts) != 6 or parts[0] != VERSION or not _ID.fullmatch(parts[1]) \
                or not parts[2].isdigit() or len(parts[2]) > 12 or not re.fullmatch(r"[0-9a-f]{16}", parts[3]) \
                or not all(_B64.fullmatch(p) for p in parts[4:]):
            raise forged
        body, mac = token.rpartition(".")[0], parts[5]
        try:
            given = _unb64(mac)
            recipient = _unb64(parts[4]).decode("utf-8", "surrogateescape")
        except (binascii.Error, ValueError):
            raise forged from None
        if not hmac.compare_digest(given, hmac.new(self.link, body.encode("ascii"), hashlib.sha256).digest()):
            raise forged
        link = Link(parts[1], recipient, int(parts[2]), parts[3])
        if link.expires <= now:
            raise LinkError("expired", "this link has expired")
        return link

    # ---- form tokens (CSRF): a random cookie, and a MAC of it and of what the form acts on

    def form_token(self, cookie: str, scope: str) -> str:
        data = f"{cookie}\0{scope}".encode("utf-8", "surrogateescape")
        return _b64(hmac.new(self.form, data, hashlib.sha256).digest())

    def form_token_ok(self, cookie: str | None, scope: str, token: str | None) -> bool:
        if not cookie or not token or len(token) > 100 or len(cookie) > 100 or not token.isascii():
            return False
        return hmac.compare_digest(self.form_token(cookie, scope), token)
