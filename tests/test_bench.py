"""The benchmark's code (bench/) without a benchmark run (`make bench` takes 20 minutes): its parts
import and its command line parses; variant 5 drives clamd and spamd through scanmilter's own
engine clients and judges their answers as scanmilter's defaults do; it has no scanner protocol
of its own."""
import inspect
import subprocess
import sys
import tempfile
import types

import pytest

import stack as stacklib
from conftest import ROOT
from fakes import Server

sys.path.insert(0, str(ROOT / "bench"))
import client  # noqa: E402
import run  # noqa: E402

BENCH = ROOT / "bench"


def test_the_parts_import_and_main_is_short():
    for name in ("client", "corpus", "report", "variants"):
        assert (BENCH / f"{name}.py").is_file(), name
    assert len(inspect.getsource(run.main).splitlines()) <= 25
    args = run.parse_args(["--quick", "--only", "3,5,9"])
    assert (args.messages, args.runs, args.only) == (100, 1, "35")


def test_the_command_line_help():
    out = subprocess.run([sys.executable, str(BENCH / "run.py"), "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--quick" in out.stdout and "clamav-milter" in out.stdout, out.stderr


def test_no_scanner_protocol_of_its_own():
    """clamd's INSTREAM framing and spamd's SPAMC live in scanmilter.scanners only."""
    for path in BENCH.glob("*.py"):
        text = path.read_text()
        assert "zINSTREAM" not in text and "struct" not in text and "SPAMC/1" not in text, path.name


def spamd_says(score):
    def behave(server, conn):
        server.read_all(conn)                # up to the client's end of the request
        body = b"RULE_A"
        conn.sendall(b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: %s ; %.1f / 5.0\r\n\r\n%s"
                     % (len(body), b"True" if score >= 5 else b"False", score, body))
        conn.close()
    return behave


def clamd_says(reply):
    def behave(server, conn):
        server.read_all(conn, until=lambda data: data.endswith(b"\0\0\0\0"))   # the stream's last chunk
        conn.sendall(reply)
        conn.close()
    return behave


@pytest.mark.parametrize("clamd_reply, score, code", [
    (b"stream: OK\0", 1.0, 250),
    (b"stream: Eicar-Test-Signature FOUND\0", 1.0, 550),
    (b"stream: OK\0", client.REJECT_LEVEL, 550),                 # scanmilter's default reject_level
    (b"stream: OK\0", client.REJECT_LEVEL - 0.1, 250),
], ids=["clean", "virus", "spam", "tagged"])
def test_direct_scan_judges_like_scanmilter(clamd_reply, score, code):
    work = tempfile.mkdtemp(prefix="scanmilter-bench-test-")
    stand_in = types.SimpleNamespace(clamd_socket=f"{work}/clamd.sock", spamd_port=stacklib.free_port())
    clamd = Server(clamd_says(clamd_reply), unix_path=stand_in.clamd_socket)
    spamd = Server(spamd_says(score), port=stand_in.spamd_port)
    try:
        result = client.DirectScan(stand_in)(b"Subject: hi\r\n\r\nhello\r\n")
    finally:
        clamd.close()
        spamd.close()
    assert result["code"] == code, result
    # both engines got the message, with the Received line the benchmark puts in front
    assert [b"Subject: hi\r\n\r\nhello\r\n" in data and b"Received: from mail.outside.test" in data
            for data in clamd.received + spamd.received] == [True, True]


def test_direct_scan_counts_an_engine_error_as_a_failed_message():
    work = tempfile.mkdtemp(prefix="scanmilter-bench-test-")
    stand_in = types.SimpleNamespace(clamd_socket=f"{work}/clamd.sock", spamd_port=stacklib.free_port())
    clamd = Server(clamd_says(b"what?\0"), unix_path=stand_in.clamd_socket)
    spamd = Server(spamd_says(1.0), port=stand_in.spamd_port)
    try:
        with pytest.raises(ConnectionError, match="clamd: protocol"):
            client.DirectScan(stand_in)(b"Subject: hi\r\n\r\nhello\r\n")
    finally:
        clamd.close()
        spamd.close()
