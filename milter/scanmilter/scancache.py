"""Scan results of identical messages, kept for a short time.

Bulk mail sends the same message in many transactions, one per recipient or per batch. Each
engine's clean or found result is kept under the message's fingerprint (see `fingerprint`),
so a repeat costs a dictionary look-up instead of another spamd run (~300 ms of CPU). Errors
and skips are never kept: a repeat is scanned again. Entries expire after
scan_cache_seconds; clamd's entries go when its signature database changes, all of them on
reload.
"""
from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections import OrderedDict

from .scanners import CACHED, CLEAN, FOUND, ScanResult


# Headers whose values differ between the copies of one mailing and by which neither engine
# decodes content: clamd's MIME parser reads Content-Type, Content-Transfer-Encoding and
# Content-Disposition (and tells mail from other files by the first header's name),
# SpamAssassin's parser the same Content-* fields. SpamAssassin's rules do read these values,
# but on a message coming straight from the client they can only add to a score, never lower it
# (the relay it judges is the client, from the origin, which is part of the key). Their names
# and order still count.
CACHE_IGNORED_HEADERS = ("Received", "Date", "Message-ID", "To", "Cc", "Delivered-To", "X-Original-To",
                         "DKIM-Signature")


class Fingerprint:
    """What makes two messages the same for the engines: where the message came from (the
    client as the engines see it), every header in order with its exact value, and the body.
    Only the values of `ignored` headers (CACHE_IGNORED_HEADERS) are left out."""

    def __init__(self, origin: bytes, ignored=CACHE_IGNORED_HEADERS):
        self._ignored = frozenset(n.lower() for n in ignored)
        self._head = hashlib.sha256()
        self._field(origin)
        self._body = hashlib.sha256()

    def _field(self, data: bytes) -> None:
        # length-prefixed, so that no two different header sections hash alike
        self._head.update(len(data).to_bytes(8, "big") + data)

    def header(self, name: str, value: bytes) -> None:
        self._field(name.encode("utf-8", "surrogateescape"))
        self._field(b"" if name.lower() in self._ignored else b"=" + value)

    def body(self, chunk: bytes) -> None:
        self._body.update(chunk)

    def digest(self) -> bytes:
        return hashlib.sha256(self._head.digest() + self._body.digest()).digest()


class ScanCache:
    """Clean and found results by (engine, fingerprint), for `seconds` each and at most `entries`
    in all (the least recently used go first); a result read back carries the detail CACHED.
    Off when either limit is 0. Shared by every connection's thread, so every change holds the lock."""

    def __init__(self, seconds: float, entries: int, ignored_headers=CACHE_IGNORED_HEADERS, clock=time.monotonic):
        self.seconds, self.entries, self.clock = seconds, entries, clock
        self.ignored_headers = tuple(ignored_headers)
        self._items: OrderedDict[tuple[str, bytes], tuple[float, ScanResult]] = OrderedDict()
        self._lock = threading.Lock()

    def fingerprint(self, origin: bytes) -> Fingerprint:
        """A new fingerprint for one message, keyed as this cache is configured."""
        return Fingerprint(origin, self.ignored_headers)

    @property
    def enabled(self) -> bool:
        return self.seconds > 0 and self.entries > 0

    def get(self, engine: str, key: bytes) -> ScanResult | None:
        if not self.enabled:
            return None
        with self._lock:
            item = self._items.get((engine, key))
            if item is None:
                return None
            expires, result = item
            if expires <= self.clock():
                del self._items[(engine, key)]
                return None
            self._items.move_to_end((engine, key))
        return dataclasses.replace(result, detail=CACHED, seconds=0.0)

    def put(self, engine: str, key: bytes, result: ScanResult) -> None:
        if not self.enabled or result.outcome not in (CLEAN, FOUND):
            return
        with self._lock:
            self._items[(engine, key)] = (self.clock() + self.seconds, result)
            self._items.move_to_end((engine, key))
            while len(self._items) > self.entries:
                self._items.popitem(last=False)

    def forget(self, engine: str) -> int:
        """Drop one engine's entries (clamd's, when its signatures change); how many went."""
        with self._lock:
            gone = [k for k in self._items if k[0] == engine]
            for k in gone:
                del self._items[k]
        return len(gone)

    def __len__(self) -> int:
        return len(self._items)
