"""Self-check of tools/stack.py: the test stack itself, wired to a trivial milter instead of scanmilter."""
import base64
import email.utils
import hashlib
import shutil
import socket
import struct
import sys
import time

import pytest

import procs
import stack as stacklib
from conftest import ROOT, new_stack
from scanmilter.config import toml_value
from support import GTUBE

TRIVIAL_MILTER = ROOT / "tools" / "trivial_milter.py"


def test_eicar_is_built_at_run_time():
    assert hashlib.md5(stacklib.eicar()).hexdigest() == "44d88612fea8a8f36de82e1278abb02f"


def test_toml_values():
    """The stack writes scanmilter's settings with the product's own toml_value."""
    assert stacklib.toml_value is toml_value
    assert [toml_value(v) for v in (True, 3, 0.5, 'a"b')] == ["true", "3", "0.5", '"a\\"b"']


def test_postfix_retries_deferred_mail_only_once_its_smtp_client_let_go():
    """A deferred message is due again minimal_backoff_time later (whole seconds), and qmgr takes up
    files due within the next second. At 1s it could take one up while the smtp client that
    deferred it still held it: Postfix then parked it in the incoming queue until new mail or
    qmgr's 300 s wakeup (test_e2e_pg's tempfailed mail waited past its 90 s for that)."""
    main = dict(line.split(" = ", 1) for line in stacklib.POSTFIX_MAIN_CF.splitlines() if " = " in line)
    seconds = {name: int(main[name].removesuffix("s"))
               for name in ("queue_run_delay", "minimal_backoff_time", "maximal_backoff_time")}
    # at least a second between the deferral and the earliest retry: backoff - 1 (whole seconds) - 1 (slack)
    assert seconds["minimal_backoff_time"] - 2 >= 1, seconds
    assert seconds["queue_run_delay"] <= seconds["minimal_backoff_time"] <= seconds["maximal_backoff_time"], seconds


def test_parse_sink_dump(tmp_path):
    dump = tmp_path / "20260101000000.abcd"
    dump.write_bytes(b"X-Client-Addr: 127.0.0.1\nX-Client-Proto: ESMTP\nX-Mail-Args: <a@x.test> SIZE=9\n"
                     b"X-Rcpt-Args: <b@example.com> ORCPT=rfc822;b@example.com\nX-Rcpt-Args: <c@example.com>\n"
                     b"Received: from h ([127.0.0.1])\n\tby smtp-sink (smtp-sink) with ESMTP id abcd;\n"
                     b"\tThu, 1 Jan 2026 00:00:00 +0000 (UTC)\nSubject: hi\n\nbody\n\n")
    d = stacklib.parse_dump(dump)
    assert (d.sender, d.recipients, d.data) == ("a@x.test", ["b@example.com", "c@example.com"],
                                                b"Subject: hi\n\nbody\n")


@pytest.mark.integration
def test_stack_end_to_end_with_a_trivial_milter():
    pytest.importorskip("Milter")
    s = new_stack("stack", milter_cmd=[sys.executable, str(TRIVIAL_MILTER), "{socket}"])
    msg = b"From: a@outside.test\r\nTo: b@example.com\r\nSubject: hello\r\n\r\nbody\r\n.dot\r\n"
    try:
        s.start()
        assert s.send(msg, "a@outside.test", ["b@example.com"], xclient_addr="203.0.113.7")["code"] == 250
        r = s.send(msg, "a@outside.test", ["x@elsewhere.test"], xclient_addr="203.0.113.7")
        assert (r["code"], r["stage"]) == (554, "rcpt") and "Relay access denied" in r["reply"]
        [d] = s.wait_delivered(1)
        assert d.recipients == ["b@example.com"] and b"X-Trivial-Milter: seen" in d.data
        assert d.data.endswith(b"body\n.dot\n")
        # clamd finds EICAR in a MIME attachment; spamd scores GTUBE ~1000, our test rule 8, ham ~0
        mime = (b"From: a@outside.test\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=B\n\n--B\nContent-Type: application/octet-stream\n"
                b"Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(stacklib.eicar()) + b"--B--\n")
        reply = procs.chat(s.clamd_socket, b"zINSTREAM\0" + struct.pack("!L", len(mime)) + mime + b"\0" * 4)
        assert reply == b"stream: Eicar-Test-Signature.UNOFFICIAL FOUND\0"
        for subject, text, low, high in (("scanmilter-tag-test", "hello", 5, 15), ("hello", GTUBE, 900, 1100),
                                         ("hello", "hello", -2, 2)):
            body = (f"From: a@outside.test\r\nTo: b@example.com\r\nSubject: {subject}\r\n"
                    f"Date: {email.utils.formatdate()}\r\nMessage-ID: <{time.time()}@outside.test>\r\n"
                    f"\r\n{text}, a few words of ordinary text\r\n").encode()
            reply = procs.chat(s.spamd_port, b"CHECK SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(body) + body)
            score = float(reply.split(b"; ")[1].split(b" /")[0])
            assert low < score < high, reply
        s.stop_service("sink")      # mail waits in the queue, then arrives after the sink is back
        assert s.send(msg, "a@outside.test", ["c@example.com"])["code"] == 250
        s.start_service("sink")
        s.flush()
        assert len(s.wait_delivered(2)) == 2
    finally:
        s.stop()
    assert all(not alive for pids in s.status().values() for _, alive in pids)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", s.smtp_port), timeout=1)
    shutil.rmtree(s.root, ignore_errors=True)
