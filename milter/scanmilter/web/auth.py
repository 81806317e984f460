"""Postmasters on the web page: password hashes in a file, sessions, and rate limits on login.

The password file (web_password_file) has one `login:hash` line per postmaster, written by
`scanmilter web passwd LOGIN`; it is read at each login, so a change needs no restart. A hash is
scrypt from the standard library (hashlib.scrypt: memory-hard, N=2^14, r=8, p=1, 16 random bytes
of salt), written as  scrypt$N$r$p$SALT$HASH  (base64).

Sessions live in the web process's memory: the cookie carries a random token (256 bits) and the
server keeps only its SHA-256, with the login, the form key of the session and the expiry
(web_session_lifetime). Logging out or restarting the service ends them.

Rate limits: at most web_login_attempt_limit failed logins per client address and per login
within web_login_window; past it every try (even with the right password) is refused until the
oldest failure leaves the window. The counts are per web process.

SECURITY: an unknown login costs the same scrypt as a known one (no timing oracle); hashes are
compared in constant time; the file must not be readable by others.
"""
from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import os
import re
import secrets
import stat
import tempfile
import threading
from dataclasses import dataclass

from ..config import ConfigError

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1
SCRYPT_MAXMEM = 64 * 1024 * 1024
LOGIN = re.compile(r"[A-Za-z0-9._@-]{1,64}")
PASSWORD_MAX = 1024             # characters; longer input is refused before hashing
SESSIONS_MAX = 1000             # sessions kept at once; the oldest goes first
LIMITER_KEYS_MAX = 100000       # addresses and logins tracked by the rate limiter at once


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8", "surrogateescape"), salt=salt, n=n, r=r, p=p,
                          maxmem=SCRYPT_MAXMEM, dklen=32)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return "$".join(["scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P),
                     base64.b64encode(salt).decode(), base64.b64encode(digest).decode()])


_DUMMY = hash_password(secrets.token_hex(16))       # what an unknown login is checked against


def check_password(stored: str | None, password: str) -> bool:
    """Whether `password` matches a stored hash; an unknown login (None) or an unreadable hash
    costs the same time and is False."""
    if len(password) > PASSWORD_MAX:
        return False
    parts = (stored or "").split("$")
    ok = len(parts) == 6 and parts[0] == "scrypt"
    try:
        n, r, p = (int(x) for x in parts[1:4]) if ok else (SCRYPT_N, SCRYPT_R, SCRYPT_P)
        salt, want = (base64.b64decode(parts[4]), base64.b64decode(parts[5])) if ok else (b"x" * 16, b"")
        if not (2 <= n <= 2 ** 20 and 1 <= r <= 32 and 1 <= p <= 16):
            raise ValueError
    except ValueError:
        ok, (n, r, p), salt, want = False, (SCRYPT_N, SCRYPT_R, SCRYPT_P), b"x" * 16, b""
    if not ok:
        _scrypt(password, base64.b64decode(_DUMMY.split("$")[4]), SCRYPT_N, SCRYPT_R, SCRYPT_P)
        return False
    return hmac.compare_digest(_scrypt(password, salt, n, r, p), want)


def read_passwords(path: str) -> dict[str, str]:
    """{login: hash} of the password file. ConfigError when it is unset, unreadable or open to others."""
    if not path:
        raise ConfigError("web_password_file is not set: there is no postmaster login")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"web_password_file {path}: cannot read: {e.strerror}") from None
    with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o007:
            raise ConfigError(f"web_password_file {path}: not a regular file, or open to others (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}); make it 0640 root:scanmilter")
        lines = f.read(1024 * 1024).splitlines()
    users = {}
    for line in lines:
        login, sep, stored = line.strip().partition(":")
        if sep and LOGIN.fullmatch(login):
            users[login] = stored
    return users


def write_password(path: str, login: str, password: str) -> bool:
    """Set a login's hash in the password file (created 0640 with its directory's group; an
    existing file keeps its owner, group and mode). True when the login is new."""
    if not LOGIN.fullmatch(login):
        raise ValueError("a login is 1 to 64 letters, digits and . _ @ -")
    if not password or len(password) > PASSWORD_MAX:
        raise ValueError(f"a password is 1 to {PASSWORD_MAX} characters")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        st = os.stat(path)
        owner, mode = (st.st_uid, st.st_gid), stat.S_IMODE(st.st_mode) & ~0o007
    except FileNotFoundError:
        lines, owner, mode = [], (os.geteuid(), os.stat(os.path.dirname(os.path.abspath(path))).st_gid), 0o640
    new = not any(line.partition(":")[0] == login for line in lines)
    entry = f"{login}:{hash_password(password)}"
    lines = [entry if line.partition(":")[0] == login else line for line in lines] + ([entry] if new else [])
    fd, temp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".passwd-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode)
            if os.geteuid() == 0:
                os.fchown(f.fileno(), *owner)
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    return new


@dataclass
class Session:
    login: str
    form_key: str           # scopes this session's form tokens
    expires: float


class Sessions:
    """Postmasters' sessions, by the SHA-256 of their cookie's token."""

    def __init__(self, lifetime: float):
        self.lifetime = lifetime
        self._lock = threading.Lock()
        self._by_hash: dict[str, Session] = {}

    @staticmethod
    def _key(token: str) -> str:
        return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()

    def create(self, login: str, now: float) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._by_hash = {k: s for k, s in self._by_hash.items() if s.expires > now}
            while len(self._by_hash) >= SESSIONS_MAX:
                oldest = min(self._by_hash, key=lambda k: self._by_hash[k].expires)
                del self._by_hash[oldest]
            self._by_hash[self._key(token)] = Session(login, secrets.token_urlsafe(16), now + self.lifetime)
        return token

    def get(self, token: str | None, now: float) -> Session | None:
        if not token or len(token) > 100:
            return None
        with self._lock:
            session = self._by_hash.get(self._key(token))
            if session is not None and session.expires <= now:
                del self._by_hash[self._key(token)]
                return None
            return session

    def end(self, token: str | None) -> None:
        if token:
            with self._lock:
                self._by_hash.pop(self._key(token), None)


class LoginLimiter:
    """Failed logins per client address and per login in a sliding window."""

    def __init__(self, limit: int, window: float):
        self.limit, self.window = limit, window
        self._lock = threading.Lock()
        self._failures: dict[str, collections.deque] = {}

    def _recent(self, key: str, now: float) -> collections.deque:
        times = self._failures.get(key)
        if times is None:
            return collections.deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    def wait(self, address: str, login: str, now: float) -> float:
        """Seconds until the address and the login may try again; 0 when they may now."""
        with self._lock:
            waits = [times[0] + self.window - now for key in (f"a:{address}", f"l:{login.lower()}")
                     if len(times := self._recent(key, now)) >= self.limit]
        return max(waits, default=0.0)

    def failed(self, address: str, login: str, now: float) -> None:
        with self._lock:
            if len(self._failures) >= LIMITER_KEYS_MAX:     # a flood of addresses: forget the stalest
                for key in sorted(self._failures, key=lambda k: self._failures[k][-1])[:LIMITER_KEYS_MAX // 10]:
                    del self._failures[key]
            for key in (f"a:{address}", f"l:{login.lower()[:64]}"):
                self._recent(key, now)
                self._failures.setdefault(key, collections.deque(maxlen=self.limit)).append(now)
