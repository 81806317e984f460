"""Allow and block lists and per-recipient settings kept in PostgreSQL, read by every host.

With `shared_lists = true` the daemon reads the tables of schema/0002_lists.sql from the database
of the `database_*` settings and merges them into the policy of `policy_file`:

- Lists (allow_/block_ senders, clients, recipients): the file's entries and the database's both
  apply (a union). Block lists are checked before allow lists, as always, so a database entry
  can add a block or an exemption but never lift a block that the file sets.
- Per-recipient settings (the keys of [DIRECTION.recipients."a@b"]): for the same recipient and
  key the file wins. The file is root's, reviewed and deployed to each host; the database can
  be written from any host by whoever holds its credentials, so it adds settings but cannot
  quietly undo one the file decided. A database setting still beats the file's [DIRECTION] and
  [DIRECTION.domains."b"] values: the most specific scope wins, as in the file alone.
- allow_senders_clients, allow_skips_virus_scan and everything else stay in the file only.

Every row is validated as the policy file's values are (config.validate, the same regular
expressions), and the merged policy passes the same rule checks (thresholds in order, the
quarantine present). A row that fails validation (written past scanmilter's checks) is left out,
and so are the settings of a recipient that break this host's rules (each host has its own
file): each is named in a warning, and the rest of the copy applies, so that one row can never
hold back every later change on every host, nor leave a restarted daemon without any database
entry. A database that cannot be reached, a revision that goes back, another database instance,
more than `shared_lists_entry_limit` rows: the refresh fails and the last good copy stays in
force; before any good copy the file policy alone applies. The policy never empties silently.
`scanmilter_shared_lists_age_seconds` says how old the copy is.

A host polls one row (scanmilter_lists_state: instance and revision) every
`shared_lists_refresh_interval` seconds and reads the tables only when the revision moved; a
trigger moves it on every change and sends NOTIFY, which a LISTEN connection turns into a
refresh at once.
"""
from __future__ import annotations

import dataclasses
import getpass
import ipaddress
import math
import os
import re
import socket
import threading
import time
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from . import config, db, policyfile
from .config import ConfigError
from .logs import escape, log
from .policy import INBOUND, OUTBOUND, Policy, Scope, in_networks

LISTS = ("allow_senders", "allow_clients", "allow_recipients", "block_senders", "block_clients", "block_recipients")
NETWORK_LISTS = ("allow_clients", "block_clients")
CHANNEL = "scanmilter_lists"          # NOTIFY channel of the trigger in schema/0002_lists.sql
DIRECTIONS = (INBOUND, OUTBOUND)
# as policyfile checks the name of [DIRECTION.recipients."a@b"]
RECIPIENT = re.compile(r"[^@\s]+@[A-Za-z0-9.-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_VALUE = 320          # characters of a list entry or recipient (the table's limit)
MAX_TEXT = 200           # characters of "who"
MAX_COMMENT = 500        # characters of a comment
REPEAT_LOG = 300.0       # seconds: a refresh that keeps failing the same way is logged again this often


class Implausible(Exception):
    """What the database returned cannot be the lists it held before: the old copy stays."""


# ------------------------------------------------------------------ rows, validated
def when(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class Entry:
    list: str
    value: str              # normalized: lower case, or a network in CIDR form
    by: str
    at: datetime
    comment: str = ""
    role: str = ""

    def source(self) -> str:
        return (f"database, list `{self.list}`, added by {escape(self.by)} at {when(self.at)}"
                + (f" ({escape(self.comment)})" if self.comment else ""))


@dataclass(frozen=True)
class RecipientSetting:
    direction: str
    recipient: str
    key: str
    value: Any              # as the policy file would give it
    by: str
    at: datetime | None     # None: a change `scanmilter lists` checks before writing it
    comment: str = ""
    role: str = ""

    @property
    def target(self) -> str:
        return f"{self.direction}:{self.recipient}"

    def source(self) -> str:
        table = f'[{self.direction}.recipients."{escape(self.recipient)}"] `{self.key}`'
        if self.at is None:
            return f"{table} (this change)"
        return (f"database, {table}, set by {escape(self.by)} at {when(self.at)}"
                + (f" ({escape(self.comment)})" if self.comment else ""))


@dataclass(frozen=True)
class Copy:
    """One consistent read of the database's lists and settings."""
    instance: str
    revision: int
    changed_at: datetime
    entries: tuple[Entry, ...] = ()
    settings: tuple[RecipientSetting, ...] = ()
    left_out: tuple[str, ...] = ()          # rows that failed validation, each saying why (not applied)


def check_text(what: str, text: str, limit: int) -> str:
    if not isinstance(text, str) or _CONTROL.search(text) or len(text) > limit:
        raise ConfigError(f"{what}: at most {limit} characters, no control characters, not {text!r}")
    return text


def check_entry(name: str, value: str, where: str = "") -> str:
    """A list entry as the policy file's [lists] checks it; returns it normalized (addresses in
    lower case, networks in CIDR form). ConfigError otherwise."""
    where = f"{where}: " if where else ""
    if name not in LISTS:
        raise ConfigError(f"{where}unknown list {name!r}; the shared lists are {', '.join(LISTS)}")
    if not isinstance(value, str) or not value or len(value) > MAX_VALUE or _CONTROL.search(value):
        raise ConfigError(f"{where}{name}: an entry is 1 to {MAX_VALUE} characters without control "
                          f"characters, not {value!r}")
    # the check the policy file's [lists] value gets (config.LISTS_SETTINGS), for this one entry
    problem = next(s for s in config.LISTS_SETTINGS if s.name == name).check([value])
    if problem:
        raise ConfigError(f"{where}{name}: {problem}")
    if name in NETWORK_LISTS:
        return str(ipaddress.ip_network(value, strict=False))
    return value.lower()


def parse_value(text: str) -> Any:
    """A setting's value as typed: a TOML literal (8, 5.0, inf, "spamd", true), or else a word,
    taken as a string (reject, spamd)."""
    check_text("a value", text, 1000)
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def check_setting(direction: str, recipient: str, key: str, value: Any, where: str = "") -> tuple[str, str, str, Any]:
    """(direction, recipient, key, value) of one per-recipient setting, checked as the policy file
    checks [DIRECTION.recipients."a@b"]; the recipient in lower case. ConfigError otherwise."""
    where = where or f"{direction}:{recipient}"
    if direction not in DIRECTIONS:
        raise ConfigError(f"{where}: the direction is inbound or outbound, not {direction!r}")
    if (not isinstance(recipient, str) or not RECIPIENT.fullmatch(recipient) or _CONTROL.search(recipient)
            or len(recipient) > MAX_VALUE):
        raise ConfigError(f"{where}: {recipient!r} is not an address")
    checked = policyfile._direction_settings({key: value}, (direction, "recipients", recipient), lambda *a: where)
    value = checked[key]
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{where}: {key} must be a number, not nan")
    return direction, recipient.lower(), key, value


# ------------------------------------------------------------------ reading the database
_STATE = "SELECT instance::text, revision, changed_at FROM scanmilter_lists_state"
_ENTRIES = ("SELECT list, value, added_by, added_at, comment, added_role FROM scanmilter_list_entries "
            "ORDER BY list, value LIMIT %s")
_SETTINGS = ("SELECT direction, recipient, key, value, set_by, set_at, comment, set_role "
             "FROM scanmilter_recipient_settings ORDER BY direction, recipient, key LIMIT %s")


def read_state(conn) -> tuple[str, int, datetime]:
    row = conn.execute(_STATE).fetchone()
    if row is None:
        raise Implausible("scanmilter_lists_state has no row (was it emptied by hand?)")
    return row


def read(conn, limit: int, state: tuple | None = None) -> Copy:
    """The lists and settings, validated row by row. A row that fails (one that PostgreSQL's
    constraints let through, written with psql: cidr's short forms such as '10/8', an upper-case
    letter that lower() of the C collation keeps) is left out of the copy and named in
    `Copy.left_out`: one such row must not keep every other row of every host from applying.
    Implausible says when there are more than `limit` rows. Call it in one transaction with
    read_state (REPEATABLE READ: one snapshot)."""
    instance, revision, changed_at = state or read_state(conn)
    entries, settings, left_out, rows = [], [], [], 0
    for name, value, by, at, comment, role in conn.execute(_ENTRIES, (limit + 1,)).fetchall():
        rows += 1
        where = f"database, list `{name}` {value!r} (added by {by} at {when(at)})"
        try:
            if check_entry(name, value, where) != value:
                raise ConfigError(f"{where}: not stored in its normal form")
        except ConfigError as e:
            left_out.append(str(e))
            continue
        entries.append(Entry(name, value, by, at, comment, role))
    for direction, recipient, key, text, by, at, comment, role in conn.execute(_SETTINGS, (limit + 1,)).fetchall():
        rows += 1
        where = f'database, [{direction}.recipients."{recipient}"] {key} = {text} (set by {by} at {when(at)})'
        try:
            try:
                value = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                raise ConfigError(f"{where}: not a TOML value") from None
            checked = check_setting(direction, recipient, key, value, where)
            if checked[1] != recipient:
                raise ConfigError(f"{where}: the recipient is not in lower case")
        except ConfigError as e:
            left_out.append(str(e))
            continue
        settings.append(RecipientSetting(direction, recipient, key, checked[3], by, at, comment, role))
    if rows > limit:
        raise Implausible(f"the database holds more than shared_lists_entry_limit ({limit}) entries and settings")
    return Copy(instance, revision, changed_at, tuple(entries), tuple(settings), tuple(left_out))


def read_database(database, limit: int, check_schema: bool = True) -> Copy:
    with database.connection() as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        if check_schema:
            db.check_schema(conn)
        return read(conn, limit)


# ------------------------------------------------------------------ merging with the file
@dataclass(frozen=True)
class SharedPolicy(Policy):
    """The file's policy with the database's lists and settings merged in, and where each came from."""
    file: Policy | None = None
    database: Copy | None = None
    # (direction, recipient) -> {key: RecipientSetting}: the database settings in force
    from_database: dict = field(default_factory=dict)
    # (direction, recipient) -> why its database settings are not in force on this host
    left_out: dict = field(default_factory=dict)

    def scope(self, direction: str, recipient: str) -> Scope:
        s = Policy.scope(self, direction, recipient)
        rcpt = recipient.lower()
        taken = self.from_database.get((direction, rcpt))
        if not taken:
            return s
        origin = dict(s.origin)
        origin.update({key: f'database [{direction}.recipients."{rcpt}"]' for key in taken})
        return Scope(s.values, origin)


def merge(file_policy: Policy, copy: Copy | None) -> tuple[Policy, list[str]]:
    """(the policy in force, warnings the database adds). A recipient whose database settings
    break a rule the file must keep on this host (thresholds out of order against the file's
    values, a quarantine this host lacks) keeps the file's settings alone, and a warning says so:
    hosts have files of their own, and a row that fits one must not stop every other row from
    applying on the others. Those recipients are in the result's `left_out`."""
    if copy is None:
        return file_policy, []
    warnings = [f"{why}: left out" for why in copy.left_out]
    merged, taken = _combine(file_policy, copy, frozenset())
    where = _where(file_policy, taken)
    before = set(policyfile._check_rules(file_policy, {}, where))
    try:
        found = policyfile._check_rules(merged, {}, where)
    except ConfigError:
        bad = {scope: why for scope in taken if (why := _scope_problem(file_policy, merged, scope, where))}
        merged, taken = _combine(file_policy, copy, frozenset(bad))
        merged = dataclasses.replace(merged, left_out=bad)
        warnings += [f"{why}; the database's settings for {scope[0]}:{escape(scope[1])} are left out on this host"
                     for scope, why in bad.items()]
        found = policyfile._check_rules(merged, {}, where)
    return merged, warnings + [w for w in found if w not in before]


def _scope_problem(file_policy: Policy, merged: Policy, scope: tuple[str, str], where) -> str:
    """Why one recipient's merged settings break the rules on this host, or ""."""
    direction, recipient = scope
    recipients = {d: {} for d in DIRECTIONS}
    recipients[direction] = {recipient: merged.recipients[direction][recipient]}
    probe = dataclasses.replace(file_policy, recipients=recipients)
    try:
        policyfile._check_rules(probe, {}, where)
    except ConfigError as e:
        return str(e)
    return ""


def _combine(file_policy: Policy, copy: Copy, skip: frozenset) -> tuple[SharedPolicy, dict]:
    """The file's policy with the copy merged in, but the settings of the recipients in `skip`."""
    lists: dict[str, Any] = {}
    for name in LISTS:
        mine = [e.value for e in copy.entries if e.list == name]
        ours = getattr(file_policy, name)
        if name in NETWORK_LISTS:
            extra = [n for n in dict.fromkeys(ipaddress.ip_network(v) for v in mine) if n not in ours]
            lists[name] = tuple(ours) + tuple(extra)
        else:
            lists[name] = frozenset(ours) | frozenset(mine)
    recipients = {d: {r: dict(v) for r, v in file_policy.recipients.get(d, {}).items()} for d in DIRECTIONS}
    taken: dict[tuple[str, str], dict[str, RecipientSetting]] = {}
    for s in copy.settings:
        in_file = file_policy.recipients.get(s.direction, {}).get(s.recipient, {})
        if s.key in in_file or (s.direction, s.recipient) in skip:
            continue             # the file wins for the same recipient and key
        recipients[s.direction].setdefault(s.recipient, {})[s.key] = s.value
        taken.setdefault((s.direction, s.recipient), {})[s.key] = s
    merged = SharedPolicy(**{f.name: getattr(file_policy, f.name) for f in dataclasses.fields(Policy)}
                          | lists | {"recipients": recipients},
                          file=file_policy, database=copy, from_database=taken)
    return merged, taken


def _where(file_policy: Policy, taken: dict):
    """`where(path, key)` for policyfile's rule checks: the database row, or the file and line."""
    source, text = _file_text(file_policy)

    def where(path: tuple[str, ...], key: str | None = None) -> str:
        if len(path) == 3 and path[1] == "recipients" and (path[0], path[2]) in taken:
            rows = taken[(path[0], path[2])]
            if key in rows:
                return rows[key].source()
            if key is None and path[2] not in file_policy.recipients.get(path[0], {}):
                return f'database, [{path[0]}.recipients."{escape(path[2])}"]'
        if path == ("lists",):
            return f"{config.locate(source, text, path, key)} and the database"
        return config.locate(source, text, path, key)
    return where


def _file_text(file_policy: Policy) -> tuple[str, str | None]:
    path = file_policy.source
    if path == "default policy":
        return path, None
    return path, config.read_text(path) or None


# ------------------------------------------------------------------ explain: where each thing came from
def sources(policy: Policy, client_address: str, sender: str, recipient: str, direction: str) -> list[str]:
    """One line per list entry that matches this client, sender or recipient (allow and block
    lists alike) and per setting overridden for this recipient or its domain, naming where it came
    from: the policy file and its line, or the database row with who added it and when."""
    file_policy = policy.file if isinstance(policy, SharedPolicy) and policy.file else policy
    copy = policy.database if isinstance(policy, SharedPolicy) else None
    source, text = _file_text(file_policy)
    in_file = f"policy file {source}" if text is not None else "the built-in default policy"

    def file_line(path, key):
        return f"policy file {config.locate(source, text, path, key)}" if text is not None else in_file

    out = []
    candidates = {"senders": _address_keys(sender), "recipients": _address_keys(recipient)}
    for name in (*LISTS[:3], "allow_senders_clients", *LISTS[3:]):
        kind = name.rpartition("_")[2]
        who = {"senders": f"sender <{escape(sender)}>", "recipients": f"recipient <{escape(recipient)}>"}.get(
            kind, f"client {escape(client_address)}")
        found: dict[str, list[str]] = {}
        if kind == "clients":
            for net in getattr(file_policy, name):
                if in_networks(client_address, (net,)):
                    found.setdefault(str(net), []).append(f"{file_line(('lists',), name)}, list `{name}`")
        else:
            for value in candidates[kind] & set(getattr(file_policy, name)):
                found.setdefault(value, []).append(f"{file_line(('lists',), name)}, list `{name}`")
        for e in copy.entries if copy else ():
            if e.list != name:
                continue
            hit = in_networks(client_address, (ipaddress.ip_network(e.value),)) if kind == "clients" \
                else e.value in candidates[kind]
            if hit:
                found.setdefault(e.value, []).append(e.source())
        for value, places in found.items():
            out += [f"{name} {escape(value)} matches {who}: {place}" for place in places]
    s = policy.scope(direction, recipient)
    rcpt = recipient.lower()
    domain = rcpt.rpartition("@")[2]
    taken = policy.from_database.get((direction, rcpt), {}) if isinstance(policy, SharedPolicy) else {}
    for key, origin in s.origin.items():
        if key in taken and origin.startswith("database"):
            place = taken[key].source()
        elif origin == f'[{direction}.recipients."{rcpt}"]':
            place = file_line((direction, "recipients", rcpt), key)
        elif origin == f'[{direction}.domains."{domain}"]':
            place = file_line((direction, "domains", domain), key)
        else:
            continue             # the direction's own value: "[inbound]" in the decision says it
        out.append(f"{key} = {config.toml_value(s.values[key])}: {place}")
    return out


def _address_keys(address: str) -> set[str]:
    """The forms under which `address` can be listed (policy.listed): itself, its domain, @domain."""
    address = address.lower()
    domain = address.rpartition("@")[2]
    return {address, domain, f"@{domain}"}


# ------------------------------------------------------------------ for the commands
def who() -> str:
    """Who changes the lists: the login name and this host."""
    try:
        user = getpass.getuser()
    except Exception:        # no name for this uid (a container): the number says enough
        user = str(os.getuid())
    return f"{user}@{socket.getfqdn()}"


def for_command(cfg, file_policy: Policy) -> tuple[Policy, str]:
    """(policy, a line saying where the lists came from) for `explain`: the database is read once.
    When it cannot be read the file policy alone is used, and the line says so."""
    if not cfg.shared_lists:
        return file_policy, ""
    try:
        database = db.Database.from_settings(cfg, name="scanmilter-lists")
    except db.DatabaseError as e:
        return file_policy, f"shared lists: {escape(str(e), 1000)}: decided with the policy file alone"
    try:
        copy = read_database(database, cfg.shared_lists_entry_limit)
    except (db.DatabaseError, Implausible) as e:
        return file_policy, f"shared lists: {escape(str(e), 1000)}: decided with the policy file alone"
    finally:
        database.close()
    merged, _ = merge(file_policy, copy)
    return merged, (f"shared lists: revision {copy.revision} of {database.redacted} "
                    f"({len(copy.entries)} entries, {len(copy.settings)} settings)")


# ------------------------------------------------------------------ the daemon's copy
class SharedLists:
    """Keeps `holder.policy` (the daemon's Runtime) the file policy merged with the newest good
    copy of the database's lists, refreshing in a thread of its own."""

    def __init__(self, cfg, file_policy: Policy, holder, metrics=None, database=None):
        self.cfg = cfg
        self.file_policy = file_policy
        self.holder = holder
        self.metrics = metrics
        self.database = database if database is not None else db.Database.from_settings(cfg, name="scanmilter-lists")
        self.copy: Copy | None = None
        self.fresh_at: float | None = None      # monotonic time the copy was last found current
        self.published: Policy = file_policy
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener = None
        self._failing = ""                      # the error of the failing refreshes, "" when fine
        self._failing_logged = 0.0
        if metrics is not None:
            metrics.shared_lists_age.set_function(self.age)

    # -------------------------------------------------------------- state
    def age(self) -> float:
        """Seconds since the copy in force was last found current; +Inf before the first read."""
        return math.inf if self.fresh_at is None else time.monotonic() - self.fresh_at

    def _publish(self, policy: Policy) -> None:
        # under self._lock: a reload's adopt() and a refresh never interleave their swaps
        self.published = policy
        self.holder.policy = policy

    # -------------------------------------------------------------- one refresh
    def refresh(self) -> bool:
        """Read the database when it changed; True when the copy in force is current. On any
        failure the last good copy stays (or the file policy alone, before the first)."""
        try:
            self._refresh()
        except (db.DatabaseError, ConfigError, Implausible) as e:
            self._failed(str(e))
            return False
        except Exception as e:     # a bug must neither stop the refresher nor empty the policy
            log.exception("shared lists: refresh failed")
            self._failed(f"{type(e).__name__}: {e}")
            return False
        if self._failing:
            log.info("shared lists: the database answers again; revision %d in force", self.copy.revision)
            self._failing = ""
        return True

    def _refresh(self) -> None:
        limit = self.cfg.shared_lists_entry_limit
        with self.database.connection() as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            state = read_state(conn)
            old = self.copy
            if old is not None and (state[0], state[1]) == (old.instance, old.revision):
                self.fresh_at = time.monotonic()
                return
            if old is not None and state[0] != old.instance:
                raise Implausible(f"the database is another one than before (instance {state[0]}, was "
                                  f"{old.instance}); keeping revision {old.revision} until scanmilter restarts")
            if old is not None and state[1] < old.revision:
                raise Implausible(f"the revision went back from {old.revision} to {state[1]} (a restored "
                                  "backup?); keeping the newer copy until scanmilter restarts")
            db.check_schema(conn)
            copy = read(conn, limit, state)
        with self._lock:
            merged, warnings = merge(self.file_policy, copy)
            self.copy, self.fresh_at = copy, time.monotonic()
            self._publish(merged)
        for w in warnings:
            log.warning("shared lists: %s", escape(w, 1000))
        self._log_change(old, copy)

    def _log_change(self, old: Copy | None, new: Copy) -> None:
        if old is None:
            log.info("shared lists: revision %d of %s in force: %d entries, %d settings", new.revision,
                     self.database.redacted, len(new.entries), len(new.settings))
            return
        before, after = set(_keys(old)), set(_keys(new))
        log.info("shared lists: revision %d in force (was %d): %d added, %d removed, %d unchanged",
                 new.revision, old.revision, len(after - before), len(before - after), len(after & before))
        if not new.entries and not new.settings:
            log.warning("shared lists: the database's lists and settings are now empty (revision %d); "
                        "the policy file's own still apply", new.revision)

    def _failed(self, text: str) -> None:
        if self.metrics is not None:
            self.metrics.shared_lists_refresh_failures.inc()
        now = time.monotonic()
        if text == self._failing and now - self._failing_logged < REPEAT_LOG:
            return
        self._failing, self._failing_logged = text, now
        if self.copy is None:
            log.error("shared lists: cannot read them: %s; deciding with the policy file %s alone",
                      escape(text, 1000), self.file_policy.source)
        else:
            log.error("shared lists: refresh failed: %s; keeping revision %d, last found current %.0f s ago",
                      escape(text, 1000), self.copy.revision, self.age())

    # -------------------------------------------------------------- reload
    def adopt(self, file_policy: Policy) -> Policy:
        """The policy to serve after a reload: the new file merged with the copy in force.
        ConfigError when they conflict; the reload is then refused and nothing changes."""
        with self._lock:
            merged, warnings = merge(file_policy, self.copy)
            self.file_policy, self.published = file_policy, merged
        for w in warnings:
            log.warning("shared lists: %s", escape(w, 1000))
        return merged

    def _republish_if_replaced(self) -> None:
        # a reload that computed its policy before a refresh published a newer one must not win
        with self._lock:
            if self.holder.policy is not self.published:
                self.holder.policy = self.published

    # -------------------------------------------------------------- the thread
    def start_up(self) -> None:
        """The first read, before any mail: a database that is down leaves the file policy
        alone in force, loudly; a schema that does not match stops start-up (SchemaMismatch)."""
        try:
            with self.database.connection() as conn:
                db.check_schema(conn)
        except db.SchemaMismatch:
            raise
        except db.DatabaseError as e:
            if self.metrics is not None:
                self.metrics.shared_lists_refresh_failures.inc()
            self._failing, self._failing_logged = str(e), time.monotonic()
            log.error("shared lists: the database cannot be reached at start-up (%s); until it answers, "
                      "mail is decided with the policy file %s alone (scanmilter_shared_lists_age_seconds "
                      "is +Inf)", escape(str(e), 1000), self.file_policy.source)
            return
        if not self.refresh():
            log.error("shared lists: not loaded at start-up; until a refresh succeeds, mail is decided "
                      "with the policy file %s alone", self.file_policy.source)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="shared-lists", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._listener is not None:
            try:        # wake our own LISTEN at once (other hosts only find their copy current)
                with self.database.connection() as conn:
                    conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
            except db.DatabaseError:
                pass    # the listener is broken too, and the thread waits on self._stop alone
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else
                              self.cfg.shared_lists_refresh_interval + self.cfg.database_connect_timeout + 1)
        if self._thread is None or not self._thread.is_alive():
            self.database.close()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wait(self.cfg.shared_lists_refresh_interval)
                if self._stop.is_set():
                    break
                self.refresh()
                self._republish_if_replaced()
        finally:
            self._close_listener()

    def _wait(self, seconds: float) -> None:
        """Until a NOTIFY arrives on CHANNEL, `seconds` pass, or stop() is called."""
        end = time.monotonic() + seconds
        listener = self._listen()
        if listener is not None:
            try:
                woken = any(True for _ in listener.notifies(timeout=seconds, stop_after=1))
                if woken:
                    # a burst of changes wakes us once: the refresh reads the newest revision
                    for _ in listener.notifies(timeout=0):
                        pass
                    return
            except Exception:      # the server went away: poll until a new listener connects
                self._close_listener()
        self._stop.wait(max(0.0, end - time.monotonic()))

    def _listen(self):
        if self._listener is not None:
            return self._listener
        try:
            import psycopg
            conn = psycopg.connect(db.read_dsn(self.cfg), autocommit=True, application_name="scanmilter-lists",
                                   connect_timeout=max(1, int(round(self.cfg.database_connect_timeout))))
            conn.execute(f"LISTEN {CHANNEL}")
        except Exception:          # down, or no LISTEN (a pooler): polling alone still bounds the delay
            return None
        self._listener = conn
        return conn

    def _close_listener(self) -> None:
        if self._listener is not None:
            try:
                self._listener.close()
            except Exception:
                pass
            self._listener = None


def _keys(copy: Copy):
    for e in copy.entries:
        yield ("entry", e.list, e.value)
    for s in copy.settings:
        yield ("setting", s.direction, s.recipient, s.key, repr(s.value))


def start(cfg, file_policy: Policy, holder, metrics=None) -> SharedLists:
    """The daemon's shared lists, read once and then kept current in a thread; `holder.policy`
    is set to the merged policy. SchemaMismatch (a DatabaseError) when the schema does not match."""
    shared = SharedLists(cfg, file_policy, holder, metrics)
    shared.start_up()
    shared.start()
    return shared
