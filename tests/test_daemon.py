"""The daemon as a process, without Postfix: socket permissions, start-up errors, signals."""
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

import stack as stacklib
from conftest import ROOT
from scanmilter.commands import miltertalk as MT

pytestmark = pytest.mark.integration


def start(tmp_path, extra="", milter_socket=None):
    sock = tmp_path / "s.sock"
    conf = tmp_path / "scanmilter.toml"
    conf.write_text(f'milter_socket = "{milter_socket or f"unix:{sock}"}"\nmetrics_address = ""\nclamd_enabled = false\n'
                    f'spamd_enabled = false\n' + extra)
    log = open(tmp_path / "out.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "scanmilter", "serve", "-c", str(conf)], stdout=log,
                            stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(ROOT / "milter")))
    return proc, sock, conf


def wait_socket(proc, sock, timeout=10):
    end = time.monotonic() + timeout
    while time.monotonic() < end and not sock.exists():
        assert proc.poll() is None, "daemon exited"
        time.sleep(0.05)
    assert sock.exists()


def wait_logged(tmp_path, proc, text, count=1, timeout=15):
    """The daemon's output once it has `count` lines containing `text`."""
    end = time.monotonic() + timeout
    while True:
        out = (tmp_path / "out.log").read_text(errors="replace")
        if sum(text in line for line in out.splitlines()) >= count:
            return out
        assert proc.poll() is None, f"daemon exited:\n{out}"
        assert time.monotonic() < end, f"{text!r} not logged {count} time(s):\n{out}"
        time.sleep(0.05)


def test_socket_mode_signals_and_exit_codes(tmp_path):
    proc, sock, conf = start(tmp_path)
    try:
        wait_socket(proc, sock)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660          # milter_socket_mode default
        conf.write_text(conf.read_text() + "bogus_setting = 1\n")
        proc.send_signal(signal.SIGHUP)                               # a broken reload is refused...
        wait_logged(tmp_path, proc, "reload refused")
        assert proc.poll() is None                                    # ...and the daemon keeps running
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "out.log").read_text()
    assert "reload refused" in log and "bogus_setting" in log and "stopped" in log
    assert "Traceback" not in log


def test_quarantine_directories_are_0700_and_a_reload_moves_them(tmp_path):
    """The umask for the milter socket (milter_socket_mode 0660: umask 0117) must not reach the
    quarantine: a directory made 0600 could not be entered after a reload or a restart."""
    def assert_modes(q):
        assert stat.S_IMODE(os.stat(q).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(q / "entries").st_mode) == 0o700
        assert stat.S_IMODE(os.stat(q / "index.sqlite").st_mode) == 0o600

    proc, sock, conf = start(tmp_path, f'quarantine_directory = "{tmp_path}/q1"\n')
    try:
        wait_socket(proc, sock)
        wait_logged(tmp_path, proc, "starting scanmilter")
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        assert_modes(tmp_path / "q1")
        conf.write_text(conf.read_text().replace("/q1", "/q2"))
        proc.send_signal(signal.SIGHUP)
        wait_logged(tmp_path, proc, "reloaded configuration")
        assert_modes(tmp_path / "q2")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # and a later start with the new directory
    proc, sock, conf = start(tmp_path, f'quarantine_directory = "{tmp_path}/q2"\n')
    try:
        wait_socket(proc, sock)
        wait_logged(tmp_path, proc, "starting scanmilter")
        assert_modes(tmp_path / "q2")
    finally:
        proc.kill()
        proc.wait()
    assert "Traceback" not in (tmp_path / "out.log").read_text()


def test_a_bad_configuration_stops_start_up_with_one_line(tmp_path):
    proc, sock, conf = start(tmp_path, 'clamd_timeout = "soon"\n')
    assert proc.wait(timeout=15) == 1
    out = (tmp_path / "out.log").read_text()
    assert out.startswith("scanmilter: fatal: ") and "clamd_timeout" in out and out.count("\n") == 1


def test_a_socket_that_cannot_be_created_is_explained(tmp_path):
    """libmilter says only "cannot opensocket": the log says which directory is missing."""
    proc, sock, conf = start(tmp_path, milter_socket=f"unix:{tmp_path}/missing/s.sock")
    assert proc.wait(timeout=30) == 1
    out = (tmp_path / "out.log").read_text()
    assert "milter loop failed" in out and f"directory {tmp_path}/missing does not exist" in out, out


# Flags that skip a stage or leave it unanswered; unknown commands may stay skipped.
SKIP_OR_NO_REPLY = (MT.P_NOCONNECT | MT.P_NOHELO | MT.P_NOMAIL | MT.P_NORCPT | MT.P_NOBODY | MT.P_NOHDRS
                    | MT.P_NOEOH | MT.P_NODATA | MT.P_NR_HDR | MT.P_NR_CONN | MT.P_NR_HELO | MT.P_NR_MAIL
                    | MT.P_NR_RCPT | MT.P_NR_DATA | MT.P_NR_EOH | MT.P_NR_BODY)


def negotiated(address):
    session = MT.Session(address, timeout=10)
    try:
        session.negotiate()
        return session.protocol
    finally:
        session.close()


def one_message(address):
    session = MT.Session(address, timeout=10)
    try:
        return session.message("203.0.113.9", "mx.outside.test", "alice@outside.test", ["bob@example.com"],
                               [("Subject", "hello"), ("From", "alice@outside.test")], b"hi\r\n")
    finally:
        session.close()


def wait_connectable(proc, address, timeout=10):
    end = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "daemon exited"
        try:
            return negotiated(address)
        except MT.MilterError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


def test_unix_socket_negotiates_no_reply_stages(tmp_path):
    proc, sock, conf = start(tmp_path)
    try:
        wait_socket(proc, sock)
        protocol = negotiated(f"unix:{sock}")
        # headers and body stream without an answer each: cheaper, and no TCP to stall
        assert protocol & MT.P_NR_HDR and protocol & MT.P_NR_BODY, hex(protocol)
        answer = one_message(f"unix:{sock}")
        assert answer.action == "accept", answer
    finally:
        proc.kill()
        proc.wait()


def test_tcp_socket_answers_every_stage_and_sets_nodelay(tmp_path):
    port = stacklib.free_port()
    address = f"inet:{port}@127.0.0.1"
    proc, sock, conf = start(tmp_path, milter_socket=address)
    try:
        protocol = wait_connectable(proc, address)
        # a packet Postfix sends without waiting for an answer would wait for our delayed ACK
        assert protocol & SKIP_OR_NO_REPLY == 0, hex(protocol)
        answer = one_message(address)
        assert answer.action == "accept", answer
    finally:
        proc.kill()
        proc.wait()
    log = (tmp_path / "out.log").read_text()
    assert "milter socket is TCP: TCP_NODELAY set, every stage answered" in log, log
