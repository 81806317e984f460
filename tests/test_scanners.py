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
    (b"stream: OK", "error", "protocol"),                 # cut short: no NUL terminator
    (b"/etc/passwd: Eicar-Test-Signature FOUND\0", "error", "protocol"),  # not an answer about the stream
    # AlertExceedsMax: clamd stopped at one of its own limits, it found no virus
    (b"stream: Heuristics.Limits.Exceeded.MaxFileSize FOUND\0", "skipped", "limits"),
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


def dribble(reply, pause=0.5):
    """Send `reply` one byte at a time, `pause` seconds apart."""
    def send(conn):
        for i in range(len(reply)):
            conn.sendall(reply[i:i + 1])
            time.sleep(pause)
    return send


def test_clamd_that_dribbles_its_answer_times_out_in_time(tmp_path):
    """Each byte comes before a per-receive timeout would pass: only a deadline over the whole
    answer stops it (one byte every 0.5 s once stretched a 1 s timeout to 6 s, and then said OK)."""
    srv = FakeServer(tmp_path, lambda s, c: (s.read_all(c, until=instream_done), dribble(b"stream: OK\0")(c)))
    start = time.monotonic()
    result = clamd_scanner(srv.path, timeout=1.0).scan(spool_of(b"hello"))
    took = time.monotonic() - start
    assert result.outcome == "error" and result.detail.startswith("timeout"), result
    assert took < 1.0 + 1, took


def test_clamd_command_that_dribbles_times_out_in_time(tmp_path):
    srv = FakeServer(tmp_path, lambda s, c: (c.recv(100), dribble(b"PONG\0")(c)))
    start = time.monotonic()
    said = clamd_scanner(srv.path, timeout=1.0).ping()
    took = time.monotonic() - start
    assert said and "PONG" not in said, said
    assert took < 1.0 + 1, took


def test_clamd_answer_in_pieces_is_read_whole(tmp_path):
    srv = FakeServer(tmp_path, lambda s, c: (c.recv(100), dribble(b"PONG\0", pause=0.05)(c)))
    assert clamd_scanner(srv.path, timeout=2.0).ping() == ""


def test_clamd_endless_answer_is_a_protocol_error(tmp_path):
    def endless(srv, conn):
        srv.read_all(conn, until=instream_done)
        while True:
            conn.sendall(b"stream: " + b"A" * 65536)
    srv = FakeServer(tmp_path, endless)
    result = clamd_scanner(srv.path, timeout=5.0).scan(spool_of(b"hello"))
    assert result.outcome == "error" and result.detail.startswith("protocol"), result
    assert result.seconds < 5.0


@pytest.mark.parametrize("name", ["Heuristics.Limits.Exceeded", "Heuristics.Limits.Exceeded.MaxFileSize",
                                  "Heuristics.Limits.Exceeded.MaxScanSize", "Heuristics.Limits.Exceeded.MaxRecursion",
                                  "Heuristics.Limits.Exceeded.MaxFiles", "Heuristics.Limits.Exceeded.MaxScanTime"])
def test_clamd_limit_alerts_are_skipped_scans_not_viruses(name):
    result = C.parse_reply(f"stream: {name} FOUND")
    assert (result.outcome, result.detail, result.viruses) == ("skipped", "limits", ())


@pytest.mark.parametrize("name", ["Heuristics.Limits.ExceededX", "Heuristics.Limits.Exceeded.MaxFileSize.UNOFFICIAL",
                                  "Heuristics.Limits", "Win.Heuristics.Limits.Exceeded", "Heuristics.Phishing.Email"])
def test_other_signatures_are_viruses(name):
    result = C.parse_reply(f"stream: {name} FOUND")
    assert (result.outcome, result.viruses) == ("found", (name,))


def test_clamd_down_is_refused(tmp_path):
    result = clamd_scanner(str(tmp_path / "none.sock")).scan(spool_of(b"hello"))
    assert result.outcome == "error" and result.detail.startswith("refused")


def test_clamd_skips_over_its_size_limit(tmp_path):
    result = clamd_scanner(str(tmp_path / "none.sock"), size_limit=3).scan(spool_of(b"hello"))
    assert (result.outcome, result.detail) == ("skipped", "size")


def symbols_reply(spam=b"True ; 1000.0 / 5.0", body=b"GTUBE,NO_RECEIVED,NO_RELAYS", length=None):
    """A reply to SYMBOLS as spamd 4.0 writes it to a SPAMC/1.5 client."""
    length = len(body) if length is None else length
    return b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: %s\r\n\r\n%s" % (length, spam, body)


SPAMD_GTUBE = symbols_reply()


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
    # the body is not what Content-length announced
    (symbols_reply(length=25), "protocol: spamd reply body of 27 bytes"),
    (symbols_reply(length=99), "protocol: spamd reply body of 27 bytes"),
    (symbols_reply(body=b"GTUBE,NO_RECEIVED,NO_RELAYS\r\n", length=27), "protocol: spamd reply body of 29"),
    # no Content-length, or two of it, or of the Spam header
    (b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 1000.0 / 5.0\r\n\r\nGTUBE", "protocol: spamd reply without"),
    (symbols_reply(spam=b"False ; 0.0 / 5.0\r\nContent-length: 27"), "protocol: spamd reply header"),
    (symbols_reply(spam=b"False ; 0.0 / 5.0\r\nSpam: True ; 1000.0 / 5.0"), "protocol: spamd reply header"),
    (symbols_reply(spam=b"False ; 0.0 / 5.0\r\nnot a header line"), "protocol: spamd reply header"),
    (symbols_reply(spam=b"Maybe ; 0.0 / 5.0"), "protocol: spamd reply without a Spam header"),
    (symbols_reply(spam=b"False ; 0.0 / 5.0 and more"), "protocol: spamd reply without a Spam header"),
    # anything but a comma-separated list of SpamAssassin rule names
    (symbols_reply(body=b"GTUBE,,NO_RELAYS"), "protocol: spamd reply names a rule"),
    (symbols_reply(body=b"GTUBE,"), "protocol: spamd reply names a rule"),
    (symbols_reply(body=b"GTUBE, NO_RELAYS"), "protocol: spamd reply names a rule"),
    (symbols_reply(body=b"GTUBE,NO-RELAYS"), "protocol: spamd reply names a rule"),
    (symbols_reply(body=b"GTUBE,1ST_RULE"), "protocol: spamd reply names a rule"),
    (symbols_reply(body=b"GTUBE,<script>"), "protocol: spamd reply names a rule"),
    (symbols_reply(body=b"GTUBE," + b"R" * 129), "protocol: spamd reply names a rule"),
])
def test_spamd_garbage_is_an_error(tmp_path, reply, detail):
    srv = FakeServer(tmp_path, spamd_behave(reply))
    result = spamd_scanner(srv.path).scan(spool_of(b"x"))
    assert result.outcome == "error" and result.detail.startswith(detail)


@pytest.mark.parametrize("reply, outcome, score, rules", [
    (symbols_reply(spam=b"False ; 1.2 / 5.0", body=b"RULE_A,RULE_B"), "clean", 1.2, ("RULE_A", "RULE_B")),
    (symbols_reply(spam=b"False ; -0.1 / 5.0", body=b""), "clean", -0.1, ()),      # no rule hit
    (symbols_reply(spam=b"True ; 8.0 / 5.0", body=b"_X," + b"R" * 128), "found", 8.0, ("_X", "R" * 128)),
    (symbols_reply(spam=b"False ; 0.0 / 5.0").replace(b"Content-length", b"content-LENGTH"), "clean", 0.0,
     ("GTUBE", "NO_RECEIVED", "NO_RELAYS")),
])
def test_spamd_well_formed_replies(tmp_path, reply, outcome, score, rules):
    srv = FakeServer(tmp_path, spamd_behave(reply))
    result = spamd_scanner(srv.path).scan(spool_of(b"x"))
    assert (result.outcome, result.score, result.required, result.rules) == (outcome, score, 5.0, rules)


def test_spamd_endless_reply_is_a_protocol_error_not_clean(tmp_path):
    """An endless SYMBOLS reply was once cut at REPLY_LIMIT and taken as clean with 42,382 rules."""
    def endless(srv, conn):
        srv.read_all(conn)
        conn.sendall(symbols_reply(spam=b"False ; 0.0 / 5.0", body=b"", length=10 ** 8))
        while True:
            conn.sendall(b"RULE_A," * 10000)
    srv = FakeServer(tmp_path, endless)
    result = spamd_scanner(srv.path, timeout=5.0).scan(spool_of(b"x"))
    assert result.outcome == "error" and result.detail.startswith(f"protocol: spamd reply over {S.REPLY_LIMIT}"), \
        result.detail
    assert result.seconds < 5.0


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
