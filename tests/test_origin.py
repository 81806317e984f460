"""The Received line spamd sees in front of the message, built from what Postfix told the milter."""
import email
import email.policy
import re

from scanmilter.scanners import Origin, Submission
from scanmilter.scanners.spamd import _Prefixed, received_line
from scanmilter.message import Spool


def test_the_line_reads_like_postfixs_own():
    line = received_line(Origin("203.0.113.7", "mail.outside.test", "client.test", "", False, "mx.example.com",
                                "4Xk2Lz1F3z")).decode()
    assert re.fullmatch(r"Received: from client\.test \(mail\.outside\.test \[203\.0\.113\.7\]\)\r\n"
                        r"\tby mx\.example\.com \(Postfix\) with ESMTP id 4Xk2Lz1F3z;\r\n\t[A-Z][a-z]{2}, .+\r\n",
                        line), line


def test_authentication_and_tls_are_shown_the_way_spamassassin_reads_them():
    line = received_line(Origin("203.0.113.7", "unknown", "laptop", "alice", True, "mx.example.com", "Q1")).decode()
    assert "(unknown [203.0.113.7])\r\n\t(Authenticated sender: alice)\r\n\tby mx.example.com (Postfix) with ESMTPSA" \
        in line
    assert " with ESMTPA " in received_line(Origin("192.0.2.1", "n", "h", "bob", False, "mx", "Q")).decode()


def test_hostile_names_cannot_break_the_line_or_mislead_the_parser():
    evil = "x\r\nX-Spam-Flag: NO (by evil [1.2.3.4]) \udce9"
    line = received_line(Origin("203.0.113.7", evil, evil, evil, False, "mx", evil)).decode()
    word = r"[A-Za-z0-9._:@+=-]+"
    assert re.fullmatch(rf"Received: from {word} \({word} \[203\.0\.113\.7\]\)\r\n\t\(Authenticated sender: "
                        rf"{word}\)\r\n\tby mx \(Postfix\) with ESMTPA id {word};\r\n\t[^\r\n]+\r\n", line), line
    head = email.message_from_bytes(line.encode() + b"\r\n", policy=email.policy.compat32)
    assert len(head.get_all("Received")) == 1 and len(head.keys()) == 1


def test_ipv6_clients_and_unknown_addresses():
    assert b"[IPv6:2001:db8::1]" in received_line(Origin("2001:db8::1", "n", "h", "", False, "mx", "Q"))
    assert received_line(Origin("", "n", "h", "", False, "mx", "Q")) == b""
    assert received_line(Origin("not-an-ip", "n", "h", "", False, "mx", "Q")) == b""


def test_a_submission_reads_like_its_spool_and_the_prefix_comes_first():
    spool = Spool(100, 1000)
    spool.write(b"Subject: x\r\n\r\nbody\r\n")
    sub = Submission(spool, Origin("192.0.2.1"))
    assert sub.stored == spool.stored and not sub.oversize and sub.origin.client_address == "192.0.2.1"
    with _Prefixed(b"Received: a\r\n", sub.reader()) as r:
        data = b"".join(iter(lambda: r.read(5), b""))
    assert data == b"Received: a\r\nSubject: x\r\n\r\nbody\r\n"


def test_a_client_without_a_name_is_unknown_as_in_postfixs_own_line():
    for name in ("[203.0.113.9]", "", "unknown", "[IPv6:2001:db8::9]"):
        line = received_line(Origin("203.0.113.9", name, "helo.test", "", False, "mx", "Q")).decode()
        assert line.startswith("Received: from helo.test (unknown [203.0.113.9])\r\n"), line
