"""`scanmilter lists add|remove|show|import`: the allow and block lists and per-recipient settings
that every host reads from PostgreSQL (`shared_lists = true`, docs/shared-lists.md).

    scanmilter lists add block_senders spammer@example.net example.info --comment "ticket 42"
    scanmilter lists add inbound:ceo@example.org reject_level=8 subject_tag='"[SPAM?]"'
    scanmilter lists remove block_senders example.info
    scanmilter lists remove inbound:ceo@example.org reject_level
    scanmilter lists show [LIST | DIRECTION:ADDRESS] [--json]
    scanmilter lists import policy.toml            # its [lists] and [DIRECTION.recipients."…"]
    scanmilter lists import blocked.txt --list block_senders

Every value is validated as the policy file validates it before any SQL runs, and reaches the
database only as a query parameter. Who changed what is the login name and host (plus the
database role, recorded by the server). Exit codes: 0 done, 1 not there (remove), 2 usage or a
value that does not validate, 3 the database cannot be reached or refused."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import config, db, policyfile, quarantine, sharedlists as S
from ..config import ConfigError
from ..logs import escape
from ..policy import INBOUND, OUTBOUND
from .quarantine import DEFAULT_CONFIG, config_path

EXIT_OK, EXIT_NOT_FOUND, EXIT_USAGE, EXIT_DATABASE = 0, 1, 2, 3
SETTING_KEYS = tuple(s.name for s in config.DIRECTION_SETTINGS)


class UsageError(Exception):
    pass


def parse_target(text: str) -> tuple[str, str]:
    """("list", NAME) or (DIRECTION, ADDRESS)."""
    if text in S.LISTS:
        return "list", text
    direction, colon, address = text.partition(":")
    if colon and direction in (INBOUND, OUTBOUND):
        return direction, address
    if text in ("allow_senders_clients", "allow_skips_virus_scan"):
        raise UsageError(f"{text} is not shared: it stays in the policy file")
    raise UsageError(f"{text!r} is neither a shared list ({', '.join(S.LISTS)}) nor DIRECTION:ADDRESS "
                     "(inbound:user@example.org) for a recipient's settings")


def _show(text: str) -> str:
    return escape(str(text), 1000)


# ------------------------------------------------------------------ writing
def _add_entries(conn, items: list[tuple[str, str, str]], by: str, comment: str,
                 quiet_existing=False) -> tuple[int, int]:
    """items: (list, value, as given). Returns (added, already there)."""
    added = existing = 0
    for name, value, given in items:
        row = conn.execute("INSERT INTO scanmilter_list_entries (list, value, added_by, comment) "
                           "VALUES (%s, %s, %s, %s) ON CONFLICT (list, value) DO NOTHING RETURNING added_at",
                           (name, value, by, comment)).fetchone()
        if row:
            added += 1
            print(f"added {name} {_show(value)}" + (f" (given as {_show(given)})" if given != value else ""))
            continue
        existing += 1
        if not quiet_existing:
            old_by, old_at = conn.execute("SELECT added_by, added_at FROM scanmilter_list_entries "
                                          "WHERE list = %s AND value = %s", (name, value)).fetchone()
            print(f"{name} {_show(value)}: already there, added by {_show(old_by)} at {S.when(old_at)}")
    return added, existing


def _set_settings(conn, items: list[tuple[str, str, str, object]], by: str, comment: str,
                  quiet_unchanged=False) -> tuple[int, int, int]:
    """items: checked (direction, recipient, key, value). Returns (set, changed, unchanged)."""
    new = changed = same = 0
    for direction, recipient, key, value in items:
        text = config.toml_value(value)
        target = f"{direction}:{_show(recipient)} {key}"
        old = conn.execute("SELECT value, set_by, set_at FROM scanmilter_recipient_settings "
                           "WHERE direction = %s AND recipient = %s AND key = %s FOR UPDATE",
                           (direction, recipient, key)).fetchone()
        if old and old[0] == text:
            same += 1
            if not quiet_unchanged:
                print(f"{target} = {_show(text)}: unchanged, set by {_show(old[1])} at {S.when(old[2])}")
            continue
        conn.execute("INSERT INTO scanmilter_recipient_settings (direction, recipient, key, value, set_by, comment) "
                     "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (direction, recipient, key) DO UPDATE SET "
                     "value = EXCLUDED.value, set_by = EXCLUDED.set_by, comment = EXCLUDED.comment, "
                     "set_role = session_user, set_at = now()", (direction, recipient, key, text, by, comment))
        if old:
            changed += 1
            print(f"changed {target} = {_show(text)} (was {_show(old[0])}, set by {_show(old[1])} at {S.when(old[2])})")
        else:
            new += 1
            print(f"set {target} = {_show(text)}")
    return new, changed, same


def _check_against_policy(cfg, conn, items=(), removed=None) -> None:
    """Settings set (`items`) or removed (`removed(setting)` true) must leave this host's merged
    policy valid (thresholds in order, a quarantine for virus_action = "quarantine"): the daemons
    would leave that recipient's database settings out otherwise."""
    if not items and removed is None:
        return
    file_policy, _ = policyfile.check(cfg.policy_file, quarantine_available=bool(quarantine.location(cfg)))
    copy = S.read(conn, cfg.shared_lists_entry_limit)
    replaced = {(d, r, k) for d, r, k, _ in items}
    gone = [s for s in copy.settings if removed and removed(s)]
    settings = [s for s in copy.settings if (s.direction, s.recipient, s.key) not in replaced and s not in gone]
    settings += [S.RecipientSetting(d, r, k, v, "", None) for d, r, k, v in items]
    try:
        merged, _ = S.merge(file_policy, S.Copy(copy.instance, copy.revision, copy.changed_at, copy.entries,
                                                tuple(settings)))
    except ConfigError as e:
        raise UsageError(f"refused, nothing changed: {e}") from None
    touched = {(d, r) for d, r, _, _ in items} | {(s.direction, s.recipient) for s in gone}
    broken = [why for scope, why in getattr(merged, "left_out", {}).items() if scope in touched]
    if broken:
        raise UsageError(f"refused, nothing changed: {broken[0]}")


def _comment(text: str) -> str:
    return S.check_text("--comment", text, S.MAX_COMMENT)


def cmd_add(cfg, database, args) -> int:
    kind, name = parse_target(args.target)
    comment = _comment(args.comment)
    if not args.values:
        raise UsageError("add: give at least one value" + (" (KEY=VALUE)" if kind != "list" else ""))
    if kind == "list":
        items = [(name, S.check_entry(name, v), v) for v in args.values]
    else:
        items = [S.check_setting(kind, name, *_key_value(item)) for item in args.values]
    with database.connection() as conn:
        db.check_schema(conn)
        if kind == "list":
            _add_entries(conn, items, S.who(), comment)
        else:
            _check_against_policy(cfg, conn, items)
            _set_settings(conn, items, S.who(), comment)
    return EXIT_OK


def _key_value(item: str) -> tuple[str, object]:
    key, eq, text = item.partition("=")
    if not eq or not key.strip():
        raise UsageError(f"{item!r}: a setting is KEY=VALUE, e.g. reject_level=8 or virus_action=quarantine")
    return key.strip(), S.parse_value(text.strip())


def cmd_remove(cfg, database, args) -> int:
    kind, name = parse_target(args.target)
    if kind == "list":
        if not args.values:
            raise UsageError("remove: give the entries to remove")
        values = [S.check_entry(name, v) for v in args.values]
    else:
        S.check_setting(kind, name, "tag_level", 5.0)          # the address, checked alone
        name = name.lower()
        unknown = [k for k in args.values if k not in SETTING_KEYS]
        if unknown:
            raise UsageError(f"{unknown[0]!r} is not a per-recipient setting; known: {', '.join(SETTING_KEYS)}")
    missing = 0
    with database.connection() as conn:
        db.check_schema(conn)
        if kind == "list":
            for value in values:
                row = conn.execute("DELETE FROM scanmilter_list_entries WHERE list = %s AND value = %s "
                                   "RETURNING added_by, added_at", (name, value)).fetchone()
                if row:
                    print(f"removed {name} {_show(value)} (added by {_show(row[0])} at {S.when(row[1])})")
                else:
                    missing += 1
                    print(f"{name} {_show(value)}: not there")
        else:
            _check_against_policy(cfg, conn, removed=lambda s: (s.direction, s.recipient) == (kind, name)
                                  and (not args.values or s.key in args.values))
            rows = conn.execute("DELETE FROM scanmilter_recipient_settings WHERE direction = %s AND recipient = %s "
                                "AND (cardinality(%s::text[]) = 0 OR key = ANY(%s::text[])) "
                                "RETURNING key, value, set_by, set_at",
                                (kind, name, list(args.values), list(args.values))).fetchall()
            for key, text, by, at in sorted(rows):
                print(f"removed {kind}:{_show(name)} {key} = {_show(text)} (set by {_show(by)} at {S.when(at)})")
            gone = {r[0] for r in rows}
            for key in args.values or ([] if rows else ["(any setting)"]):
                if key not in gone:
                    missing += 1
                    print(f"{kind}:{_show(name)} {key}: not set")
    return EXIT_NOT_FOUND if missing else EXIT_OK


def cmd_show(cfg, database, args) -> int:
    kind, name = parse_target(args.target) if args.target else ("", "")
    with database.connection() as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")     # one snapshot
        db.check_schema(conn)
        copy = S.read(conn, max(cfg.shared_lists_entry_limit, 1 << 30))
    entries = [e for e in copy.entries if not kind or (kind == "list" and e.list == name)]
    settings = [s for s in copy.settings if not kind or (s.direction, s.recipient) == (kind, name.lower())]
    file_settings = _file_settings(cfg)
    if args.json:
        for e in entries:
            print(json.dumps({"list": e.list, "value": e.value, "added_by": e.by, "added_role": e.role,
                              "added_at": e.at.isoformat(), "comment": e.comment}))
        for s in settings:
            print(json.dumps({"direction": s.direction, "recipient": s.recipient, "key": s.key,
                              "value": config.toml_value(s.value), "set_by": s.by, "set_role": s.role,
                              "set_at": s.at.isoformat(), "comment": s.comment,
                              "overridden_here_by": file_settings.get((s.direction, s.recipient, s.key), "")}))
        return EXIT_OK
    print(f"# shared lists in {database.redacted}: revision {copy.revision}, changed {S.when(copy.changed_at)}; "
          f"{len(copy.entries)} entries, {len(copy.settings)} settings in all")
    for why in copy.left_out:       # written past scanmilter's checks (psql): no host applies them
        print(f"# not in force anywhere: {_show(why)}")
    for e in entries:
        print(f"{e.list} {_show(e.value)}  added by {_show(e.by)} at {S.when(e.at)}"
              + (f"  # {_show(e.comment)}" if e.comment else ""))
    for s in settings:
        text = config.toml_value(s.value)
        here = file_settings.get((s.direction, s.recipient, s.key))
        print(f"{s.target} {s.key} = {_show(text)}  set by {_show(s.by)} at {S.when(s.at)}"
              + (f"  # {_show(s.comment)}" if s.comment else "")
              + (f"  (on this host the policy file wins: {here})" if here else ""))
    return EXIT_OK


def _file_settings(cfg) -> dict:
    """(direction, recipient, key) -> "FILE:LINE" of this host's policy file, where it sets the
    same recipient's key (the file wins); {} when the file cannot be read here."""
    try:
        policy, _ = policyfile.check(cfg.policy_file, quarantine_available=True)
    except ConfigError:
        return {}
    text = config.read_text(cfg.policy_file) if cfg.policy_file else None
    return {(d, r, k): config.locate(policy.source, text, (d, "recipients", r), k)
            for d in (INBOUND, OUTBOUND) for r, over in policy.recipients.get(d, {}).items() for k in over}


def cmd_import(cfg, database, args) -> int:
    path = args.file
    comment = _comment(args.comment if args.comment is not None else f"imported from {path}"[:S.MAX_COMMENT])
    if args.list:
        entries, settings = _read_text_list(path, args.list), []
    else:
        entries, settings = _read_policy_file(path)
    by = S.who()
    with database.connection() as conn:
        db.check_schema(conn)
        _check_against_policy(cfg, conn, settings)
        added, existing = _add_entries(conn, entries, by, comment, quiet_existing=True)
        new, changed, same = _set_settings(conn, settings, by, comment, quiet_unchanged=True)
    print(f"imported {_show(path)}: {added} entries added, {existing} already there; "
          f"{new} settings set, {changed} changed, {same} unchanged")
    return EXIT_OK


def _read_text_list(path: str, name: str) -> list[tuple[str, str, str]]:
    """One entry a line; blank lines and lines starting with # are skipped."""
    if name not in S.LISTS:
        parse_target(name)      # says why
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            items.append((name, S.check_entry(name, line, f"{path}:{number}"), line))
    return items


def _read_policy_file(path: str):
    """The shared parts of a policy file, checked as the daemon checks the whole file: the six
    lists and [DIRECTION.recipients."a@b"]. What stays in policy files is named on stderr."""
    policyfile.check(path, quarantine_available=True)       # every error with its file and line
    data = config.read_toml(path)
    text = config.read_text(path)
    lists = data.get("lists", {})
    entries = [(name, S.check_entry(name, v, config.locate(path, text, ("lists",), name)), v)
               for name in S.LISTS for v in lists.get(name, [])]
    settings = []
    left = [f"[lists] {k}" for k, v in lists.items() if k not in S.LISTS and v not in ([], False)]
    left += [f"[{k}]" for k in data if k not in ("lists", INBOUND, OUTBOUND)]
    for d in (INBOUND, OUTBOUND):
        table = data.get(d, {})
        left += [f"[{d}] {k}" for k in table if k not in ("recipients", "domains")]
        left += [f'[{d}.domains."{k}"]' for k in table.get("domains", {})]
        for rcpt, over in table.get("recipients", {}).items():
            for key, value in over.items():
                where = config.locate(path, text, (d, "recipients", rcpt), key)
                settings.append(S.check_setting(d, rcpt, key, value, where))
    if left:
        print(f"not imported (not shared; they stay in policy files): {', '.join(left)}", file=sys.stderr)
    return entries, settings


# ------------------------------------------------------------------ the command line
def add_parser(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help=f"configuration file (default $SCANMILTER_CONFIG or {DEFAULT_CONFIG})")
    p = sub.add_parser("lists", help="shared allow/block lists and per-recipient settings in PostgreSQL")
    ps = p.add_subparsers(dest="action", required=True)
    targets = f"one of {', '.join(S.LISTS)}, or DIRECTION:ADDRESS (inbound:user@example.org) for a recipient's settings"
    q = ps.add_parser("add", parents=[common], help="add list entries, or set a recipient's settings (KEY=VALUE)")
    q.add_argument("target", help=targets)
    q.add_argument("values", nargs="*", help="entries, or KEY=VALUE settings (the value as in the policy file)")
    q.add_argument("--comment", default="", help="why (shown by show and explain)")
    q.set_defaults(run=cmd_add)
    q = ps.add_parser("remove", parents=[common], help="remove list entries, or a recipient's settings (KEY...)")
    q.add_argument("target", help=targets)
    q.add_argument("values", nargs="*", help="entries, or setting names (none: all of that recipient's)")
    q.set_defaults(run=cmd_remove)
    q = ps.add_parser("show", parents=[common], help="what the database holds, who added it and when")
    q.add_argument("target", nargs="?", help=targets)
    q.add_argument("--json", action="store_true", help="one JSON object per line")
    q.set_defaults(run=cmd_show)
    q = ps.add_parser("import", parents=[common], help="add the [lists] and recipients' settings of a policy "
                      "file, or a file of entries (--list); running it again changes nothing")
    q.add_argument("file")
    q.add_argument("--list", help="the file holds one entry a line for this list")
    q.add_argument("--comment", help="recorded with each entry (default: imported from FILE)")
    q.set_defaults(run=cmd_import)
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        cfg = config.load(config_path(args.config))
        database = db.Database.from_settings(cfg, name="scanmilter-lists")
    except (ConfigError, db.DatabaseError) as e:
        print(f"scanmilter: {escape(str(e), 2000)}", file=sys.stderr)
        return EXIT_USAGE
    if not cfg.shared_lists and args.action != "show":
        print(f"scanmilter: note: shared_lists is off in {cfg.source}: this host's daemon does not read "
              "these lists", file=sys.stderr)
    try:
        return args.run(cfg, database, args)
    except (UsageError, ConfigError) as e:
        print(f"scanmilter: {escape(str(e), 2000)}", file=sys.stderr)
        return EXIT_USAGE
    except (db.DatabaseError, S.Implausible) as e:
        print(f"scanmilter: {escape(str(e), 2000)}", file=sys.stderr)
        return EXIT_DATABASE
    finally:
        database.close()
