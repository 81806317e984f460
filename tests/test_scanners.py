"""Wire protocols of clamd and spamd against fake servers (fault injection only:
the real engines are exercised by the integration tests)."""
import time

import pytest

from fakes import Server
from scanmilter.message import Spool
from scanmilter.scanners import clamd as C, spamd as S


def spool_of(data: bytes, memory_limit=1 << 20):
    s = Spool(memory_limit, 1 << 30)
    s.write(data)
    return s


def FakeServer(tmp_path, behave) -> Server:
    """A unix-socket server that runs `behave(server, conn)` for each connection, then closes it."""
    def closing(server, conn):
        with conn:
            behave(server, conn)
    return Server(closing, unix_path=tmp_path / "fake.sock")


def clamd_scanner(path, timeout=2.0, size_limit=1 << 20):
    return C.ClamdScanner(("unix", path), 1.0, timeout, size_limit)


def spamd_scanner(path, timeout=2.0, size_limit=1000, action="skip"):
    return S.SpamdScanner(("unix", path), 1.0, timeout, size_limit, action)


def instream_done(data):
    return data.endswith(b"\0\0\0\0")


@pytest.mark.parametrize("reply, outcome, detail", [
    (b"stream: OK\0", "clean", ""),
    (b"stream: Eicar-Test-Signature FOUND\0", "found", ""),
    (b"INSTREAM size limit exceeded. ERROR\0", "error", "protocol"),
    (b"stream: OK but not really\0", "error", "protocol"),
    (b"", "error", "protocol"),
])
def test_clamd_replies(tmp_path, reply, outcome, detail):
    def behave(srv, conn):
        srv.read_all(conn, until=instream_done)
        conn.sendall(reply)
    srv = FakeServer(tmp_path, behave)
    result = clamd_scanner(srv.path).scan(spool_of(b"x" * 200000, memory_limit=1000))
    assert result.outcome == outcome and result.detail.startswith(detail)
    # the whole message went over as INSTREAM chunks
    sent = srv.received[0]
    assert sent.startswith(b"zINSTREAM\0") and sent.count(b"x") == 200000


def answer_early(reply):
    """A server that reads the first bytes only, answers and hangs up, as clamd does when a
    stream passes its StreamMaxLength."""
    def behave(srv, conn):
        conn.recv(100)
        conn.sendall(reply)
    return behave


def test_clamd_hanging_up_mid_stream_is_a_protocol_error_with_its_words(tmp_path):
    srv = FakeServer(tmp_path, answer_early(b"INSTREAM size limit exceeded. ERROR\0"))
    result = clamd_scanner(srv.path, size_limit=1 << 30).scan(spool_of(b"x" * (8 << 20), memory_limit=1000))
    assert result.outcome == "error" and result.detail.startswith("protocol: clamd hung up mid-stream")
    assert "size limit exceeded" in result.detail


def test_spamd_hanging_up_mid_message_is_a_protocol_error(tmp_path):
    srv = FakeServer(tmp_path, answer_early(b"SPAMD/1.1 76 Bad header line\r\n\r\n"))
    result = spamd_scanner(srv.path, size_limit=1 << 30).scan(spool_of(b"y" * (8 << 20), memory_limit=1000))
    assert result.outcome == "error" and result.detail.startswith("protocol: spamd error 76"), result.detail


def test_clamd_that_never_answers_times_out(tmp_path):
    srv = FakeServer(tmp_path, lambda s, c: (s.read_all(c, until=instream_done), time.sleep(5)))
    start = time.monotonic()
    result = clamd_scanner(srv.path, timeout=0.5).scan(spool_of(b"hello"))
    assert result.outcome == "error" and result.detail.startswith("timeout")
    assert time.monotonic() - start < 2


def test_clamd_down_is_refused(tmp_path):
    result = clamd_scanner(str(tmp_path / "none.sock")).scan(spool_of(b"hello"))
    assert result.outcome == "error" and result.detail.startswith("refused")


def test_clamd_skips_over_its_size_limit(tmp_path):
    result = clamd_scanner(str(tmp_path / "none.sock"), size_limit=3).scan(spool_of(b"hello"))
    assert (result.outcome, result.detail) == ("skipped", "size")


SPAMD_GTUBE = (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 25\r\nSpam: True ; 1000.0 / 5.0\r\n\r\n"
               b"GTUBE,NO_RECEIVED,NO_RELAYS")


def spamd_behave(reply):
    def behave(srv, conn):
        data = srv.read_all(conn)       # spamc-style: we shut down our write side
        conn.sendall(reply)
        return data
    return behave


def test_spamd_symbols(tmp_path):
    srv = FakeServer(tmp_path, spamd_behave(SPAMD_GTUBE))
    result = spamd_scanner(srv.path).scan(spool_of(b"Subject: x\r\n\r\nbody\r\n"))
    assert result.outcome == "found" and result.score == 1000.0 and result.required == 5.0
    assert result.rules == ("GTUBE", "NO_RECEIVED", "NO_RELAYS")
    assert srv.received[0] == b"SYMBOLS SPAMC/1.5\r\nContent-length: 20\r\n\r\nSubject: x\r\n\r\nbody\r\n"


@pytest.mark.parametrize("reply, detail", [
    (b"SPAMD/1.1 76 Bad header line\r\n\r\n", "protocol"),
    (b"HTTP/1.0 200 OK\r\n\r\n", "protocol"),
    (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\n\r\n", "protocol"),
    (b"", "protocol"),
])
def test_spamd_garbage_is_an_error(tmp_path, reply, detail):
    srv = FakeServer(tmp_path, spamd_behave(reply))
    result = spamd_scanner(srv.path).scan(spool_of(b"x"))
    assert result.outcome == "error" and result.detail.startswith(detail)


def test_spamd_oversize_skip_or_truncate(tmp_path):
    srv = FakeServer(tmp_path, spamd_behave(SPAMD_GTUBE))
    big = spool_of(b"y" * 5000)
    assert spamd_scanner(srv.path, size_limit=1000).scan(big).outcome == "skipped"
    assert srv.received == []
    assert spamd_scanner(srv.path, size_limit=1000, action="truncate").scan(big).outcome == "found"
    assert srv.received[0].endswith(b"\r\n\r\n" + b"y" * 1000) and b"Content-length: 1000" in srv.received[0]


def test_spamd_hang_times_out(tmp_path):
    srv = FakeServer(tmp_path, lambda s, c: (s.read_all(c), time.sleep(5)))
    result = spamd_scanner(srv.path, timeout=0.5).scan(spool_of(b"x"))
    assert result.outcome == "error" and result.detail.startswith("timeout")


@pytest.mark.parametrize("reply, learned", [
    (b"SPAMD/1.1 0 EX_OK\r\nDidSet: local\r\n\r\n", True),
    (b"SPAMD/1.1 0 EX_OK\r\n\r\n", False),            # learned before: nothing set
])
def test_spamd_tell(tmp_path, reply, learned):
    srv = FakeServer(tmp_path, spamd_behave(reply))
    assert spamd_scanner(srv.path).tell(b"Subject: x\r\n\r\nbuy\r\n", "spam") is learned
    assert srv.received[0] == (b"TELL SPAMC/1.5\r\nMessage-class: spam\r\nSet: local\r\nContent-length: 19\r\n\r\n"
                               b"Subject: x\r\n\r\nbuy\r\n")


def test_spamd_tell_refused_says_why(tmp_path):
    srv = FakeServer(tmp_path, spamd_behave(
        b"SPAMD/1.0 69 Service Unavailable: TELL commands are not enabled, set the --allow-tell switch.\r\n"))
    with pytest.raises(S.EngineError, match="69: Service Unavailable: TELL commands are not enabled"):
        spamd_scanner(srv.path).tell(b"x", "ham")
    with pytest.raises(S.EngineError, match="over spamd_size_limit"):
        spamd_scanner(srv.path, size_limit=10).tell(b"x" * 11, "ham")
