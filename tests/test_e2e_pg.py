"""End to end: two Postfix + scanmilter stacks standing for two hosts (mx1, mx2) share one quarantine
in PostgreSQL (a server of this module's own, so that it can be stopped): both hold mail, the
command on either host sees both hosts' entries, two releases at once deliver once, and mail that
arrives while PostgreSQL is stopped is accounted for, message by message, in both fallback modes
(mx1 tempfails, mx2 keeps it locally until the database is back)."""
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from conftest import ROOT, scratch
from scanmilter import db
from scanmilter.commands.selftest import eicar
from support import OUTSIDE, get, make, scanmilter, scrape, wait_for

pytestmark = pytest.mark.integration

# both directions hold at 6: the front smtpd hands mail over from 127.0.0.1 (an internal network)
POLICY = """
[inbound]
quarantine_level = 6.0
[outbound]
quarantine_level = 6.0
"""
HOSTS = {"mx1.test": "tempfail", "mx2.test": "local"}


@pytest.fixture(scope="module")
def server():
    import pg
    s = pg.PgServer(Path(scratch("scanmilter-e2e-pg-")) / "pg")
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def dsn(server):
    dsn = server.create_database("quarantine")
    with psycopg.connect(dsn, autocommit=True) as conn:
        db.migrate(conn)
    return dsn


@pytest.fixture(scope="module")
def hosts(stack_with, dsn):
    """{host name: started stack}, each with its own Postfix, engines and scanmilter."""
    return {name: stack_with(policy_text=POLICY, quarantine=True, queue_in_front=True, scanmilter_settings={
        "quarantine_backend": "postgresql", "database_dsn": dsn, "database_host_name": name,
        "quarantine_fallback": fallback, "quarantine_fallback_interval": 0.5, "database_connect_timeout": 1.0,
        "database_retry_interval": 1.0, "engine_check_interval": 0.5}) for name, fallback in HOSTS.items()}


def cli(stack, *args):
    return scanmilter(stack, "quarantine", *args)


def held(dsn) -> list[tuple[str, str, str]]:
    """(id, subject, host) of every entry in the database."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT id, meta->>'subject', host FROM quarantine_entries").fetchall()


def hold(stack, marker):
    r = stack.send(make(f"scanmilter-tag-test {marker}"), "alice@outside.test", ["bob@example.com"],
                   xclient_addr=OUTSIDE)
    assert r["code"] == 250, r                  # held and discarded
    wait_for(lambda: any(marker in s for _, s, _ in held(stack.dsn)), f"{marker} held")
    return next(i for i, s, _ in held(stack.dsn) if marker in s)


@pytest.fixture(scope="module", autouse=True)
def with_dsn(hosts, dsn):
    for stack in hosts.values():
        stack.dsn = dsn


def test_both_hosts_hold_and_the_command_on_either_lists_both(hosts, dsn):
    markers = {name: uuid.uuid4().hex for name in hosts}
    ids = {name: hold(stack, markers[name]) for name, stack in hosts.items()}
    for name, stack in hosts.items():
        r = cli(stack, "list", "--json")
        assert r.returncode == 0, r.stderr
        listed = {e["id"]: e for e in map(json.loads, r.stdout.splitlines())}
        for holder, entry_id in ids.items():
            assert listed[entry_id]["host"] == holder and markers[holder] in listed[entry_id]["subject"]
        other = ids["mx2.test" if name == "mx1.test" else "mx1.test"]
        shown = cli(stack, "show", other)
        assert shown.returncode == 0 and "scanmilter-tag-test" in shown.stdout, shown.stderr
        assert other in cli(stack, "list", "--from", "alice@outside").stdout


def test_two_releases_from_two_hosts_at_once_deliver_once(hosts, dsn):
    mx1, mx2 = hosts["mx1.test"], hosts["mx2.test"]
    marker = uuid.uuid4().hex
    entry_id = hold(mx1, marker)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "milter"))
    start = time.monotonic()
    running = [subprocess.Popen([sys.executable, "-m", "scanmilter", "quarantine", "release", entry_id, "--by", by,
                                 "-c", str(stack.milter_config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env) for by, stack in (("alice", mx1), ("bob", mx2))]
    results = [(p.wait(60), *p.communicate()) for p in running]
    wait_for(lambda: any(marker.encode() in d.data for d in mx1.delivered()), "the released message")
    took = time.monotonic() - start
    assert sorted(r[0] for r in results) == [0, 3], results
    loser = next(r for r in results if r[0] == 3)
    assert "already released to bob@example.com" in loser[2] and f"{entry_id} was released by " in loser[2]
    # through the release service mx1 recorded: delivered by mx1's Postfix, once
    mx1.wait_drained()
    mx2.wait_drained()
    assert len([d for d in mx1.delivered() if marker.encode() in d.data]) == 1
    assert not [d for d in mx2.delivered() if marker.encode() in d.data]
    print(f"\ntwo releases at once: delivered once by mx1's Postfix {took:.2f}s after both commands started")


def sent(stack, phase: str) -> dict[str, str]:
    """Two ham messages, three to hold and one with a virus, through the front smtpd (Postfix queues
    them and hands them to the milter's smtpd, retrying what is tempfailed): {marker: kind}."""
    kinds = {}
    for kind in ("ham", "ham", "hold", "hold", "hold", "virus"):
        marker = f"{phase}-{kind}-{uuid.uuid4().hex[:12]}"
        subject = f"scanmilter-tag-test {marker}" if kind == "hold" else f"hello {marker}"
        data = make(subject, attachment=eicar() if kind == "virus" else None)
        r = stack.send(data, "alice@outside.test", ["bob@example.com"], port=stack.front_port)
        assert r["code"] == 250, r                              # queued by the front smtpd
        kinds[marker] = kind
    return kinds


def deliveries(stack, marker, to):
    return [d for d in stack.delivered() if marker.encode() in d.data and d.recipients == [to]]


def accounted(stack, marker, kind, dsn) -> bool:
    """The message's fate is settled: ham delivered, a virus bounced to its sender, spam held."""
    if kind == "ham":
        return bool(deliveries(stack, marker, "bob@example.com"))
    if kind == "virus":
        return bool(deliveries(stack, marker, "alice@outside.test"))
    return any(marker in s for _, s, _ in held(dsn))


def test_postgresql_stopped_mid_stream_every_message_is_accounted_for(hosts, dsn, server):
    mixes = {name: {} for name in hosts}
    for name, stack in hosts.items():
        mixes[name].update(sent(stack, "before"))
    wait_for(lambda: all(accounted(hosts[n], m, k, dsn) for n in hosts for m, k in mixes[n].items()),
             "the mail before the stop", 60)

    server.stop()
    stopped = time.monotonic()
    try:
        wait_for(lambda: all(get(scrape(s), "scanmilter_quarantine_backend_up", backend="postgresql") == 0
                             for s in hosts.values()), "the metric to show the database down", 15)
        during = {name: sent(stack, "during") for name, stack in hosts.items()}
        for name in hosts:
            mixes[name].update(during[name])
        mx1, mx2 = hosts["mx1.test"], hosts["mx2.test"]
        # mx1 tempfails what it must hold (Postfix keeps it queued); mx2 holds it in its own directory
        mx1.wait_logged("quarantine store failed", count=1, timeout=30)
        mx2.wait_logged("held in the local fallback store", count=3, timeout=30)
        # mail that is not held goes on as usual while the database is down
        wait_for(lambda: all(accounted(hosts[n], m, k, dsn) for n in hosts
                             for m, k in during[n].items() if k != "hold"), "ham and viruses while down", 60)
    finally:
        server.start()
    restarted = time.monotonic()
    for name, stack in hosts.items():
        mixes[name].update(sent(stack, "after"))
    wait_for(lambda: all(accounted(hosts[n], m, k, dsn) for n in hosts for m, k in mixes[n].items()),
             "every message after the restart", 90)
    settled = time.monotonic()
    for stack in hosts.values():
        stack.wait_drained()
    wait_for(lambda: get(scrape(hosts["mx2.test"]), "scanmilter_quarantine_fallback_entries") == 0,
             "mx2's fallback store to be empty", 30)

    # every message exactly once: ham delivered once, a virus bounced once and never delivered,
    # spam held once (by the host it came to) and never delivered
    entries = held(dsn)
    for name, stack in hosts.items():
        for marker, kind in mixes[name].items():
            to_bob = deliveries(stack, marker, "bob@example.com")
            bounced = deliveries(stack, marker, "alice@outside.test")
            copies = [(h, s) for _, s, h in entries if marker in s]
            assert (len(to_bob), len(bounced), len(copies)) == \
                {"ham": (1, 0, 0), "virus": (0, 1, 0), "hold": (0, 0, 1)}[kind], (name, marker)
            if kind == "hold":
                assert copies[0][0] == name
    # how: mx1's Postfix deferred the tempfailed ones and delivered them on a later try; mx2's
    # mover brought its local entries into the database
    assert "status=deferred" in hosts["mx1.test"].postfix_log() and "4.7.1" in hosts["mx1.test"].postfix_log()
    with psycopg.connect(dsn, autocommit=True) as conn:
        moved = conn.execute("SELECT count(*) FROM quarantine_events WHERE action = 'moved' AND host = 'mx2.test'")
        assert moved.fetchone()[0] >= 3
    metrics = scrape(hosts["mx2.test"])
    assert get(metrics, "scanmilter_quarantine_fallback_moved_total") >= 3
    assert get(metrics, "scanmilter_quarantine_fallback_stored_total") >= 3
    assert all(get(scrape(s), "scanmilter_quarantine_backend_up", backend="postgresql") == 1 for s in hosts.values())
    for stack in hosts.values():        # the daemons took the outage in their stride
        lines = stack.logs["scanmilter"].read_text(errors="replace").splitlines()
        # a database outage is the store's own failure: logged in one line, never a traceback
        assert not [line for line in lines if line.startswith("Traceback")], stack.logs["scanmilter"]
        assert not [line for line in lines if "periodic check failed" in line
                    or "moving the local fallback store failed" in line]              # no bug of ours showed
        assert not [line for line in lines if line.startswith("error connecting")]       # the pool's own noise
    print(f"\nPostgreSQL stopped for {restarted - stopped:.1f}s; every message settled {settled - restarted:.1f}s "
          f"after the restart; mx1 tempfailed {len(hosts['mx1.test'].wait_logged('quarantine store failed'))} "
          f"time(s), mx2 kept {len(hosts['mx2.test'].wait_logged('held in the local fallback store'))} locally")
