"""Faults end to end through real Postfix: each engine stopped, hanging or answering garbage;
scanmilter killed with SIGKILL mid-message. Every message is delivered, rejected or tempfailed,
and service is normal again as soon as the fault ends."""
import concurrent.futures
import os
import re
import signal
import time
import uuid

import pytest

import procs
from fakes import BadServer
from support import delivered_with, make, scrape, send as send_data, tempfails_in_time

pytestmark = pytest.mark.integration

ENGINE_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def stack(stack_with):
    return stack_with(scanmilter_settings={"clamd_timeout": ENGINE_TIMEOUT, "spamd_timeout": ENGINE_TIMEOUT,
                                           "engine_failure_threshold": 1000, "engine_check_interval": 60.0})


def threads(stack):
    pid = stack.pids("scanmilter")[0][0]
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"Threads:\s+(\d+)", f.read()).group(1))


def in_engines(stack):
    """Threads inside an engine now, the ones a message stopped waiting for too
    (scanmilter_scans_in_flight, every engine)."""
    return sum(v for (name, _), v in scrape(stack).items() if name == "scanmilter_scans_in_flight")


def send(stack, marker):
    return send_data(stack, make(f"fault {marker}"))


def fault(stack, engine, mode):
    """Stop the engine and put a misbehaving server (or nothing) in its place."""
    stack.stop_service(engine)
    if mode == "stopped":
        return None
    if engine == "clamd":
        return BadServer(mode, unix_path=stack.clamd_socket)
    return BadServer(mode, port=stack.spamd_port)


@pytest.mark.parametrize("engine", ["clamd", "spamd"])
@pytest.mark.parametrize("mode", ["stopped", "hang", "garbage"])
def test_engine_fault_tempfails_in_time_then_recovers(stack, engine, mode):
    # The scan pool starts its threads as messages need them: one message first, so that the
    # baseline counts those one message uses (idle pool threads are not threads stuck on the fault).
    warm = uuid.uuid4().hex
    assert send(stack, warm)["code"] == 250
    delivered_with(stack, warm)
    baseline = threads(stack)
    bad = fault(stack, engine, mode)
    try:
        marker = tempfails_in_time(stack, send, ENGINE_TIMEOUT + 3)
        kind = {"stopped": "refused", "hang": "timeout", "garbage": "protocol"}[mode]
        assert f"{engine} scan failed: {kind}" in stack.logs["scanmilter"].read_text()
        # a thread stuck on the fault gives up by the engine's own timeout, while the fault lasts
        # (ending the fault would free a thread that waits on a hanging server anyway)
        assert procs.wait_until(lambda: in_engines(stack) == 0, ENGINE_TIMEOUT + 5), in_engines(stack)
    finally:
        if bad:
            bad.close()
        stack.start_service(engine)
    r = send(stack, marker)                          # the sender's retry, engine back
    assert r["code"] == 250, r
    delivered_with(stack, marker)
    # afterwards no thread is left in an engine, and the fault left no thread behind
    settled = procs.wait_until(lambda: in_engines(stack) == 0 and threads(stack) <= baseline + 1, ENGINE_TIMEOUT + 5)
    assert settled, (in_engines(stack), threads(stack), baseline)


def test_sigkill_with_messages_in_flight_loses_nothing_and_duplicates_nothing(stack):
    """Postfix answers per milter_default_action = tempfail; the clients retry after a restart."""
    bad = fault(stack, "spamd", "hang")              # messages wait in end-of-message scanning
    markers = [uuid.uuid4().hex for _ in range(6)]
    try:
        with concurrent.futures.ThreadPoolExecutor(len(markers)) as pool:
            futures = {m: pool.submit(send, stack, m) for m in markers}
            deadline = time.monotonic() + 30         # all are in flight: each is waiting for spamd
            while len(bad.conns) < len(markers) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(bad.conns) >= len(markers), len(bad.conns)
            [(pid, _)] = stack.pids("scanmilter")
            os.kill(pid, signal.SIGKILL)
            first = {m: f.result(timeout=60) for m, f in futures.items()}
    finally:
        bad.close()
        stack.start_service("spamd")
    # Postfix's milter_default_action = tempfail: not dropped, not accepted unscanned
    assert all(r["code"] == 451 and "4.7.1 Service unavailable" in r["reply"] for r in first.values()), first
    stack.start_service("scanmilter")                               # the supervisor starts it again
    for m in markers:                                               # each client retries
        assert send(stack, m)["code"] == 250
    for m in markers:
        delivered_with(stack, m)                                    # exactly once (checked inside)
    assert "can't read SMFIC_BODYEOB reply packet header" in stack.postfix_log()
