"""End to end through real Postfix with shared lists on the session's PostgreSQL: `scanmilter lists
add block_senders` on a running stack refuses the next message from that sender within the refresh
interval, and `lists remove` lets it through again, with no SIGHUP and no restart."""
import os
import re
import signal
import time
import uuid

import psycopg
import pytest

import procs
from scanmilter import db
from support import OUTSIDE, delivered_with, get, make, not_delivered, scanmilter, scrape

pytestmark = pytest.mark.integration

INTERVAL = 3.0          # shared_lists_refresh_interval of the stack
SENDER = "pest@spam.test"


@pytest.fixture(scope="module")
def stack(stack_with, postgres):
    dsn = postgres.create_database("e2e_shared_lists")
    with psycopg.connect(dsn, autocommit=True) as conn:
        db.migrate(conn)
    return stack_with(scanmilter_settings={"database_dsn": dsn, "shared_lists": True,
                                           "shared_lists_refresh_interval": INTERVAL})


def revision_in_force(stack) -> int:
    """The newest revision the daemon logged as in force (-1 before the first)."""
    found = re.findall(r"shared lists: revision (\d+)", stack.logs["scanmilter"].read_text())
    return int(found[-1]) if found else -1


def applied_within_the_interval(stack, before: int) -> None:
    start = time.monotonic()
    assert procs.wait_until(lambda: revision_in_force(stack) > before, INTERVAL + 10), \
        stack.logs["scanmilter"].read_text()[-3000:]
    assert time.monotonic() - start < INTERVAL + 1.5


def send(stack, marker):
    return stack.send(make(f"shared lists {marker}"), SENDER, ["bob@example.com"], xclient_addr=OUTSIDE)


def test_a_block_added_and_removed_on_a_running_stack_applies_without_sighup(stack):
    pid = stack.pids("scanmilter")
    before = revision_in_force(stack)
    assert before == 0                                   # read at start-up: an empty database
    first = uuid.uuid4().hex
    assert send(stack, first)["code"] == 250
    delivered_with(stack, first)

    r = scanmilter(stack, "lists", "add", "block_senders", SENDER, "--comment", "e2e")
    assert r.returncode == 0 and r.stdout == f"added block_senders {SENDER}\n", r
    applied_within_the_interval(stack, before)
    refused = uuid.uuid4().hex
    r = send(stack, refused)
    assert r["code"] == 550 and "5.7.1 Message rejected by policy" in r["reply"], r
    assert not_delivered(stack, refused)

    before = revision_in_force(stack)
    r = scanmilter(stack, "lists", "remove", "block_senders", SENDER)
    assert r.returncode == 0 and r.stdout.startswith(f"removed block_senders {SENDER} (added by "), r
    applied_within_the_interval(stack, before)
    again = uuid.uuid4().hex
    assert send(stack, again)["code"] == 250
    delivered_with(stack, again)

    m = scrape(stack)
    assert get(m, "scanmilter_config_reloads_total", result="ok") == 0          # no SIGHUP
    assert get(m, "scanmilter_shared_lists_refresh_failures_total") == 0
    assert 0 <= get(m, "scanmilter_shared_lists_age_seconds") < INTERVAL + 5
    assert stack.pids("scanmilter") == pid                                      # no restart


def test_a_reload_keeps_the_database_entries_and_a_file_that_conflicts_with_them_wins(stack):
    # named in docs/failure.md; a file that conflicts with the database's settings wins (see below)
    before = revision_in_force(stack)
    r = scanmilter(stack, "lists", "add", "block_senders", SENDER)
    assert r.returncode == 0, r
    r = scanmilter(stack, "lists", "add", "inbound:bob@example.com", "tag_level=12", "subject_tag_level=12")
    assert r.returncode == 0, r
    applied_within_the_interval(stack, before)
    [(pid, _)] = stack.pids("scanmilter")
    stack.root.joinpath("scanmilter", "policy.toml").write_text('[lists]\nblock_senders = ["filed@spam.test"]\n')
    settings = stack.milter_config.read_text()
    stack.milter_config.write_text(settings + f'policy_file = "{stack.root}/scanmilter/policy.toml"\n')
    os.kill(pid, signal.SIGHUP)
    stack.wait_logged("reloaded configuration")
    for sender in (SENDER, "filed@spam.test"):          # the database's entry and the new file's
        r = stack.send(make("after reload"), sender, ["bob@example.com"], xclient_addr=OUTSIDE)
        assert r["code"] == 550, (sender, r)
    # a file whose reject_level falls below the database's tag_level for bob: root's file applies, and
    # bob's database settings are left out on this host, saying why (a refused reload would have kept
    # every later reload of every such host refused until someone changed the database)
    stack.root.joinpath("scanmilter", "policy.toml").write_text("[inbound]\nreject_level = 10.0\n")
    os.kill(pid, signal.SIGHUP)
    [line] = stack.wait_logged("are left out on this host")
    assert "tag_level 12 is above reject_level 10.0" in line and "inbound:bob@example.com" in line, line
    stack.wait_logged("reloaded configuration", count=2)
    r = stack.send(make("after the second reload"), "filed@spam.test", ["bob@example.com"], xclient_addr=OUTSIDE)
    assert r["code"] == 250, r                           # the new file no longer blocks it
    r = stack.send(make("after the second reload"), SENDER, ["bob@example.com"], xclient_addr=OUTSIDE)
    assert r["code"] == 550, r                           # the database's block stays in force
