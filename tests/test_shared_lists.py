"""Shared lists in PostgreSQL (sharedlists.py, commands/lists.py, schema/0002_lists.sql) against a
real server (tools/pg.py): the command line, validation before any SQL, values stored literally,
the precedence rule, explain naming each source, refreshes without SIGHUP, and a database that
goes away without the policy ever emptying."""
import getpass
import json
import logging
import math
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import psycopg
import pytest
from prometheus_client import CollectorRegistry

import pg
import procs
from conftest import ROOT, scratch
from scanmilter import cli, config, db, policyfile, sharedlists as S
from scanmilter import policy as P
from scanmilter.metrics import Metrics
from scanmilter.verdict import Verdict

pytestmark = pytest.mark.integration

WHO = f"{getpass.getuser()}@{socket.getfqdn()}"
DEAD_DSN = "host=/nonexistent/socket/dir dbname=x user=x"

POLICY = """\
[inbound]
tag_level = 5.0
reject_level = 15.0

[inbound.recipients."boss@example.com"]
reject_level = 20.0

[lists]
block_senders = ["filed@blocked.test"]
allow_senders = ["friend@partner.test"]
"""


# ---------------------------------------------------------------- helpers
def write_config(tmp_path, dsn, policy_text=POLICY, **settings):
    values = {"database_dsn": dsn, "shared_lists": True, "clamd_enabled": False, "spamd_enabled": False,
              **settings}
    if policy_text is not None:
        (tmp_path / "policy.toml").write_text(policy_text)
        values["policy_file"] = str(tmp_path / "policy.toml")
    path = tmp_path / "scanmilter.toml"
    path.write_text("".join(f"{k} = {config.toml_value(v)}\n" for k, v in values.items()))
    return path


@pytest.fixture
def dsn(database):
    """A fresh database with scanmilter's schema."""
    with psycopg.connect(database, autocommit=True) as conn:
        db.migrate(conn)
    return database


@pytest.fixture
def conf(tmp_path, dsn):
    return write_config(tmp_path, dsn)


def lists(capsys, conf, *args):
    """`scanmilter lists ARGS -c CONF`: (exit status, stdout, stderr)."""
    code = cli.main(["lists", *args, "-c", str(conf)])
    out = capsys.readouterr()
    return code, out.out, out.err


def rows(dsn, table="scanmilter_list_entries"):
    with psycopg.connect(dsn) as conn:
        return conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3").fetchall()


def settings_for(dsn, **values):
    return config.parse(config.DAEMON_SETTINGS, {"database_dsn": dsn, "shared_lists": True, **values}, "t")


def file_policy(tmp_path, text=POLICY):
    (tmp_path / "policy.toml").write_text(text)
    return policyfile.check(str(tmp_path / "policy.toml"))[0]


def decide(policy, sender, rcpt, score=0.0, client="203.0.113.9"):
    env = P.Envelope(client, "", "", sender, (rcpt,))
    return P.decide(Verdict(score=score, spamd_required=5.0), env, policy).recipients[0]


# ---------------------------------------------------------------- the schema
def test_the_tables_take_every_direction_setting_and_refuse_what_scanmilter_would_refuse(dsn):
    good = [(s.name, config.toml_value(s.default)) for s in config.DIRECTION_SETTINGS]
    good += [(k, config.toml_value(v)) for k, v in config.OUTBOUND_DEFAULTS.items()]
    good += [("tag_level", '"spamd"'), ("reject_level", "8"), ("quarantine_level", "1e+20")]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for key, value in good:
            conn.execute("INSERT INTO scanmilter_recipient_settings (direction, recipient, key, value, set_by) "
                         "VALUES ('inbound', 'a@example.com', %s, %s, 'test') ON CONFLICT (direction, recipient, key) "
                         "DO UPDATE SET value = EXCLUDED.value", (key, value))
        bad_settings = [("reject_lvl", "3.0"), ("reject_level", '"high"'), ("reject_level", "nan"),
                        ("virus_action", '"ignore"'), ("add_scan_headers", "1"), ("subject_tag", '"[SPÄM]"'),
                        ("spam_reply", '"two\nlines"')]
        for key, value in bad_settings:
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute("INSERT INTO scanmilter_recipient_settings (direction, recipient, key, value, set_by) "
                             "VALUES ('inbound', 'b@example.com', %s, %s, 'test')", (key, value))
        for direction, rcpt in (("sideways", "a@example.com"), ("inbound", "Upper@example.com"),
                                ("inbound", "nobody")):
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute("INSERT INTO scanmilter_recipient_settings (direction, recipient, key, value, set_by) "
                             "VALUES (%s, %s, 'tag_level', '5.0', 'test')", (direction, rcpt))
        for name, value in (("block_sender", "x@y.test"), ("block_senders", "X@y.test"),
                            ("block_senders", "two words@y.test"), ("block_senders", "x@"),
                            ("allow_senders_clients", "10.0.0.0/8")):
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute("INSERT INTO scanmilter_list_entries (list, value, added_by) VALUES (%s, %s, 't')",
                             (name, value))
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            conn.execute("INSERT INTO scanmilter_list_entries (list, value, added_by) "
                         "VALUES ('block_clients', 'nonsense', 't')")
    assert rows(dsn) == []


# ---------------------------------------------------------------- the command line
def test_add_show_remove_through_the_command_line(capsys, conf, dsn):
    code, out, err = lists(capsys, conf, "add", "block_senders", "Spammer@Example.NET", "example.info",
                           "--comment", "ticket 42")
    assert code == 0, err
    assert out.splitlines() == ["added block_senders spammer@example.net (given as Spammer@Example.NET)",
                                "added block_senders example.info"]
    code, out, _ = lists(capsys, conf, "add", "block_senders", "spammer@example.net")
    assert code == 0 and out.startswith(f"block_senders spammer@example.net: already there, added by {WHO} at ")
    assert lists(capsys, conf, "add", "block_clients", "192.0.2.77/24")[1] == \
        "added block_clients 192.0.2.0/24 (given as 192.0.2.77/24)\n"
    code, out, err = lists(capsys, conf, "add", "inbound:CEO@example.com", "reject_level=8", "virus_action=quarantine",
                           "subject_tag=\"[SPAM?]\"")
    assert code == 2 and "virus_action in [inbound.recipients" in err and "needs the quarantine store" in err, err
    assert rows(dsn, "scanmilter_recipient_settings") == []          # refused whole: nothing written
    code, out, err = lists(capsys, conf, "add", "inbound:CEO@example.com", "reject_level=8", "subject_tag=\"[SPAM?]\"")
    assert code == 0, err
    assert out.splitlines() == ["set inbound:ceo@example.com reject_level = 8.0",
                                'set inbound:ceo@example.com subject_tag = "[SPAM?]"']
    code, out, _ = lists(capsys, conf, "add", "inbound:ceo@example.com", "reject_level=9")
    assert out.startswith("changed inbound:ceo@example.com reject_level = 9.0 (was 8.0, set by ")

    code, out, _ = lists(capsys, conf, "show")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("# shared lists in host=") and "3 entries, 2 settings in all" in lines[0]
    assert any(line.startswith(f"block_senders spammer@example.net  added by {WHO} at ") and
               line.endswith("# ticket 42") for line in lines), out
    assert any(line.startswith("inbound:ceo@example.com reject_level = 9.0  set by") for line in lines), out
    code, out, _ = lists(capsys, conf, "show", "block_clients", "--json")
    [entry] = [json.loads(line) for line in out.splitlines()]
    assert entry["list"] == "block_clients" and entry["value"] == "192.0.2.0/24" and entry["added_by"] == WHO
    assert entry["added_role"] == "postgres"

    code, out, _ = lists(capsys, conf, "remove", "block_senders", "example.info")
    assert code == 0 and out.startswith(f"removed block_senders example.info (added by {WHO} at ")
    code, out, _ = lists(capsys, conf, "remove", "block_senders", "example.info")
    assert code == 1 and out == "block_senders example.info: not there\n"
    code, out, _ = lists(capsys, conf, "remove", "inbound:ceo@example.com", "reject_level")
    assert code == 0 and out.startswith("removed inbound:ceo@example.com reject_level = 9.0 (set by ")
    assert [r[:2] for r in rows(dsn)] == [("block_clients", "192.0.2.0/24"), ("block_senders", "spammer@example.net")]


def test_a_change_that_would_break_this_hosts_policy_is_refused_whole(capsys, conf, dsn):
    """The daemons would refuse such a refresh (thresholds out of order): the command refuses first."""
    code, _, err = lists(capsys, conf, "add", "inbound:ceo@example.com", "tag_level=20")
    assert code == 2 and err == ('scanmilter: refused, nothing changed: [inbound.recipients."ceo@example.com"] '
                                 "`tag_level` (this change): thresholds out of order in "
                                 '[inbound.recipients."ceo@example.com"]: tag_level 20 is above reject_level 15.0\n')
    assert lists(capsys, conf, "add", "inbound:ceo@example.com", "tag_level=18", "subject_tag_level=18",
                 "reject_level=19")[0] == 0
    code, _, err = lists(capsys, conf, "remove", "inbound:ceo@example.com", "reject_level")
    assert code == 2 and "refused, nothing changed" in err and "tag_level 18 is above reject_level 15.0" in err
    code, _, err = lists(capsys, conf, "remove", "inbound:ceo@example.com")        # all three: fine
    assert code == 0, err
    assert rows(dsn, "scanmilter_recipient_settings") == []


@pytest.mark.parametrize("args, message", [
    (("add", "block_senders", "not an address"), "is neither an address"),
    (("add", "block_senders", "x@"), "is neither an address"),
    (("add", "block_senders", "x\x07@example.com"), "without control characters"),
    (("add", "block_clients", "10.0.0.0/33"), "'10.0.0.0/33' is not a network"),
    (("add", "allow_clients", "example.com"), "is not a network"),
    (("add", "block_sender", "x@y.test"), "is neither a shared list"),
    (("add", "allow_senders_clients", "10.0.0.0/8"), "allow_senders_clients is not shared"),
    (("add", "inbound:a@example.com", "reject_lvl=3"), "unknown setting 'reject_lvl' (did you mean reject_level?)"),
    (("add", "inbound:a@example.com", "reject_level=high"), "reject_level must be a number"),
    (("add", "inbound:a@example.com", "reject_level"), "a setting is KEY=VALUE"),
    (("add", "inbound:a@example.com", "virus_action=ignore"), "virus_action must be one of"),
    (("add", "inbound:a@example.com", "subject_tag=[SPÄM]"), "use printable ASCII"),
    (("add", "sideways:a@example.com", "reject_level=3"), "is neither a shared list"),
    (("add", "inbound:nobody", "reject_level=3"), "'nobody' is not an address"),
    (("add", "block_senders", "x@y.test", "--comment", "a\nb"), "no control characters"),
    (("remove", "inbound:a@example.com", "reject_lvl"), "'reject_lvl' is not a per-recipient setting"),
])
def test_bad_input_is_refused_before_any_sql(capsys, tmp_path, args, message):
    """The database named here does not exist: the refusal (exit 2, not 3) comes before any connection."""
    code, out, err = lists(capsys, write_config(tmp_path, DEAD_DSN), *args)
    assert code == 2 and message in err and out == "", (code, out, err)


INJECTIONS = ["x');DROP/**/TABLE/**/scanmilter_list_entries;--@example.org",
              "o'hara\"--@example.org", "$$;TRUNCATE/**/scanmilter_lists_state;$$@example.org"]


def test_sql_in_values_is_stored_literally_never_run(capsys, conf, dsn):
    for value in INJECTIONS:
        assert lists(capsys, conf, "add", "block_senders", value, "--comment",
                     "'); DELETE FROM scanmilter_list_entries; --")[0] == 0
    evil = "'); DROP TABLE scanmilter_recipient_settings; --"
    assert lists(capsys, conf, "add", "inbound:o'brien@example.org", f"subject_tag={evil}")[0] == 0
    assert lists(capsys, conf, "add", "block_senders", "x@y.test; DROP TABLE scanmilter_list_entries")[0] == 2
    stored = rows(dsn)
    assert sorted(r[1] for r in stored) == sorted(v.lower() for v in INJECTIONS)
    assert {r[5] for r in stored} == {"'); DELETE FROM scanmilter_list_entries; --"}
    [setting] = rows(dsn, "scanmilter_recipient_settings")
    assert setting[1:4] == ("o'brien@example.org", "subject_tag", config.toml_value(evil))
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT revision > 0 FROM scanmilter_lists_state").fetchone() == (True,)
    # and they read back as the values they are
    database = db.Database(dsn)
    copy = S.read_database(database, 1000)
    database.close()
    assert {e.value for e in copy.entries} == {v.lower() for v in INJECTIONS}
    assert copy.settings[0].value == evil
    code, out, _ = lists(capsys, conf, "remove", "block_senders", INJECTIONS[0])
    assert code == 0 and len(rows(dsn)) == 2


def test_import_of_a_policy_file_and_of_a_text_list_is_idempotent(capsys, conf, dsn, tmp_path):
    source = tmp_path / "old-host-policy.toml"
    source.write_text('[inbound]\nreject_level = 12.0\n[lists]\nblock_senders = ["a@spam.test", "spam.info"]\n'
                      'allow_clients = ["198.51.100.0/24"]\nallow_senders_clients = ["198.51.100.0/24"]\n'
                      '[inbound.recipients."Ceo@example.com"]\ntag_level = 3.0\n[virus_classes]\n"PUA.*" = "tag"\n')
    code, out, err = lists(capsys, conf, "import", str(source))
    assert code == 0, err
    assert out.splitlines()[-1] == (f"imported {source}: 3 entries added, 0 already there; "
                                    "1 settings set, 0 changed, 0 unchanged")
    assert "not imported" in err and "[lists] allow_senders_clients" in err and "[virus_classes]" in err \
        and "[inbound] reject_level" in err
    code, out, _ = lists(capsys, conf, "import", str(source))
    assert code == 0 and out == (f"imported {source}: 0 entries added, 3 already there; "
                                 "0 settings set, 0 changed, 1 unchanged\n")
    text = tmp_path / "blocked.txt"
    text.write_text("# from the old host\n\nBad@Spam.test\nnobody@\n")
    assert lists(capsys, conf, "import", str(text), "--list", "block_senders")[0] == 2     # all or nothing
    text.write_text("# from the old host\n\nBad@Spam.test\na@spam.test\n")
    code, out, _ = lists(capsys, conf, "import", str(text), "--list", "block_senders")
    assert code == 0 and out.endswith("1 entries added, 1 already there; 0 settings set, 0 changed, 0 unchanged\n")
    assert [r[1] for r in rows(dsn) if r[0] == "block_senders"] == ["a@spam.test", "bad@spam.test", "spam.info"]
    assert {r[5] for r in rows(dsn)} == {f"imported from {source}", f"imported from {text}"}


def test_a_bad_line_names_its_file_and_line_and_imports_nothing(capsys, conf, dsn, tmp_path):
    text = tmp_path / "blocked.txt"
    text.write_text("good@spam.test\n\nnot an address\n")
    code, _, err = lists(capsys, conf, "import", str(text), "--list", "block_senders")
    assert code == 2 and f"{text}:3:" in err
    bad = tmp_path / "bad.toml"
    bad.write_text('[lists]\nblock_senders = ["ok@spam.test"]\n'
                   '[inbound.recipients."a@example.com"]\ntag_level = 20.0\n')
    code, _, err = lists(capsys, conf, "import", str(bad))
    assert code == 2 and f"{bad}:4: thresholds out of order" in err
    assert rows(dsn) == [] and rows(dsn, "scanmilter_recipient_settings") == []


def test_a_database_that_is_down_or_not_migrated_is_exit_3_with_the_reason(capsys, tmp_path, database):
    code, _, err = lists(capsys, write_config(tmp_path, DEAD_DSN, database_connect_timeout=1.0), "show")
    assert code == 3 and "database host=/nonexistent/socket/dir" in err
    code, _, err = lists(capsys, write_config(tmp_path, database), "add", "block_senders", "x@y.test")
    assert code == 3 and "run `scanmilter quarantine migrate`" in err


def test_the_lists_command_loads_nothing_of_the_daemon():
    probe = ("import sys\nfrom scanmilter.commands import lists\n"
             "print([m for m in ('scanmilter.app', 'scanmilter.handler', 'Milter', 'milter') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True,
                         env={"PYTHONPATH": str(ROOT / "milter"), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]"


def test_shared_lists_need_a_database(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("shared_lists = true\n")
    with pytest.raises(config.ConfigError, match="shared_lists needs a database"):
        config.load(str(path))


# ---------------------------------------------------------------- precedence
def test_lists_are_a_union_and_the_file_wins_for_the_same_recipient_and_key(capsys, conf, dsn, tmp_path):
    for args in (("block_senders", "db@blocked.test"), ("allow_senders", "filed@blocked.test", "pal@partner.test"),
                 ("block_clients", "192.0.2.0/24"), ("inbound:boss@example.com", "reject_level=5", "tag_level=3"),
                 ("inbound:staff@example.com", "reject_level=6")):
        assert lists(capsys, conf, "add", *args)[0] == 0
    database = db.Database(dsn)
    policy, warnings = S.merge(file_policy(tmp_path), S.read_database(database, 1000))
    database.close()
    assert any("filed@blocked.test is in both allow_senders and block_senders: the block list wins" in w
               for w in warnings)
    # lists: both sources apply, and a block always beats an allow
    assert decide(policy, "db@blocked.test", "x@example.com").action == P.REJECT
    assert decide(policy, "filed@blocked.test", "x@example.com").action == P.REJECT      # the database's allow
    assert decide(policy, "pal@partner.test", "x@example.com", 30.0).reason == "allowed"  # cannot lift it
    assert decide(policy, "friend@partner.test", "x@example.com", 30.0).reason == "allowed"
    assert decide(policy, "a@b.test", "x@example.com", client="192.0.2.9").reason == "blocked"
    # settings: the file's reject_level 20 for boss stays; the database's tag_level 3 applies
    boss = decide(policy, "a@b.test", "boss@example.com", 18.0)
    assert boss.action == P.ACCEPT and boss.spam_flag
    assert "reject_level = 20.0" not in boss.rule
    assert decide(policy, "a@b.test", "boss@example.com", 4.0).rule == \
        'tag_level = 3 from database [inbound.recipients."boss@example.com"]'
    staff = decide(policy, "a@b.test", "staff@example.com", 7.0)
    assert staff.action == P.REJECT and 'from database [inbound.recipients."staff@example.com"]' in staff.rule
    # the file alone, as before
    alone = file_policy(tmp_path)
    assert decide(alone, "db@blocked.test", "x@example.com").action == P.ACCEPT


def test_explain_names_the_source_of_every_match_and_setting(capsys, conf, dsn, tmp_path):
    assert lists(capsys, conf, "add", "block_senders", "db@blocked.test", "--comment", "ticket 7")[0] == 0
    assert lists(capsys, conf, "add", "allow_senders", "@blocked.test")[0] == 0
    assert lists(capsys, conf, "add", "inbound:boss@example.com", "tag_level=3", "reject_level=4")[0] == 0
    message = tmp_path / "m.eml"
    message.write_bytes(b"Subject: hi\r\n\r\nhello\r\n")

    def explain(sender):
        assert cli.main(["explain", str(message), "-c", str(conf), "--from", sender, "--rcpt", "boss@example.com",
                         "--score", "4"]) == 0
        return capsys.readouterr().out

    out = explain("db@blocked.test")
    policy_file = tmp_path / "policy.toml"
    assert out.startswith("shared lists: revision ") and "(2 entries, 2 settings)" in out.splitlines()[0]
    assert (f"  source: block_senders db@blocked.test matches sender <db@blocked.test>: database, list "
            f"`block_senders`, added by {WHO} at ") in out and "(ticket 7)" in out
    assert ("  source: allow_senders @blocked.test matches sender <db@blocked.test>: database, list "
            f"`allow_senders`, added by {WHO} at ") in out
    assert "=> reject (blocked): sender <db@blocked.test> is in block_senders" in out
    assert ('  source: tag_level = 3: database, [inbound.recipients."boss@example.com"] `tag_level`, '
            f"set by {WHO} at ") in out
    # the file wins for reject_level; the line says where in the file
    assert f"  source: reject_level = 20.0: policy file {policy_file}:6" in out
    out = explain("filed@blocked.test")
    assert (f"  source: block_senders filed@blocked.test matches sender <filed@blocked.test>: policy file "
            f"{policy_file}:9, list `block_senders`") in out
    assert ('settings from [inbound.recipients."boss@example.com"], [inbound], '
            'database [inbound.recipients."boss@example.com"]') in out


def test_explain_says_when_the_database_cannot_be_read(capsys, tmp_path):
    conf = write_config(tmp_path, DEAD_DSN, database_connect_timeout=1.0)
    message = tmp_path / "m.eml"
    message.write_bytes(b"Subject: hi\r\n\r\nhello\r\n")
    assert cli.main(["explain", str(message), "-c", str(conf), "--from", "filed@blocked.test",
                     "--rcpt", "a@example.com", "--score", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("shared lists: database host=/nonexistent/socket/dir") and \
        "decided with the policy file alone" in out.splitlines()[0]
    assert "=> reject (blocked)" in out           # the file's own list still applies


# ---------------------------------------------------------------- the daemon's copy
def shared(dsn, tmp_path, **values):
    metrics = Metrics(CollectorRegistry())
    cfg = settings_for(dsn, database_connect_timeout=1.0, **values)
    holder = SimpleNamespace(policy=file_policy(tmp_path))
    return S.SharedLists(cfg, holder.policy, holder, metrics), holder, metrics


def age(metrics):
    return metrics.registry.get_sample_value("scanmilter_shared_lists_age_seconds")


def failures(metrics):
    return metrics.registry.get_sample_value("scanmilter_shared_lists_refresh_failures_total")


def test_a_change_applies_at_once_through_notify_without_a_reload(capsys, conf, dsn, tmp_path):
    lists_, holder, metrics = shared(dsn, tmp_path, shared_lists_refresh_interval=60.0)
    lists_.start_up()
    lists_.start()
    try:
        assert "new@blocked.test" not in holder.policy.block_senders and age(metrics) < 5
        assert lists(capsys, conf, "add", "block_senders", "new@blocked.test")[0] == 0
        # the poll would take 60 s: NOTIFY wakes the refresher
        assert procs.wait_until(lambda: "new@blocked.test" in holder.policy.block_senders, 10)
        assert "filed@blocked.test" in holder.policy.block_senders          # the file's stay
        assert lists(capsys, conf, "remove", "block_senders", "new@blocked.test")[0] == 0
        assert procs.wait_until(lambda: "new@blocked.test" not in holder.policy.block_senders, 10)
        assert failures(metrics) == 0
    finally:
        lists_.stop()


def test_without_notify_the_poll_applies_a_change_within_the_interval(capsys, conf, dsn, tmp_path, monkeypatch):
    monkeypatch.setattr(S.SharedLists, "_listen", lambda self: None)     # e.g. behind a transaction pooler
    interval = 1.0
    lists_, holder, metrics = shared(dsn, tmp_path, shared_lists_refresh_interval=interval)
    lists_.start_up()
    lists_.start()
    try:
        assert lists(capsys, conf, "add", "inbound:new@example.com", "reject_level=7")[0] == 0
        start = time.monotonic()
        assert procs.wait_until(lambda: holder.policy.scope("inbound", "new@example.com").reject_level == 7.0,
                                interval + 5)
        assert time.monotonic() - start < interval + 2.0
    finally:
        lists_.stop()


def test_a_reload_keeps_the_database_merged_in_and_the_file_wins_a_conflict(capsys, conf, dsn, tmp_path, logged):
    assert lists(capsys, conf, "add", "block_senders", "db@blocked.test")[0] == 0
    assert lists(capsys, conf, "add", "inbound:boss@example.com", "tag_level=18", "subject_tag_level=18")[0] == 0
    lists_, holder, _ = shared(dsn, tmp_path)
    lists_.start_up()
    assert "db@blocked.test" in holder.policy.block_senders
    new_file = file_policy(tmp_path, POLICY.replace("filed@blocked.test", "other@blocked.test"))
    holder.policy = lists_.adopt(new_file)
    assert {"db@blocked.test", "other@blocked.test"} <= holder.policy.block_senders
    assert "filed@blocked.test" not in holder.policy.block_senders
    # the file now puts boss's reject_level under the database's tag_level: the file applies, and
    # boss's database settings are left out on this host, saying why (a refused reload would keep
    # every later reload of this host refused until someone changed the database)
    conflicting = file_policy(tmp_path, POLICY.replace("reject_level = 20.0", "reject_level = 10.0"))
    holder.policy = lists_.adopt(conflicting)
    boss = holder.policy.scope("inbound", "boss@example.com")
    assert (boss.reject_level, boss.tag_level, boss.subject_tag_level) == (10.0, 5.0, 5.0)
    assert "db@blocked.test" in holder.policy.block_senders
    assert lists_.file_policy is conflicting and lists_.published is holder.policy
    assert "thresholds out of order" in logged.text and "left out on this host" in logged.text
    lists_.database.close()


def test_rows_that_do_not_validate_and_implausible_states_keep_the_last_good_copy(capsys, conf, dsn, tmp_path,
                                                                                  logged, postgres):
    assert lists(capsys, conf, "add", "block_senders", "kept@blocked.test")[0] == 0
    lists_, holder, metrics = shared(dsn, tmp_path, shared_lists_entry_limit=3)
    lists_.start_up()
    good = holder.policy
    revision = lists_.copy.revision
    dbname = dsn.split("dbname=")[1].split()[0]

    def refused(sql, message):
        before = failures(metrics)
        postgres.psql(sql, dbname)
        assert lists_.refresh() is False
        assert failures(metrics) == before + 1 and holder.policy is good
        assert "kept@blocked.test" in holder.policy.block_senders
        assert message in logged.text, logged.text
    # a setting the table accepts but this host's file cannot (boss's reject_level is 20 in the file)
    # is left out, and the rest applies (test_a_row_scanmilter_refuses_is_left_out_and_never_freezes_...)
    postgres.psql("INSERT INTO scanmilter_recipient_settings (direction, recipient, key, value, set_by) "
                  "VALUES ('inbound', 'boss@example.com', 'tag_level', '25.0', 'psql')", dbname)
    assert lists_.refresh() and lists_.copy.revision > revision
    assert holder.policy.scope("inbound", "boss@example.com").tag_level == 5.0
    assert "thresholds out of order" in logged.text
    postgres.psql("DELETE FROM scanmilter_recipient_settings", dbname)
    assert lists_.refresh()
    good = holder.policy
    refused("INSERT INTO scanmilter_list_entries (list, value, added_by) VALUES "
            "('block_senders', 'a@x.test', 'psql'), ('block_senders', 'b@x.test', 'psql'), "
            "('block_senders', 'c@x.test', 'psql')", "more than shared_lists_entry_limit (3)")
    postgres.psql("DELETE FROM scanmilter_list_entries WHERE added_by = 'psql'", dbname)
    assert lists_.refresh()
    good = holder.policy
    refused("UPDATE scanmilter_lists_state SET revision = 1", "the revision went back")
    refused("UPDATE scanmilter_lists_state SET instance = gen_random_uuid(), revision = 1000",
            "the database is another one than before")


def test_the_database_going_away_keeps_the_copy_and_the_age_rises_then_it_recovers(capsys, tmp_path, logged):
    server = pg.PgServer(f"{scratch('scanmilter-pg-lists-')}/pg")
    server.start()
    try:
        dsn = server.create_database("lists")
        with psycopg.connect(dsn, autocommit=True) as conn:
            db.migrate(conn)
        conf = write_config(tmp_path, dsn)
        assert lists(capsys, conf, "add", "block_senders", "kept@blocked.test")[0] == 0
        lists_, holder, metrics = shared(dsn, tmp_path, shared_lists_refresh_interval=0.2)
        lists_.start_up()
        lists_.start()
        assert "kept@blocked.test" in holder.policy.block_senders
        server.stop()
        assert procs.wait_until(lambda: failures(metrics) >= 2, 30)
        first = age(metrics)
        assert procs.wait_until(lambda: age(metrics) > first + 1, 30)             # staleness rises
        assert "kept@blocked.test" in holder.policy.block_senders                  # never emptied
        assert "filed@blocked.test" in holder.policy.block_senders
        assert "shared lists: refresh failed" in logged.text and "keeping revision" in logged.text
        server.start()
        assert procs.wait_until(lambda: age(metrics) < 1, 30)                      # current again
        assert lists(capsys, conf, "add", "block_senders", "later@blocked.test")[0] == 0
        assert procs.wait_until(lambda: "later@blocked.test" in holder.policy.block_senders, 30)
        assert "the database answers again" in logged.text
        lists_.stop()
    finally:
        server.stop("immediate")


def test_a_database_down_at_start_up_leaves_the_file_policy_loudly_until_it_answers(capsys, tmp_path, logged):
    server = pg.PgServer(f"{scratch('scanmilter-pg-lists-')}/pg")
    server.start()
    try:
        dsn = server.create_database("lists")
        with psycopg.connect(dsn, autocommit=True) as conn:
            db.migrate(conn)
        conf = write_config(tmp_path, dsn)
        assert lists(capsys, conf, "add", "block_senders", "db@blocked.test")[0] == 0
        server.stop()
        lists_, holder, metrics = shared(dsn, tmp_path, shared_lists_refresh_interval=0.2)
        lists_.start_up()
        assert holder.policy.block_senders == frozenset({"filed@blocked.test"})   # the file alone
        assert math.isinf(age(metrics)) and failures(metrics) >= 1
        assert any(r.levelno == logging.ERROR and "cannot be reached at start-up" in r.getMessage()
                   for r in logged.records)
        lists_.start()
        server.start()
        assert procs.wait_until(lambda: "db@blocked.test" in holder.policy.block_senders, 30)
        assert age(metrics) < 5
        lists_.stop()
    finally:
        server.stop("immediate")


def test_a_schema_that_does_not_match_stops_start_up(database, tmp_path):
    lists_, holder, _ = shared(database, tmp_path)
    with pytest.raises(db.SchemaMismatch, match="version 0, this scanmilter needs"):
        lists_.start_up()
    lists_.database.close()


# ---------------------------------------------------------------- rows that do not fit
def test_a_row_scanmilter_refuses_is_left_out_and_never_freezes_every_hosts_lists(capsys, conf, dsn, tmp_path,
                                                                                  logged):
    # one row used to refuse every refresh on every host it did not fit, for good: later blocks
    # never arrived, and a restarted daemon ran with the policy file alone (no database list at all)
    assert lists(capsys, conf, "add", "block_senders", "kept@blocked.test")[0] == 0
    lists_, holder, metrics = shared(dsn, tmp_path)
    lists_.start_up()
    with psycopg.connect(dsn, autocommit=True) as conn:
        # PostgreSQL's constraints take these (cidr's short forms, lower() of the C collation, a
        # no-break space); scanmilter's checks do not
        conn.execute("INSERT INTO scanmilter_list_entries (list, value, added_by) VALUES "
                     "('block_clients', '10/8', 'psql'), ('block_senders', 'Élise@x.test', 'psql'), "
                     "('allow_senders', 'a\u00a0b@x.test', 'psql')")
        # valid on a host whose file says nothing of boss, not on this one (reject_level 20 in the file)
        conn.execute("INSERT INTO scanmilter_recipient_settings (direction, recipient, key, value, set_by) VALUES "
                     "('inbound', 'boss@example.com', 'tag_level', '25.0', 'mx2'), "
                     "('inbound', 'anna@example.com', 'reject_level', '9.0', 'mx2')")
    assert lists(capsys, conf, "add", "block_senders", "later@blocked.test")[0] == 0
    for daemon, policy in ((lists_, holder), shared(dsn, tmp_path)[:2]):     # and after a restart
        if daemon is not lists_:
            daemon.start_up()
        else:
            assert daemon.refresh() is True
        policy = policy.policy
        assert {"kept@blocked.test", "later@blocked.test", "filed@blocked.test"} <= policy.block_senders
        assert "élise@x.test" not in policy.block_senders and not policy.block_clients
        assert policy.scope("inbound", "boss@example.com").tag_level == 5.0         # the file's [inbound]
        assert policy.scope("inbound", "anna@example.com").reject_level == 9.0      # the rest applies
        daemon.database.close()
    text = logged.text
    assert "left out" in text and "'10/8'" in text and "Élise@x.test" in text and "boss@example.com" in text
    assert failures(metrics) == 0


def test_an_ipv4_address_written_as_ipv6_is_refused_as_it_would_never_match(capsys, conf, tmp_path):
    # clients are matched as IPv4 (::ffff:203.0.113.7 arrives as 203.0.113.7): such an entry
    # would be a block that never blocks
    code, out, err = lists(capsys, conf, "add", "block_clients", "::ffff:203.0.113.7")
    assert code != 0 and "203.0.113.7" in err and "IPv4" in err
    with pytest.raises(config.ConfigError, match="IPv4"):
        file_policy(tmp_path, POLICY + 'block_clients = ["::ffff:203.0.113.0/120"]\n')
