"""The places where the next engine, the next store and the operator commands attach: the commands
never load the daemon, a third engine is one module and one table entry, a quarantine entry is
defined once, and a store that is not the file store serves the quarantine command."""
import contextlib
import copy
import dataclasses
import io
import json
import secrets
import subprocess
import sys
import time

import Milter
import pytest

from conftest import ROOT
from scanmilter import app, cli, config, policy as P, policyfile, quarantine as Q, scanners
from scanmilter.handler import Handler, Runtime
from scanmilter.message import Spool
from scanmilter.pipeline import Pipeline, scan_pool
from scanmilter.quarantine import entry as QE
from scanmilter.scanners import ScanResult
from scanmilter.verdict import combine

DAEMON_MODULES = ("scanmilter.app", "scanmilter.handler", "Milter", "milter")
COMMANDS = ("explain", "selftest", "postfix_check", "miltertalk", "quarantine", "lists")


def loaded_after(code: str) -> list[str]:
    """The daemon's modules loaded by a fresh interpreter after running `code`."""
    probe = f"import json, sys\n{code}\nprint(json.dumps(sorted(m for m in {DAEMON_MODULES!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(ROOT / "milter"), "PATH": "/usr/bin:/bin"}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["scanmilter.cli", *(f"scanmilter.commands.{c}" for c in COMMANDS)])
def test_importing_a_command_loads_nothing_of_the_daemon(module):
    assert loaded_after(f"import {module}") == []


def test_running_the_commands_loads_nothing_of_the_daemon(tmp_path):
    conf = tmp_path / "scanmilter.toml"
    conf.write_text(f'quarantine_directory = "{tmp_path}/q"\nclamd_enabled = false\nspamd_enabled = false\n')
    message = tmp_path / "m.eml"
    message.write_bytes(b"Subject: hi\r\n\r\nhello\r\n")
    runs = [["check-config", "-c", str(conf)], ["quarantine", "list", "-c", str(conf)],
            ["explain", str(message), "-c", str(conf), "--rcpt", "a@example.com"]]
    code = "from scanmilter import cli\n" + "".join(f"assert cli.main({argv!r}) == 0\n" for argv in runs)
    assert loaded_after(code) == []


# ---------------------------------------------------------------- engines

FAKE_ENGINE = '''
from scanmilter.scanners import FOUND, ScanResult, run


class FakeScanner:
    name = "fake"

    def __init__(self, timeout):
        self.timeout = timeout

    def scan(self, spool):
        return run(self.name, lambda: ScanResult(self.name, FOUND, viruses=("Fake.Test",)))

    def ping(self):
        return ""


def from_settings(cfg):
    return FakeScanner(cfg.fake_timeout)
'''


def test_a_third_engine_is_its_module_its_settings_and_one_entry_in_the_table(tmp_path, monkeypatch):
    (tmp_path / "fake_engine.py").write_text(FAKE_ENGINE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(scanners.ENGINES, "fake", "fake_engine")
    settings = config.DAEMON_SETTINGS + [config.Setting("fake_enabled", True, "switch", "scan with fake"),
                                         config.Setting("fake_timeout", 3.0, "seconds", "fake's deadline")]
    cfg = config.Values(settings, {}, "test")
    with scan_pool(2) as pool:
        pipeline = app.build_pipeline(cfg, pool, None, None)
        assert [e.name for e in pipeline.engines] == ["spamd", "clamd", "files", "fake"]
        cfg = config.Values(settings, {"spamd_enabled": False, "clamd_enabled": False, "files_enabled": False}, "test")
        pipeline = app.build_pipeline(cfg, pool, None, None)
        spool = Spool(1024, 1024)
        spool.write(b"Subject: x\r\n\r\nbody\r\n")
        [result] = pipeline.scan(spool)
    assert (result.engine, result.outcome, result.viruses) == ("fake", "found", ("Fake.Test",))


def test_engines_are_built_only_when_enabled_slowest_first():
    cfg = config.parse(config.DAEMON_SETTINGS, {}, "test")
    assert list(scanners.ENGINES) == ["spamd", "rspamd", "clamd", "files"]
    assert [e.name for e in scanners.from_settings(cfg)] == ["spamd", "clamd", "files"]   # spam_engine = "spamd"
    rspamd = config.parse(config.DAEMON_SETTINGS, {"spam_engine": "rspamd"}, "test")
    assert [e.name for e in scanners.from_settings(rspamd)] == ["rspamd", "clamd", "files"]
    cfg = config.parse(config.DAEMON_SETTINGS, {"spamd_enabled": False, "files_enabled": False}, "test")
    assert [e.name for e in scanners.from_settings(cfg)] == ["clamd"]


def test_engine_state_says_scanned_for_an_engine_that_found_something():
    verdict = combine([ScanResult("clamd", "found", viruses=("Eicar",)), ScanResult("spamd", "error", "timeout: x")])
    assert (verdict.engine_state("clamd"), verdict.engine_state("spamd"), verdict.engine_state("other")) == \
        ("scanned", "failed", "absent")


def test_each_fact_has_one_source():
    [virus_action] = [s for s in config.DIRECTION_SETTINGS if s.name == "virus_action"]
    assert virus_action.choices is P.VIRUS_ACTIONS and set(P.VIRUS_STRICTNESS) == set(P.VIRUS_ACTIONS)
    assert config.parse_client_socket is scanners.parse_client_socket
    assert config.duration("2w") == 14 * 86400 and config.duration("300", default_unit="s") == 300
    with pytest.raises(ValueError, match="not a duration"):
        config.duration("300")


# ---------------------------------------------------------------- the quarantine entry and the store

class MemoryStore(Q.Store):
    """Entries in a dictionary: the least a store must do, written against the interface only."""

    def __init__(self):
        self.entries, self.messages, self.counts = {}, {}, {}

    def put(self, reader, meta, index_failed=None):
        entry_id = secrets.token_hex(12)
        data = reader.read()
        self.entries[entry_id] = {**meta, "id": entry_id, "time": time.time(), "size": len(data), "released": []}
        self.messages[entry_id] = data
        return entry_id

    def get(self, entry_id):
        if entry_id not in self.entries:
            raise Q.NotFound(f"no quarantine entry {entry_id}")
        return Q.Entry(copy.deepcopy(self.entries[entry_id]))

    def message(self, entry_id):
        self.get(entry_id)
        return self.messages[entry_id]

    def select(self, reason="", sender="", recipient="", since=None, before=None):
        def wanted(e):
            return ((not reason or e.reason == reason) and sender.lower() in e.sender.lower()
                    and (not recipient or any(recipient.lower() in r.lower() for r in e.recipients))
                    and (since is None or e.time >= since) and (before is None or e.time < before))
        return sorted((e for e in map(self.get, self.entries) if wanted(e)), key=lambda e: -e.time)

    @contextlib.contextmanager
    def locked(self, entry_id):
        yield self.get(entry_id)

    def update(self, entry):
        self.get(entry.id)
        self.entries[entry.id] = entry.meta
        return True

    def delete(self, entry_id, action="delete"):
        self.get(entry_id)
        del self.entries[entry_id], self.messages[entry_id]
        self.count(action)

    def count(self, action):
        self.counts[action] = self.counts.get(action, 0) + 1

    def tallies(self):
        return {a: self.counts.get(a, 0) for a in Q.ACTIONS}

    def stats(self):
        by_reason = {}
        for e in self.select():
            row = by_reason.setdefault(e.reason, {"entries": 0, "bytes": 0})
            row["entries"], row["bytes"] = row["entries"] + 1, row["bytes"] + e.size
        times = [e.time for e in self.select()]
        return {"by_reason": by_reason, "oldest": min(times, default=None),
                "released": sum(bool(e.released) for e in self.select())}


class Engine:
    def __init__(self, result):
        self.name, self.timeout, self.result = result.engine, 1.0, result

    def scan(self, spool):
        return self.result


def hold_one(store, subject=b" held"):
    """A message the default policy quarantines (virus_action "quarantine"), through the handler."""
    policy = policyfile.load("", quarantine_available=True)
    inbound = {**policy.directions["inbound"], "virus_action": "quarantine"}
    policy = dataclasses.replace(policy, directions={**policy.directions, "inbound": inbound})
    cfg = config.parse(config.DAEMON_SETTINGS, {}, "test")
    engines = [Engine(ScanResult("spamd", "clean", score=0.5, required=5.0)),
               Engine(ScanResult("clamd", "found", viruses=("Eicar-Test-Signature",)))]
    h = Handler(Runtime(cfg, policy, Pipeline(engines, POOL), store))
    macros = {"i": "4HELD1", "{daemon_name}": "smtpd", "j": "mx.example.com"}
    h._setctx(FakeContext(macros))
    h._protocol, h._actions = 0, Milter.ADDHDRS | Milter.CHGHDRS
    h.connect("client.example", 2, ("192.0.2.7", 25))
    h.envfrom("<s@outside.test>")
    h.envrcpt("<bob@example.com>")
    h.header_bytes("Subject", subject)
    h.eoh()
    h.body(b"hello\r\n")
    return h.eom(), h


class FakeContext:
    """libmilter's side, as far as a held message needs it."""

    def __init__(self, macros):
        self.macros, self.reply = macros, None

    def getsymval(self, name):
        return self.macros.get(name)

    def setpriv(self, priv):
        pass

    def setreply(self, *args):
        self.reply = args


POOL = scan_pool(2)


def test_the_daemon_writes_exactly_the_fields_the_entry_defines():
    store = MemoryStore()
    assert hold_one(store)[0] == Milter.DISCARD
    [meta] = store.entries.values()
    daemon_fields = [f.name for f in QE.FIELDS if f.by == QE.DAEMON]
    assert list(meta)[:len(daemon_fields)] == daemon_fields
    assert set(meta) <= {f.name for f in QE.FIELDS}
    assert (meta["reason"], meta["viruses"], meta["recipients"], meta["client_address"]) == \
        ("virus", ["Eicar-Test-Signature"], ["bob@example.com"], "192.0.2.7")


def test_held_meta_wants_every_field_and_no_other():
    fields = {f.name: f.default for f in QE.FIELDS if f.by == QE.DAEMON}
    assert Q.held_meta(**fields) == fields
    with pytest.raises(TypeError, match="missing"):
        Q.held_meta(**{k: v for k, v in fields.items() if k != "rule"})
    with pytest.raises(TypeError, match="unknown"):
        Q.held_meta(**fields, colour="red")


def test_the_index_is_the_entry_fields_and_an_entry_written_before_a_field_reads_its_default(tmp_path):
    store = Q.FileStore(str(tmp_path / "q"))
    columns = [row[1] for row in store._db().execute("PRAGMA table_info(entries)")]
    assert columns == [name for name, _, _ in QE.INDEX_COLUMNS]
    assert set(columns) - {f.name for f in QE.FIELDS} == {"released_at", "meta"}
    old = Q.Entry({"id": "0" * 24, "time": 1.0})
    assert (old.recipients, old.score, old.size, old.learned) == ([], None, 0, [])
    old.recipients.append("x")                   # a default is the entry's own, never shared
    assert Q.Entry({}).recipients == []
    with pytest.raises(AttributeError):
        old.colour


def test_a_store_of_another_kind_serves_the_quarantine_command(tmp_path, monkeypatch, capsys):
    """What a PostgreSQL or hold-queue store must offer: Store's methods, and nothing the file store
    adds. The command gets it from quarantine.open_store and works unchanged."""
    store = MemoryStore()
    hold_one(store, b" first")
    first = next(iter(store.entries))
    store.put(io.BytesIO(b"Subject: old\r\n\r\nold\r\n"), {"sender": "old@outside.test", "reason": "spam"})
    monkeypatch.setattr(Q, "open_store", lambda cfg, command=False: store)
    conf = tmp_path / "scanmilter.toml"
    conf.write_text("")

    def run(*argv):
        code = cli.main(["quarantine", *argv, "-c", str(conf)])
        return code, capsys.readouterr()

    code, out = run("list")
    assert code == 0 and first in out.out and "s@outside.test" in out.out and "old@outside.test" in out.out
    assert "-- 0 Kbytes in 2 entries." in out.out
    code, out = run("list", "--reason", "virus", "--json")
    assert code == 0 and [json.loads(line)["id"] for line in out.out.splitlines()] == [first]
    code, out = run("show", first)
    assert code == 0 and "client:      client.example[192.0.2.7]" in out.out
    assert "viruses:     Eicar-Test-Signature" in out.out and "Subject: first" in out.out
    old = next(i for i in store.entries if i != first)
    code, out = run("show", old)                  # an entry with few fields: their defaults
    assert code == 0 and "queue id:    -" in out.out and "spam score:  -" in out.out
    code, out = run("stats")
    assert code == 0 and "total             2 entries" in out.out
    code, out = run("delete", old)
    assert code == 0 and list(store.entries) == [first] and store.tallies()["delete"] == 1
    code, out = run("show", old)
    assert code == 1 and f"no quarantine entry {old}" in out.err


class FailingStore(MemoryStore):
    def put(self, reader, meta, index_failed=None):
        raise KeyError("a bug in a store")


def test_a_store_that_fails_tempfails_and_logs_where_it_failed(logged):
    answer, h = hold_one(FailingStore())
    assert answer == Milter.TEMPFAIL and h._ctx.reply[:2] == ("451", "4.7.1")
    [record] = [r for r in logged.records if "quarantine store failed" in r.getMessage()]
    assert record.exc_info and record.exc_info[0] is KeyError
    assert "Traceback" in logged.text and "in put" in logged.text


class DownStore(MemoryStore):
    def put(self, reader, meta, index_failed=None):
        raise Q.StoreError("database host=/run/pg: connection refused")


def test_a_store_that_is_down_tempfails_with_one_line_and_no_traceback(logged):
    """A database outage is the store's own, expected failure: one line per message, not a
    traceback per held message for as long as it lasts."""
    answer, h = hold_one(DownStore())
    assert answer == Milter.TEMPFAIL and h._ctx.reply[:2] == ("451", "4.7.1")
    [record] = [r for r in logged.records if "quarantine store failed" in r.getMessage()]
    assert "connection refused" in record.getMessage() and not record.exc_info
    assert "Traceback" not in logged.text
