"""`scanmilter quarantine ...`: review held mail the way `mailq`, `postqueue` and `postsuper` review
the Postfix queue. Exit codes: 0 done, 1 not found, 2 usage, 3 release failed, 4 the spam engine
(spamd, or rspamd's controller) did not learn (release --learn-ham, confirm), 5 some entries could not be handled (delete, purge, reindex
go on past them and name them)."""
from __future__ import annotations

import argparse
import email
import email.header
import email.policy
import getpass
import json
import os
import re
import sys
import time

from .. import config, quarantine, webhooks
from ..logs import escape
from ..quarantine import learn, release
from ..scanners import EngineError, parse_client_socket, rspamd, spamd

EXIT_OK, EXIT_NOT_FOUND, EXIT_USAGE, EXIT_RELEASE_FAILED, EXIT_LEARN_FAILED, EXIT_INCOMPLETE = 0, 1, 2, 3, 4, 5
DEFAULT_CONFIG = "/etc/scanmilter/scanmilter.toml"
PREVIEW_LINES = 20          # lines of body text `show` prints
SHOWN_HEADERS = ("From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To")


class UsageError(Exception):
    pass


def duration(text: str) -> float:
    """"30d", "12h", "90m", "2w" -> seconds."""
    try:
        return config.duration(text)
    except ValueError as e:
        raise UsageError(str(e)) from None


def moment(text: str) -> float:
    """"2026-11-25" or "2026-11-25T14:00" (local time) -> a timestamp."""
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M" if "T" in text else "%Y-%m-%d"))
    except ValueError:
        raise UsageError(f"{text!r} is not a date such as 2026-11-25 or 2026-11-25T14:00") from None


def config_path(given: str | None) -> str | None:
    """-c, else $SCANMILTER_CONFIG, else the installed file; None (all defaults) only when there is
    no installed file. A file this user may not see counts as there, so that loading it says
    "Permission denied" instead of going on with the defaults (/etc/scanmilter is closed to others)."""
    if given or os.environ.get("SCANMILTER_CONFIG"):
        return given or os.environ["SCANMILTER_CONFIG"]
    try:
        os.stat(DEFAULT_CONFIG)
    except FileNotFoundError:
        return None
    except OSError:
        pass
    return DEFAULT_CONFIG


def _open(args) -> tuple[quarantine.Store, config.Values]:
    cfg = config.load(config_path(args.config))
    store = quarantine.open_store(cfg, command=True)
    if store is None:
        raise config.ConfigError(f"{cfg.source}: quarantine_directory is not set; there is no quarantine")
    return store, cfg


def _ago(t: float) -> str:
    s = max(time.time() - t, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def _verdict(entry: quarantine.Entry) -> str:
    if entry.viruses:
        return ",".join(entry.viruses)
    return "-" if entry.score is None else f"{entry.score:.1f}"


def _filters(args) -> dict:
    return {"reason": args.reason or "", "sender": args.sender or "", "recipient": args.recipient or "",
            "since": time.time() - duration(args.since) if args.since else None,
            "before": moment(args.before) if args.before else None}


def cmd_list(store, cfg, args) -> int:
    if args.limit < 0 or args.page < 1:
        raise UsageError("--limit is 0 (all) or more, --page 1 or more")
    entries, matching, size = store.listing(args.limit, (args.page - 1) * args.limit, **_filters(args))
    _waiting_note(store)
    for note in getattr(store, "notes", ()):        # the hold queue: entries that left it without us
        print(f"scanmilter: {escape(note, 500)}", file=sys.stderr)
    if args.json:
        for e in entries:
            print(json.dumps(e.meta, sort_keys=True))
        return EXIT_OK
    if not entries and matching:
        print(f"No entries on page {args.page}: {matching} match, {args.limit} a page")
        return EXIT_OK
    if not entries:
        print("Quarantine is empty" if not any(vars(args).get(k) for k in ("reason", "sender", "recipient", "since",
                                                                              "before")) else "No entries match")
        return EXIT_OK
    print(f"{'-Quarantine ID-':<25} {'--Size--':>8} {'----Held----------':<19} {'-Reason-':<10} "
          f"{'-Score/Virus-':<18} -Sender/Recipient-")
    for e in entries:
        held = time.strftime("%a %b %d %H:%M", time.localtime(e.time))
        released = " (released)" if e.released else ""
        print(f"{e.id:<25} {e.size:>8} {held:<19} {e.reason:<10} "
              f"{escape(_verdict(e), 18):<18} {escape(e.sender or '<>')}{released}")
        for r in e.recipients:
            print(f"{'':<85}{escape(r)}")
    print(f"-- {size / 1024:.0f} Kbytes in {matching} {'entry' if matching == 1 else 'entries'}."
          + (f" Page {args.page} of {-(-matching // args.limit)}: {len(entries)} shown." if args.limit else ""))
    return EXIT_OK


def _waiting_note(store) -> None:
    """quarantine_fallback = "local": say what still waits on this host to be moved into PostgreSQL."""
    try:
        waiting = store.waiting() if hasattr(store, "waiting") else 0
    except quarantine.StoreError:
        return                      # the local store is closed to this user; the daemon knows
    if waiting:
        print(f"scanmilter: {waiting} held message(s) wait in this host's fallback store {store.directory} "
              "for PostgreSQL; the daemon or `quarantine purge` moves them", file=sys.stderr)


def _decoded(value: str) -> str:
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (ValueError, LookupError, email.errors.HeaderParseError):
        return value


# what a terminal must not get from a sender: control characters (escape sequences), bidirectional
# marks, embeddings, overrides and isolates (they reorder what is shown), line and paragraph separators
_TERMINAL_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                              "\u2066-\u2069\ud800-\udfff]")


def _safe_lines(text: str, limit: int) -> list[str]:
    """Lines safe for a terminal: no escape sequences, control or reordering characters."""
    out = []
    for line in text.splitlines()[:limit]:
        out.append(_TERMINAL_UNSAFE.sub("?", line.expandtabs(4))[:200])
    return out


def cmd_show(store, cfg, args) -> int:
    entry = store.get(args.id)
    data = store.message(args.id)
    if args.raw:
        view = memoryview(data)
        while view:         # a write cut short (the reader left mid-way) ends in BrokenPipeError on the rest
            view = view[sys.stdout.buffer.write(view):]
        return EXIT_OK
    if args.json:
        print(json.dumps(entry.meta, sort_keys=True, indent=1))
        return EXIT_OK
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    if args.headers:
        for name, value in msg.items():
            print(escape(f"{name}: {_decoded(str(value))}", 2000))
        return EXIT_OK
    rows = [("id", entry.id), ("held", f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(entry.time))} "
                                      f"({_ago(entry.time)})"),
            ("queue id", entry.queue_id or "-"), ("from", f"<{entry.sender}>"),
            ("to", ", ".join(f"<{r}>" for r in entry.recipients)),
            ("client", client(entry.client_name, entry.client_address)
                       + (f", SASL user {entry.auth_user}" if entry.auth_user else "")),
            ("direction", entry.direction), ("reason", entry.reason), ("why", entry.rule),
            ("spam score", "-" if entry.score is None else f"{entry.score:.1f}"),
            ("rules hit", ", ".join(entry.rules) or "-"), ("viruses", ", ".join(entry.viruses) or "-"),
            ("size", f"{entry.size} bytes")]
    for rel in entry.released:
        stripped = rel.get("stripped")
        rows.append(("released", f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(rel['at']))} by "
                                 f"{rel.get('by')} to {', '.join(rel.get('to', []))}"
                                 + (f" (removed forged {', '.join(stripped)})" if stripped else "")))
    for key, value in rows:
        print(f"{key + ':':<12} {escape(str(value), 1000)}")
    print("--- headers")
    for name in SHOWN_HEADERS:
        for value in msg.get_all(name, []):
            print(escape(f"{name}: {_decoded(str(value))}", 500))
    print(f"--- body (first {PREVIEW_LINES} lines of text)")
    for line in _safe_lines(_body_text(data), PREVIEW_LINES):
        print(line)
    return EXIT_OK


def client(name: str, address: str) -> str:
    """The client as Postfix logs it: name[address], unknown[address] when it has no verified name
    (its milter client then sends "[address]" as the name)."""
    if not name or name == "unknown" or name.startswith("["):
        name = "unknown"
    return f"{name}[{address or '?'}]"


def _body_text(data: bytes) -> str:
    try:
        msg = email.message_from_bytes(data, policy=email.policy.default)
        part = msg.get_body(preferencelist=("plain", "html"))
        if part is not None:
            return part.get_content()
    except Exception:     # a hostile or broken message: fall back to the raw body
        pass
    return data.partition(b"\r\n\r\n")[2].decode("utf-8", "replace")


def _release_from_hold(store, cfg, args) -> int:
    """quarantine_backend = "hold": postsuper -H, no re-injection (hold.py)."""
    try:
        sent = release_entry(store, cfg, args.id, args.by, args.to, keep_message=args.learn_ham)
    except (release.ReleaseError, quarantine.StoreError) as e:
        if isinstance(e, quarantine.NotFound):
            raise
        print(f"scanmilter: release {escape(args.id, 64)}: {escape(str(e), 2000)}", file=sys.stderr)
        return EXIT_RELEASE_FAILED
    print(f"{args.id}: released from Postfix's hold queue to {escape(', '.join(sent), 2000)}")
    return _learn(store, cfg, [args.id], "ham", args.by) if args.learn_ham else EXIT_OK


def release_entry(store, cfg, entry_id: str, by: str, to: list[str] | None = None, force: bool = False,
                  keep_message: bool = False) -> list[str]:
    """Release one entry, for `quarantine release` and the web page alike: Postfix's hold queue lets
    it go (postsuper -H; keep_message: its bytes stay readable for learning), any other store
    re-injects it through the release service. The recipients it went to; ReleaseError, StoreError
    (NotFound), or UsageError when the release service is not inet:HOST:PORT."""
    if getattr(store, "in_postfix_queue", False):
        return store.release(entry_id, by, to or None, keep_message=keep_message)
    setting, via = _release_service(store, cfg, entry_id)
    try:
        kind, address = parse_client_socket(via)
    except ValueError as e:
        kind, address = str(e), None
    if kind != "inet":
        raise UsageError(f"{setting} must be inet:HOST:PORT, not {escape(via, 200)!r}")
    return release.release(store, entry_id, address, by, to or None, force, cfg.quarantine_release_timeout)


def cmd_release(store, cfg, args) -> int:
    if getattr(store, "in_postfix_queue", False):
        return _release_from_hold(store, cfg, args)
    try:
        sent = release_entry(store, cfg, args.id, args.by, args.to, args.force)
    except (release.ReleaseError, quarantine.StoreError) as e:
        if isinstance(e, quarantine.NotFound):
            raise
        print(f"scanmilter: release {escape(args.id, 64)}: {escape(str(e), 2000)}", file=sys.stderr)
        if cfg.quarantine_backend == "postgresql":
            _releases_done(store, args.id)
        return EXIT_RELEASE_FAILED
    print(f"{args.id}: released to {escape(', '.join(sent), 2000)}")
    if args.learn_ham:
        return _learn(store, cfg, [args.id], "ham", args.by)
    return EXIT_OK


def _release_service(store, cfg, entry_id: str) -> tuple[str, str]:
    """(where it is set, address) of the Postfix service a release goes through. A shared store:
    the central one if set, else the one the holding host recorded in the entry. Else this host's."""
    if cfg.quarantine_backend == "postgresql":
        if cfg.quarantine_central_release_address:
            return "quarantine_central_release_address", cfg.quarantine_central_release_address
        recorded = store.get(entry_id).release_address
        if recorded:
            return f"the release address recorded in entry {entry_id}", recorded
    return "quarantine_release_address", cfg.quarantine_release_address


def _releases_done(store, entry_id: str) -> None:
    """Who released an entry, where and when: told to an admin whose release came second."""
    try:
        done = store.get(entry_id).released
    except quarantine.StoreError:
        return
    for rel in done:
        print(f"scanmilter: {entry_id} was released by {escape(str(rel.get('by')), 100)} on "
              f"{escape(str(rel.get('host', '?')), 200)} at "
              f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(rel.get('at', 0)))} to "
              f"{escape(', '.join(map(str, rel.get('to', []))), 1000)}", file=sys.stderr)


def _learner(cfg):
    """The spam engine's name and a maker of its learning client: spamd (TELL) or rspamd's controller."""
    if cfg.spam_engine == "rspamd":
        return "rspamd", lambda: rspamd.controller_from_settings(cfg)
    return "spamd", lambda: spamd.from_settings(cfg)


def _learn(store, cfg, ids, message_class: str, by: str) -> int:
    (engine, make), client, failed, missing = _learner(cfg), None, 0, 0
    for entry_id in ids:
        try:
            client = client or make()       # an unreadable password file is this entry's error
            fresh = learn.learn(store, entry_id, client, message_class, by)
        except quarantine.NotFound as e:
            print(f"scanmilter: {escape(str(e))}", file=sys.stderr)
            missing += 1
        except quarantine.StoreError as e:
            print(f"scanmilter: {escape(entry_id, 64)}: {escape(str(e))}", file=sys.stderr)
            failed += 1
        except (EngineError, OSError) as e:
            print(f"scanmilter: {escape(entry_id, 64)}: {engine} did not learn it as {message_class}: "
                  f"{escape(str(e))}", file=sys.stderr)
            failed += 1
        else:
            print(f"{entry_id}: learned as {message_class}" + ("" if fresh else f" ({engine} knew it already)"))
    return EXIT_LEARN_FAILED if failed else EXIT_NOT_FOUND if missing else EXIT_OK


def cmd_confirm(store, cfg, args) -> int:
    return _learn(store, cfg, args.ids, "spam", args.by)


def cmd_delete(store, cfg, args) -> int:
    if args.all == bool(args.ids):
        raise UsageError("give entry ids, or --all with optional filters")
    ids = [e.id for e in store.select(**_filters(args))] if args.all else args.ids
    missing = failed = 0
    for n, entry_id in enumerate(ids, 1):
        try:
            store.delete(entry_id)
        except quarantine.NotFound as e:
            print(f"scanmilter: {escape(str(e))}", file=sys.stderr)
            missing += 1
        except quarantine.StoreError as e:      # one entry we cannot delete does not stop the rest
            print(f"scanmilter: delete {escape(entry_id, 64)}: {escape(str(e))}", file=sys.stderr)
            failed += 1
        if len(ids) >= 100 and n % 100 == 0:
            print(f"... {n} of {len(ids)}", file=sys.stderr)
    done = len(ids) - missing - failed
    print(f"deleted {done} {'entry' if done == 1 else 'entries'}")
    return EXIT_INCOMPLETE if failed else EXIT_NOT_FOUND if missing else EXIT_OK


def cmd_purge(store, cfg, args) -> int:
    age = duration(args.older_than) if args.older_than else cfg.quarantine_max_age
    failed: list[tuple[str, str]] = []
    try:
        old = quarantine.purge(store, age, args.dry_run, failed)
    except quarantine.Busy as e:            # a shared store: one host purges for all
        print(f"scanmilter: {escape(str(e), 1000)}")
        return EXIT_OK
    for entry_id, reason in failed:
        print(f"scanmilter: purge {entry_id}: {escape(reason)}", file=sys.stderr)
    size = sum(e.size for e in old)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(old)} {'entry' if len(old) == 1 else 'entries'} ({size} bytes) older than {age:.0f}s"
          + (f"; {len(failed)} could not be deleted" if failed else ""))
    return EXIT_INCOMPLETE if failed else EXIT_OK


def cmd_reindex(store, cfg, args) -> int:
    removed = store.recover()
    skipped: list[tuple[str, str]] = []
    count = store.reindex(skipped)
    for entry_id, reason in skipped:
        print(f"scanmilter: reindex: skipped {entry_id}: {escape(reason)}", file=sys.stderr)
    print(f"indexed {count} entries" + (f"; removed {removed} left-over file(s)" if removed else "")
          + (f"; skipped {len(skipped)} unreadable (delete them, or repair their .json)" if skipped else ""))
    return EXIT_INCOMPLETE if skipped else EXIT_OK


def cmd_migrate(store, cfg, args) -> int:
    """Bring the database's schema up to this scanmilter's version (db.migrate)."""
    from .. import db
    try:
        conn = db.connect(db.read_dsn(cfg), cfg.database_connect_timeout)
        try:
            applied, version = db.apply_migrations(conn)
        finally:
            conn.close()
    except db.DatabaseError as e:
        raise quarantine.StoreError(str(e)) from None
    for step in applied:
        print(f"applied {step.version:04d}_{step.name}")
    print(f"the database schema is at version {version}" + ("" if applied else "; nothing to do"))
    return EXIT_OK


def cmd_import(store, cfg, args) -> int:
    """Copy (with --remove: move) a file store into PostgreSQL, keyed by entry id: run it again
    and nothing is copied twice."""
    if cfg.quarantine_backend != "postgresql":
        raise UsageError('import needs quarantine_backend = "postgresql" (the store to import into)')
    directory = args.source or cfg.quarantine_directory
    if not directory:
        raise UsageError("give the file store's directory (--from), or set quarantine_directory")
    files = quarantine.FileStore.for_command(directory)
    pg = getattr(store, "pg", store)
    failed: list[tuple[str, str]] = []
    written, present = pg.import_from(files, remove=args.remove, action="import", failed=failed)
    for entry_id, reason in failed:
        print(f"scanmilter: import {entry_id}: {escape(reason)}", file=sys.stderr)
    print(f"imported {written} {'entry' if written == 1 else 'entries'} from {directory} into {pg.describe()}; "
          f"{present} were there already (or deleted there since)"
          + (f"; {len(failed)} could not be imported" if failed else "")
          + ("; the imported entries were removed from the directory" if args.remove else ""))
    return EXIT_INCOMPLETE if failed else EXIT_OK


def cmd_stats(store, cfg, args) -> int:
    s = store.stats()
    if args.json:
        print(json.dumps(s, sort_keys=True))
        return EXIT_OK
    for reason, v in sorted(s["by_reason"].items()):
        print(f"{reason:<12} {v['entries']:>6} entries {v['bytes']:>12} bytes")
    total = sum(v["entries"] for v in s["by_reason"].values())
    print(f"{'total':<12} {total:>6} entries" + (f"; oldest held {_ago(s['oldest'])}" if s["oldest"] else ""))
    return EXIT_OK


def add_parser(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help=f"configuration file (default $SCANMILTER_CONFIG or {DEFAULT_CONFIG})")
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--reason", help="virus, spam, ...")
    filters.add_argument("--from", dest="sender", help="sender contains this")
    filters.add_argument("--to", dest="recipient", help="a recipient contains this")
    filters.add_argument("--since", help="held within this long, e.g. 2d")
    filters.add_argument("--before", help="held before this date, e.g. 2026-11-01")

    q = sub.add_parser("quarantine", help="review held mail: list, show, release, delete, purge")
    qs = q.add_subparsers(dest="action", required=True)
    p = qs.add_parser("list", parents=[common, filters], help="held mail, newest first (like mailq)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--limit", type=int, default=0, help="entries per page (default 0: all)")
    p.add_argument("--page", type=int, default=1, help="which page of --limit entries (default 1)")
    p.set_defaults(run=cmd_list)
    p = qs.add_parser("show", parents=[common], help="one entry: why it was held, headers, body preview")
    p.add_argument("id")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--headers", action="store_true", help="all headers")
    g.add_argument("--raw", action="store_true", help="the message exactly as received")
    g.add_argument("--json", action="store_true", help="the metadata as JSON")
    p.set_defaults(run=cmd_show)
    p = qs.add_parser("release", parents=[common], help="deliver an entry to its recipients (or some)")
    p.add_argument("id")
    p.add_argument("--to", action="append", default=[], help="only this recipient (repeatable)")
    p.add_argument("--force", action="store_true", help="deliver again even if already released")
    p.add_argument("--by", default=getpass.getuser(), help="who releases (default: your login)")
    p.add_argument("--learn-ham", action="store_true",
                   help="also teach the spam engine that it is ham (spamd --allow-tell, or rspamd's controller)")
    p.set_defaults(run=cmd_release)
    p = qs.add_parser("confirm", parents=[common],
                      help="teach the spam engine that entries are spam (spamd --allow-tell, or rspamd's "
                           "controller); they stay held")
    p.add_argument("ids", nargs="+")
    p.add_argument("--by", default=getpass.getuser(), help="who decides (default: your login)")
    p.set_defaults(run=cmd_confirm)
    p = qs.add_parser("delete", parents=[common, filters], help="delete entries by id, or --all matching filters")
    p.add_argument("ids", nargs="*")
    p.add_argument("--all", action="store_true")
    p.set_defaults(run=cmd_delete)
    p = qs.add_parser("purge", parents=[common], help="delete entries older than an age")
    p.add_argument("--older-than", help="e.g. 30d (default: quarantine_max_age)")
    p.add_argument("--dry-run", action="store_true", help="only count")
    p.set_defaults(run=cmd_purge)
    p = qs.add_parser("reindex", parents=[common], help="rebuild the index from the entry files")
    p.set_defaults(run=cmd_reindex)
    p = qs.add_parser("migrate", parents=[common],
                      help="create or upgrade the PostgreSQL schema (quarantine and shared lists); once, from any host")
    p.set_defaults(run=cmd_migrate, database_only=True)
    p = qs.add_parser("import", parents=[common],
                      help="copy a file store's entries into PostgreSQL (again: nothing twice)")
    p.add_argument("--from", dest="source", help="the file store's directory (default: quarantine_directory)")
    p.add_argument("--remove", action="store_true", help="remove each entry from the directory once imported")
    p.set_defaults(run=cmd_import)
    p = qs.add_parser("stats", parents=[common], help="entries and bytes by reason, oldest entry")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_stats)
    from .. import notify
    notify.add_parser(qs, common)           # quarantine notify: the digests (notify.py)
    q.set_defaults(func=run)


def run(args) -> int:
    store = None
    try:
        if getattr(args, "database_only", False):       # migrate: the database, no store
            return args.run(None, config.load(config_path(args.config)), args)
        store, cfg = _open(args)
        _start_webhooks(cfg, args)
        return args.run(store, cfg, args)
    except quarantine.NotFound as e:
        print(f"scanmilter: {escape(str(e))}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except (UsageError, config.ConfigError, quarantine.StoreError) as e:
        print(f"scanmilter: {escape(str(e), 2000)}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if hasattr(store, "close"):         # a database store's pool of connections
            store.close()
        webhooks.finish()       # within webhook_flush_timeout: a dead receiver never holds the command


ANNOUNCED = ("release", "delete", "purge")      # the actions whose events the webhooks get (events.py)


def _start_webhooks(cfg, args) -> None:
    """A sender for the events of this command, when the configuration has [[webhook]] tables."""
    if not cfg.webhooks or args.action not in ANNOUNCED:
        return
    try:
        hooks = webhooks.hooks_from(cfg)
    except config.ConfigError as e:         # the command still does its work
        print(f"scanmilter: warning: {escape(str(e), 1000)}; this command sends no webhook events", file=sys.stderr)
        return
    webhooks.start(cfg, hooks)
