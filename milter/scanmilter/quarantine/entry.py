"""What is recorded about a held message: the one definition of a quarantine entry.

An entry is a JSON object of the FIELDS below. The daemon fills the fields marked DAEMON when it
holds a message (`held_meta`), the store those marked STORE when it keeps it, the quarantine
command those marked COMMAND (release, learn). The command reads an entry through its
attributes (`entry.sender`), which give a field's default for an entry written before the field
existed. A store with an index keeps the INDEX_COLUMNS (`index_row`), the file store in SQLite.

Envelope addresses with bytes that are not UTF-8 arrive surrogate-escaped (pymilter); the entry
keeps them exactly (JSON escapes them), the index shows them as \\xNN.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any

ID_PATTERN = re.compile(r"[0-9a-f]{24}")
SURROGATE = re.compile("[\ud800-\udfff]")      # an undecodable byte of an envelope address

DAEMON, STORE, COMMAND = "daemon", "store", "command"     # who writes a field


@dataclass(frozen=True)
class Field:
    name: str
    default: Any        # what an entry without the field means
    by: str             # DAEMON, STORE or COMMAND
    doc: str


FIELDS = (
    Field("queue_id", "", DAEMON, "Postfix's queue id"),
    Field("sender", "", DAEMON, "the envelope sender, as the client gave it"),
    Field("recipients", [], DAEMON, "the recipients whose copy is held (release goes to them)"),
    Field("subject", "", DAEMON, "the Subject as received"),
    Field("all_recipients", [], DAEMON, "every envelope recipient of the message"),
    Field("client_address", "", DAEMON, "the SMTP client's address"),
    Field("client_name", "", DAEMON, "the client's name as Postfix passed it ([address] when unverified)"),
    Field("auth_user", "", DAEMON, "the SASL login, empty when none"),
    Field("direction", "", DAEMON, "inbound or outbound"),
    Field("reason", "", DAEMON, "why it is held: virus, spam, ..."),
    Field("viruses", [], DAEMON, "the signatures clamd found"),
    Field("score", None, DAEMON, "spamd's score, None when not scored"),
    Field("rules", [], DAEMON, "the SpamAssassin rules that hit"),
    Field("rule", "", DAEMON, "the policy setting that decided, and where it came from"),
    Field("id", "", STORE, "24 hex digits, chosen at random by the store"),
    Field("time", 0.0, STORE, "when it was held (Unix time)"),
    Field("size", 0, STORE, "the message's size in bytes"),
    Field("released", [], STORE, "each release: {at, by, to, stripped (forged verdict headers removed)}, "
                                 "and host (where it was released) in a shared store"),
    Field("host", "", STORE, "the host that received and held it (database_host_name), in a shared store"),
    Field("release_address", "", STORE, "that host's release service (quarantine_release_address), in a shared store"),
    Field("learned", [], COMMAND, "each lesson given to spamd: {at, by, as (ham or spam)}"),
    Field("notified", [], COMMAND, "each digest that listed it: {to, at, nonce (its link's), host}"),
)
_DEFAULTS = {f.name: f.default for f in FIELDS}


def valid_id(text: str) -> bool:
    return bool(ID_PATTERN.fullmatch(text))


def held_meta(**values) -> dict:
    """The metadata the daemon records for a message it holds: every DAEMON field, no other."""
    wanted = [f.name for f in FIELDS if f.by == DAEMON]
    if set(values) != set(wanted):
        raise TypeError(f"held_meta: missing {sorted(set(wanted) - set(values))}, "
                        f"unknown {sorted(set(values) - set(wanted))}")
    return {name: values[name] for name in wanted}


@dataclass
class Entry:
    """One held message's metadata (the message itself stays in the store)."""
    meta: dict

    @property
    def id(self) -> str:
        return self.meta["id"]

    def __getattr__(self, name: str) -> Any:
        if name not in _DEFAULTS:
            raise AttributeError(name)
        return self.meta.get(name, copy.copy(_DEFAULTS[name]))


# ---- the index: what a store searches and lists by, one row per entry

def index_text(value) -> str:
    """Text SQLite can store: undecodable bytes (lone surrogates) as \\xNN or \\uNNNN."""
    def hexed(m: re.Match) -> str:
        code = ord(m.group())
        return f"\\x{code - 0xdc00:02x}" if 0xdc80 <= code <= 0xdcff else f"\\u{code:04x}"
    return SURROGATE.sub(hexed, value if isinstance(value, str) else str(value))


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _last_release(meta: dict):
    released = meta.get("released")
    last = released[-1] if isinstance(released, list) and released else None
    return _number(last.get("at")) if isinstance(last, dict) else None


def _recipients(meta: dict) -> str:
    recipients = meta.get("recipients")
    return json.dumps([index_text(r) for r in recipients] if isinstance(recipients, list) else [], ensure_ascii=False)


# (column, SQL type, value from the metadata): the entry's own fields, when it was last
# released, and the whole metadata as JSON
INDEX_COLUMNS = (
    ("id", "TEXT PRIMARY KEY", lambda m: m["id"]),
    ("time", "REAL", lambda m: m["time"]),
    ("queue_id", "TEXT", lambda m: index_text(m.get("queue_id", ""))),
    ("sender", "TEXT", lambda m: index_text(m.get("sender", ""))),
    ("recipients", "TEXT", _recipients),
    ("reason", "TEXT", lambda m: index_text(m.get("reason", ""))),
    ("score", "REAL", lambda m: _number(m.get("score"))),
    ("viruses", "TEXT", lambda m: json.dumps(m.get("viruses", []))),
    ("size", "INTEGER", lambda m: _number(m.get("size")) or 0),
    ("direction", "TEXT", lambda m: index_text(m.get("direction", ""))),
    ("released_at", "REAL", _last_release),
    ("meta", "TEXT", json.dumps),
)


def index_row(meta) -> tuple:
    """The index row of an entry's metadata, in INDEX_COLUMNS order; ValueError when the metadata
    is unusable."""
    if not isinstance(meta, dict) or not valid_id(str(meta.get("id", ""))) or _number(meta.get("time")) is None:
        raise ValueError("metadata without a valid id and time")
    return tuple(value(meta) for _, _, value in INDEX_COLUMNS)
