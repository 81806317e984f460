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

from .scanners import CLEAN, FOUND, ScanResult

CACHED = "cached"    # detail of a result that came from the cache


class Fingerprint:
    """What makes two messages the same for the engines: the connecting client's address (DNS
    block lists judge it), the From and Subject headers, and the body. Received, To, Date and
    Message-ID differ between the copies of one bulk mailing and are left out."""

    HEADERS = ("from", "subject")

    def __init__(self, client_address: str):
        self._body = hashlib.sha256()
        self._head = [client_address.encode("ascii", "replace")]

    def header(self, name: str, value: bytes) -> None:
        if name.lower() in self.HEADERS:
            self._head.append(name.lower().encode("ascii", "replace") + b":" + value.strip())

    def body(self, chunk: bytes) -> None:
        self._body.update(chunk)

    def digest(self) -> bytes:
        head = hashlib.sha256(b"\0".join(self._head)).digest()
        return hashlib.sha256(head + self._body.digest()).digest()


class ScanCache:
    def __init__(self, seconds: float, entries: int, clock=time.monotonic):
        self.seconds, self.entries, self.clock = seconds, entries, clock
        self._items: OrderedDict[tuple[str, bytes], tuple[float, ScanResult]] = OrderedDict()
        self._lock = threading.Lock()

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
