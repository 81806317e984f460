import logging
import socket

import pytest

from scanmilter import logs, policy as P
from scanmilter.verdict import Verdict


@pytest.fixture
def setup_logs():
    """logs.setup(...) for one test, undone after it. Left in place, the handler it installs writes
    to this test's stderr, which pytest closes after the test (every later record of any test
    then ends in "--- Logging error ---" instead of a line), and the logger stays cut off from the
    root."""
    logger = logging.getLogger("scanmilter")
    saved, installed = (logger.level, logger.propagate), []

    def setup(*args):
        logs.setup(*args)
        installed.extend(logger.handlers)
    yield setup
    for handler in installed:
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(saved[0])
    logger.propagate = saved[1]


def test_summary_line_format_and_escaping():
    outcome = P.Outcome("reject", "virus", "inbound", None, (), remove=("x@y",))
    verdict = Verdict(viruses=("Eicar",), failed=(("spamd", "timeout: no answer"),))
    line = logs.summary("4Xk2Lz1F3z", "reject", outcome, verdict, "a\r\nb@x\x1b[31m", 2, 1234, 85.4, "192.0.2.1")
    assert line == ("4Xk2Lz1F3z: action=reject, reason=virus, direction=inbound, virus=Eicar, score=-, "
                    "from=<a\\x0d\\x0ab@x\\x1b[31m>, rcpts=2, removed=1, size=1234, ms=85, client=192.0.2.1, "
                    "failed=spamd timeout: no answer")


def test_escape_handles_undecodable_bytes_and_backslashes():
    assert logs.escape("caf\udcc3\\") == "caf\\xc3\\x5c"


def test_syslog_target_uses_the_mail_facility(tmp_path, setup_logs):
    path = str(tmp_path / "log.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(5)
    try:
        setup_logs("syslog", "info", path)
        logs.log.warning("clamd is down")
        data = server.recv(4096).decode()
    finally:
        server.close()
    assert data.startswith("<20>")          # facility mail (2) * 8 + warning (4)
    assert "scanmilter[" in data and "warning: clamd is down" in data


def test_missing_syslog_socket_falls_back_to_stderr(tmp_path, capsys, setup_logs):
    setup_logs("syslog", "info", str(tmp_path / "nothing"))
    logs.log.info("hello")
    err = capsys.readouterr().err
    assert "warning: syslog socket" in err and "hello" in err
