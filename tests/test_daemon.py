"""The daemon as a process, without Postfix: socket permissions, start-up errors, signals."""
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from conftest import ROOT

pytestmark = pytest.mark.integration


def start(tmp_path, extra=""):
    sock = tmp_path / "s.sock"
    conf = tmp_path / "scanmilter.toml"
    conf.write_text(f'milter_socket = "unix:{sock}"\nmetrics_address = ""\nclamd_enabled = false\n'
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


def test_socket_mode_signals_and_exit_codes(tmp_path):
    proc, sock, conf = start(tmp_path)
    try:
        wait_socket(proc, sock)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660          # milter_socket_mode default
        conf.write_text(conf.read_text() + "bogus_setting = 1\n")
        proc.send_signal(signal.SIGHUP)                               # a broken reload is refused...
        time.sleep(1)
        assert proc.poll() is None                                    # ...and the daemon keeps running
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "out.log").read_text()
    assert "reload refused" in log and "bogus_setting" in log and "stopped" in log
    assert "Traceback" not in log


def test_a_bad_configuration_stops_start_up_with_one_line(tmp_path):
    proc, sock, conf = start(tmp_path, 'clamd_timeout = "soon"\n')
    assert proc.wait(timeout=15) == 1
    out = (tmp_path / "out.log").read_text()
    assert out.startswith("scanmilter: fatal: ") and "clamd_timeout" in out and out.count("\n") == 1
