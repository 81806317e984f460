"""rspamd as the spam engine: the /checkv2 request and reply parser, the controller client
(learning), faults against fake HTTP servers, and what the rest of scanmilter makes of
rspamd's facts (policy, headers, the engine table). The real rspamd: test_e2e_rspamd.py."""
import json
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fakes import Engine, Server, feed, handler
from support import parsed_or_protocol_error
from scanmilter import config, headers as H, policy as P, policyfile, scanners
from scanmilter.message import Spool
from scanmilter.scanners import CLEAN, FOUND, EngineError, Origin, ScanResult, Submission, rspamd as R
from scanmilter.verdict import combine

HAM_REPLY = {"is_skipped": False, "score": 3.7, "required_score": 15.0, "action": "no action",
             "symbols": {"MISSING_MID": {"name": "MISSING_MID", "score": 2.5, "metric_score": 2.5},
                         "MIME_GOOD": {"name": "MIME_GOOD", "score": -0.1, "options": ["text/plain"]}},
             "messages": {}, "message-id": "undef", "time_real": 0.001}
# what rspamd 3.4 answers for GTUBE (taken from the real one)
GTUBE_REPLY = {"is_skipped": True, "score": 15.0, "required_score": 15.0, "action": "reject",
               "symbols": {"GTUBE": {"name": "GTUBE", "score": 0.0, "metric_score": 0.0}},
               "messages": {"smtp_message": "Gtube pattern"}, "message-id": "undef", "time_real": 0.06}


def spool_of(data: bytes, memory_limit=1 << 20):
    s = Spool(memory_limit, 1 << 30)
    s.write(data)
    return s


def origin(**kw):
    base = dict(client_address="192.0.2.7", client_name="mail.example.net", helo="helo.example.net",
                auth_user="alice", hostname="mx.example.com", queue_id="4XQID1", sender="a@example.org",
                recipients=("u@example.com", "v@example.com"), direction="inbound")
    return Origin(**{**base, **kw})


# ------------------------------------------------------------------ a fake rspamd over HTTP
def read_request(conn) -> tuple[bytes, bytes]:
    """One HTTP request: (head, body of Content-Length bytes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data, b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), b"0"))
    while len(body) < length:
        body += conn.recv(65536)
    return head, body


def http(status: int, body: bytes, reason=b"OK") -> bytes:
    return b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\nContent-Type: application/json\r\n\r\n%s" % (
        status, reason, len(body), body)


class FakeRspamd:
    """Answers each request on a connection with `answer(head, body)` (bytes), keep-alive."""

    def __init__(self, tmp_path, answer, unix=True):
        self.answer, self.requests, self.connections = answer, [], 0
        port = None if unix else _free_port()
        self.server = Server(self._serve, unix_path=tmp_path / "rspamd.sock" if unix else None, port=port)
        self.address = ("unix", str(tmp_path / "rspamd.sock")) if unix else ("inet", ("127.0.0.1", port))

    def _serve(self, server, conn):
        self.connections += 1
        with conn:
            conn.settimeout(10)
            while True:
                head, body = read_request(conn)
                if not head:
                    return
                self.requests.append((head, body))
                reply = self.answer(head, body)
                if reply is None:
                    return
                conn.sendall(reply)

    def close(self):
        self.server.close()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake(tmp_path):
    made = []

    def make(answer, unix=True):
        f = FakeRspamd(tmp_path, answer, unix)
        made.append(f)
        return f
    yield make
    for f in made:
        f.close()


def scanner(address, timeout=2.0, size_limit=1 << 20, **kw):
    return R.RspamdScanner(address, 1.0, timeout, size_limit, **kw)


def header_values(head: bytes, name: bytes) -> list[bytes]:
    return [line.partition(b":")[2].strip() for line in head.split(b"\r\n")[1:]
            if line.partition(b":")[0].lower() == name.lower()]


# ------------------------------------------------------------------ the request
@pytest.mark.parametrize("unix", [True, False])
def test_request_carries_the_client_envelope_and_direction_as_rspamds_milter_does(fake, unix):
    f = fake(lambda head, body: http(200, json.dumps(HAM_REPLY).encode()), unix=unix)
    message = b"Subject: hi\r\n\r\nhello\r\n"
    result = scanner(f.address).scan(Submission(spool_of(message), origin()))
    assert result.outcome == CLEAN, result
    head, body = f.requests[0]
    assert head.startswith(b"POST /checkv2 HTTP/1.1\r\n")
    assert body == message
    expected = {b"IP": [b"192.0.2.7"], b"Helo": [b"helo.example.net"], b"Hostname": [b"mail.example.net"],
                b"From": [b"<a@example.org>"], b"Rcpt": [b"<u@example.com>", b"<v@example.com>"],
                b"Queue-Id": [b"4XQID1"], b"User": [b"alice"], b"Settings-ID": [b"inbound"],
                b"Content-Length": [b"%d" % len(message)]}
    for name, values in expected.items():
        assert header_values(head, name) == values, (name, head)
    assert not header_values(head, b"Transfer-Encoding")


def test_hostile_client_values_cannot_add_request_headers(fake):
    f = fake(lambda head, body: http(200, json.dumps(HAM_REPLY).encode()))
    evil = origin(helo="x\r\nSettings-ID: outbound", sender="a@b\r\nUser: root", client_name="[192.0.2.7]",
                  auth_user="", direction="outbound")
    assert scanner(f.address).scan(Submission(spool_of(b"\r\nx"), evil)).outcome == CLEAN
    head, _ = f.requests[0]
    assert header_values(head, b"Settings-ID") == [b"outbound"]
    assert header_values(head, b"User") == []
    assert header_values(head, b"Hostname") == []       # Postfix's "[ADDR]": no verified name
    assert header_values(head, b"Helo") == [b"x__Settings-ID:_outbound"]


def test_null_sender_is_sent_as_empty_brackets(fake):
    f = fake(lambda head, body: http(200, json.dumps(HAM_REPLY).encode()))
    scanner(f.address).scan(Submission(spool_of(b"\r\nx"), origin(sender="")))
    assert header_values(f.requests[0][0], b"From") == [b"<>"]


def test_message_on_disk_is_streamed_in_pieces_not_read_whole(fake, monkeypatch):
    f = fake(lambda head, body: http(200, json.dumps(HAM_REPLY).encode()))
    message = b"Subject: big\r\n\r\n" + b"x" * (3 * R.CHUNK + 5)
    spool = spool_of(message, memory_limit=1024)
    assert spool.on_disk
    reads = []
    original = R._Body.read

    def read(self, n=-1):
        data = original(self, n)
        reads.append(len(data))
        return data
    monkeypatch.setattr(R._Body, "read", read)
    assert scanner(f.address).scan(Submission(spool, origin())).outcome == CLEAN
    assert f.requests[0][1] == message
    assert max(reads) < len(message) and sum(reads) == len(message)


def test_connections_are_kept_alive_between_scans(fake):
    f = fake(lambda head, body: http(200, json.dumps(HAM_REPLY).encode()))
    s = scanner(f.address)
    for _ in range(3):
        assert s.scan(Submission(spool_of(b"\r\nx"), origin())).outcome == CLEAN
    assert len(f.requests) == 3 and f.connections == 1


def test_no_hidden_retry_when_rspamd_drops_the_connection(fake):
    f = fake(lambda head, body: None)        # reads the request, closes without an answer
    result = scanner(f.address).scan(Submission(spool_of(b"\r\nx"), origin()))
    assert result.outcome == "error", result
    assert len(f.requests) == 1 and f.connections == 1


def test_over_size_limit_is_skipped_unsent(fake):
    f = fake(lambda head, body: http(200, json.dumps(HAM_REPLY).encode()))
    result = scanner(f.address, size_limit=10).scan(Submission(spool_of(b"\r\n" + b"x" * 20), origin()))
    assert (result.outcome, result.detail) == ("skipped", "size") and not f.requests


# ------------------------------------------------------------------ faults
def test_rspamd_down_is_refused(tmp_path):
    result = scanner(("unix", str(tmp_path / "none.sock"))).scan(spool_of(b"\r\nx"))
    assert result.outcome == "error" and result.detail.startswith("refused"), result


def test_rspamd_down_on_tcp_is_refused():
    result = scanner(("inet", ("127.0.0.1", _free_port()))).scan(spool_of(b"\r\nx"))
    assert result.outcome == "error" and result.detail.startswith("refused"), result


def test_rspamd_hanging_times_out_within_the_deadline(fake):
    release = threading.Event()
    f = fake(lambda head, body: release.wait(30) and None)
    start = time.monotonic()
    result = scanner(f.address, timeout=0.5).scan(spool_of(b"\r\nx"))
    release.set()
    assert result.outcome == "error" and result.detail.startswith("timeout"), result
    assert time.monotonic() - start < 2.0


def test_rspamd_dribbling_its_answer_times_out_in_time(fake):
    f = fake(lambda head, body: None)

    def serve(server, conn):       # an answer one byte every 0.2 s: each read is in time, the whole is not
        read_request(conn)
        reply = http(200, json.dumps(HAM_REPLY).encode())
        try:
            for i in range(len(reply)):
                conn.sendall(reply[i:i + 1])
                time.sleep(0.2)
        except OSError:
            pass
    f.server.behave = serve
    start = time.monotonic()
    result = scanner(f.address, timeout=1.0).scan(spool_of(b"\r\nx"))
    assert result.outcome == "error" and result.detail.startswith("timeout"), result
    assert time.monotonic() - start < 2.5


@pytest.mark.parametrize("reply, words", [
    (http(500, b'{"error": "internal trouble"}', b"Internal Server Error"), "HTTP 500: internal trouble"),
    (http(200, b"\x00\xffnot json"), "not JSON"),
    (http(200, b"[1, 2]"), "not a JSON object"),
    (b"HELLO? 42 what\r\n\r\n", ""),
    (http(200, b'{"score": 1.0, "required_score": 15, "action": "no action"}'), "without 'symbols'"),
])
def test_rspamd_errors_and_garbage_are_protocol_errors_never_clean(fake, reply, words):
    f = fake(lambda head, body: reply)
    result = scanner(f.address).scan(spool_of(b"\r\nx"))
    assert result.outcome == "error" and result.detail.startswith("protocol"), result
    assert words in result.detail


def test_endless_reply_is_a_protocol_error(fake):
    big = json.dumps({**HAM_REPLY, "pad": "x" * (R.REPLY_LIMIT + 10)}).encode()
    f = fake(lambda head, body: http(200, big))
    result = scanner(f.address).scan(spool_of(b"\r\nx"))
    assert result.outcome == "error" and "over" in result.detail, result


def test_ping(fake, tmp_path):
    f = fake(lambda head, body: b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\npong\n")
    assert scanner(f.address).ping() == ""
    assert scanner(("unix", str(tmp_path / "none.sock"))).ping() != ""


# ------------------------------------------------------------------ the reply parser
def test_ham_reply():
    r = R.parse_reply(json.dumps(HAM_REPLY).encode())
    assert (r.engine, r.outcome, r.score, r.required) == ("rspamd", CLEAN, 3.7, 15.0)
    assert r.rules == ("MISSING_MID", "MIME_GOOD") and r.rule_scores == (2.5, -0.1)
    assert r.action == "" and r.viruses == ()


def test_gtube_reply_stopped_early_keeps_its_score_and_action():
    r = R.parse_reply(json.dumps(GTUBE_REPLY).encode(), follow_action=True)
    assert (r.outcome, r.score, r.rules, r.action) == (FOUND, 15.0, ("GTUBE",), "reject")


def test_antivirus_symbols_are_viruses():
    reply = {**HAM_REPLY, "symbols": {"CLAM_VIRUS": {"name": "CLAM_VIRUS", "score": 8.0,
                                                     "options": ["Eicar-Test-Signature"]}}}
    r = R.parse_reply(json.dumps(reply).encode(), virus_symbols=("CLAM_VIRUS",))
    assert r.outcome == FOUND and r.viruses == ("Eicar-Test-Signature",)


@pytest.mark.parametrize("change", [
    {"score": True}, {"score": "1.0"}, {"score": None}, {"required_score": []}, {"action": "accept"},
    {"action": None}, {"symbols": []}, {"symbols": {"BAD NAME\r\n": {"score": 1}}},
    {"symbols": {"X": {"name": "X"}}}, {"symbols": {"X": 1}},
    {"symbols": {"CLAM_VIRUS": {"score": 1, "options": "Eicar"}}},
])
def test_malformed_replies_are_protocol_errors(change):
    with pytest.raises(EngineError) as e:
        R.parse_reply(json.dumps({**HAM_REPLY, **change}).encode())
    assert e.value.kind == "protocol"


@pytest.mark.parametrize("body", [b'{"score": NaN, "required_score": 1, "action": "reject", "symbols": {}}',
                                  b'{"score": 1e999, "required_score": 1, "action": "reject", "symbols": {}}',
                                  b"[" * 100000, b""])
def test_non_numbers_and_deep_nesting_are_protocol_errors(body):
    with pytest.raises(EngineError):
        R.parse_reply(body)


rspamd_like = st.one_of(
    st.binary(max_size=300),
    st.fixed_dictionaries({}, optional={
        "score": st.one_of(st.floats(allow_nan=True), st.booleans(), st.text(max_size=5), st.none()),
        "required_score": st.one_of(st.floats(), st.integers()),
        "action": st.one_of(st.sampled_from(R.ACTIONS), st.text(max_size=10)),
        "is_skipped": st.booleans(),
        "symbols": st.one_of(st.dictionaries(st.text(max_size=12), st.one_of(
            st.fixed_dictionaries({"score": st.floats()}, optional={"options": st.lists(st.text(max_size=8))}),
            st.integers())), st.lists(st.integers()))}).map(lambda d: json.dumps(d).encode()))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rspamd_like)
def test_parser_returns_a_result_or_a_protocol_error(body):
    r = parsed_or_protocol_error(R.parse_reply, body)
    if r is None:
        return
    assert r.outcome in (CLEAN, FOUND) and r.score is not None and r.required is not None
    assert all(R._SYMBOL.fullmatch(name) for name in r.rules)


# ------------------------------------------------------------------ learning through the controller
def test_controller_learns_with_its_password(fake):
    f = fake(lambda head, body: http(200, b'{"success":true}'))
    c = R.RspamdController(f.address, "s3cret", 2.0)
    assert c.tell(b"Subject: x\r\n\r\nspam\r\n", "spam") is True
    head, body = f.requests[0]
    assert head.startswith(b"POST /learnspam ") and header_values(head, b"Password") == [b"s3cret"]
    assert body == b"Subject: x\r\n\r\nspam\r\n"
    c.tell(b"x", "ham")
    assert f.requests[1][0].startswith(b"POST /learnham ")


def test_controller_already_learned_is_not_an_error(fake):
    f = fake(lambda head, body: http(208, b'{"error":"<x> has been already learned as spam, ignore it"}'))
    assert R.RspamdController(f.address, "", 2.0).tell(b"x", "spam") is False


@pytest.mark.parametrize("reply, words", [
    (http(403, b'{"error":"Unauthorized"}', b"Forbidden"), "HTTP 403: Unauthorized"),
    (http(200, b'{"success":false}'), "did not say success"),
    (http(200, b"garbage"), "did not say success"),
])
def test_controller_errors_say_why(fake, reply, words):
    f = fake(lambda head, body: reply)
    with pytest.raises(EngineError) as e:
        R.RspamdController(f.address, "", 2.0).tell(b"x", "ham")
    assert words in str(e.value)


def test_controller_down_and_unreadable_password_are_errors(tmp_path):
    with pytest.raises(EngineError):
        R.RspamdController(("unix", str(tmp_path / "none.sock")), "", 1.0).tell(b"x", "ham")
    cfg = config.parse(config.DAEMON_SETTINGS, {"rspamd_password_file": str(tmp_path / "missing")}, "t")
    with pytest.raises(EngineError) as e:
        R.controller_from_settings(cfg)
    assert "rspamd_password_file" in str(e.value)


# ------------------------------------------------------------------ the engine table and settings
def test_spam_engine_setting_chooses_the_engine():
    names = [e.name for e in scanners.from_settings(config.parse(config.DAEMON_SETTINGS, {}, "t"))]
    assert names == ["spamd", "clamd", "files"]
    cfg = config.parse(config.DAEMON_SETTINGS, {"spam_engine": "rspamd", "rspamd_socket": "unix:/r.sock"}, "t")
    engines = scanners.from_settings(cfg)
    assert [e.name for e in engines] == ["rspamd", "clamd", "files"] and engines[0].address == ("unix", "/r.sock")
    with pytest.raises(config.ConfigError):
        config.parse(config.DAEMON_SETTINGS, {"spam_engine": "bogofilter"}, "t")


# ------------------------------------------------------------------ policy and headers from rspamd's facts
def decide(results, **inbound):
    pol = policyfile.load("")
    pol = __import__("dataclasses").replace(
        pol, directions={**pol.directions, "inbound": {**pol.directions["inbound"], **inbound}})
    env = P.Envelope("192.0.2.7", sender="a@example.org", recipients=("u@example.com",))
    verdict = combine(results)
    return verdict, P.decide(verdict, env, pol)


def rs(score, action="", rules=("R1",), outcome=CLEAN):
    return ScanResult("rspamd", outcome, score=score, required=15.0, rules=rules, rule_scores=(1.0,) * len(rules),
                      action=action)


def test_our_levels_decide_on_rspamds_score():
    assert decide([rs(16.0), ScanResult("clamd", CLEAN)])[1].action == P.REJECT
    assert decide([rs(2.0, rules=("MIME_GOOD",))])[1].action == P.ACCEPT
    assert decide([rs(9.0)], tag_level="spamd", subject_tag_level="spamd")[1].recipients[0].reason == "ham"  # < 15


@pytest.mark.parametrize("action, outcome, reason", [
    ("reject", P.REJECT, "spam"), ("soft reject", P.TEMPFAIL, "spam"), ("greylist", P.TEMPFAIL, "spam"),
    ("add header", P.ACCEPT, "tagged"), ("rewrite subject", P.ACCEPT, "tagged"), ("no action", P.ACCEPT, "ham"),
])
def test_following_rspamds_action(action, outcome, reason):
    verdict, out = decide([rs(1.0, action=action)])      # a low score: only the action can decide
    assert (out.action, out.recipients[0].reason) == (outcome, reason)
    assert "rspamd action" in out.recipients[0].rule


def test_rspamd_failure_is_a_scan_error():
    _, out = decide([ScanResult("rspamd", "error", "timeout: no answer"), ScanResult("clamd", CLEAN)])
    assert out.action == P.TEMPFAIL and "rspamd timeout" in out.recipients[0].rule


def test_x_spam_status_carries_rspamds_symbols():
    verdict, out = decide([rs(6.0, rules=("MISSING_MID", "FORGED_SENDER")), ScanResult("clamd", CLEAN)])
    status = dict(H.scan_headers(verdict, out))["X-Spam-Status"]
    assert status == "Yes, score=6.0 required=5.0 tests=MISSING_MID,FORGED_SENDER"
    verdict, out = decide([ScanResult("rspamd", "error", "timeout: x"), ScanResult("clamd", CLEAN)],
                          scan_failure_action="accept")
    assert dict(H.scan_headers(verdict, out))["X-Spam-Status"] == "unscanned (timeout)"


def test_handler_gives_the_engine_the_envelope_and_direction():
    seen = []

    class Capture(Engine):
        def scan(self, spool):
            seen.append(spool.origin)
            return self.result
    h = handler(Capture("rspamd", rs(1.0)), Engine("clamd", ScanResult("clamd", CLEAN)))
    feed(h, [("Subject", b"hi")], sender="<a@example.org>", rcpts=("<u@example.com>", "<v@example.com>"))
    o = seen[0]
    assert (o.sender, o.recipients, o.queue_id) == ("a@example.org", ("u@example.com", "v@example.com"), "4XQID1")
    assert o.direction == "inbound" and o.client_address == "192.0.2.1"


def test_allow_listed_mail_is_not_sent_to_rspamd():
    pol = __import__("dataclasses").replace(policyfile.load(""), allow_senders=frozenset({"a@example.org"}))
    env = P.Envelope("192.0.2.7", sender="a@example.org", recipients=("u@example.com",))
    assert P.engines_needed(env, pol, "rspamd") == {"clamd"}
    other = P.Envelope("192.0.2.7", sender="b@example.org", recipients=("u@example.com",))
    assert P.engines_needed(other, pol, "rspamd") == {"clamd", "rspamd"}
