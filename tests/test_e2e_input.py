"""Bad input end to end: CPython's email test corpus and hand-made nasty messages go through real
Postfix and scanmilter. Each is delivered, rejected or tempfailed with a proper reply, and what
reaches the sink has exactly the body that was sent."""
import hashlib
import re
import sysconfig
import uuid
from pathlib import Path

import pytest

from support import GTUBE, OUTSIDE

pytestmark = pytest.mark.integration

CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_email" / "data"
PROPER = {250, 550, 552}      # delivered, rejected; never a tempfail caused by the input itself


@pytest.fixture(scope="module")
def stack(stack_with):
    return stack_with()


def wire(data: bytes) -> bytes:
    """As an SMTP client sends it: CRLF line ends (bare CRs left alone)."""
    return re.sub(rb"\r?\n", b"\r\n", data)


def body(data: bytes) -> bytes:
    """The body of a delivered message (the sink stores LF line ends): after the first empty line."""
    return data.split(b"\n\n", 1)[1] if b"\n\n" in data else b""


_HEADER_LINE = re.compile(rb"[!-9;-~]+:|[ \t]")


def expected_body(sent: bytes) -> bytes:
    """The body Postfix delivers for what was sent, with LF line ends. Postfix's header section
    ends at the first line that is not a header field (an empty line, an mbox "From " line, plain
    text...); it then supplies the empty line itself. Postfix also turns a bare CR into a space,
    with or without a milter (seen with Postfix 3.7, and with smtpd_milters empty); and the data
    always ends with a line end."""
    sent = sent.replace(b"\r\n", b"\n")
    if not sent.endswith(b"\n"):
        sent += b"\n"                 # SMTP ends the data with a line end
    lines = sent.split(b"\n")
    i = 0
    while i < len(lines) and lines[i] and _HEADER_LINE.match(lines[i]):
        i += 1
    rest = lines[i + 1:] if i < len(lines) and lines[i] == b"" else lines[i:]
    return b"\n".join(rest).replace(b"\r", b" ")


def deliveries(stack, marker: bytes, expect: int = 1, timeout: float = 60):
    """Exactly `expect` deliveries containing `marker`, counted once Postfix has nothing left to deliver."""
    import time
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = [d for d in stack.delivered() if marker in d.data]
        if len(found) >= expect:
            stack.wait_drained()
            found = [d for d in stack.delivered() if marker in d.data]
            assert len(found) == expect, f"{marker!r}: {len(found)} deliveries, not {expect}"
            return found
        time.sleep(0.2)
    raise AssertionError(f"{marker!r}: {len(found)} of {expect} deliveries")


def roundtrip(stack, data: bytes, marker: bytes, rcpts=("bob@example.com",), expect_deliveries=1):
    r = stack.send(wire(data), "alice@outside.test", list(rcpts), xclient_addr=OUTSIDE)
    assert r["code"] in PROPER, r
    if r["code"] == 250:
        got = deliveries(stack, marker, expect_deliveries)
        for d in got:
            assert hashlib.sha256(body(d.data)).hexdigest() == hashlib.sha256(expected_body(wire(data))).hexdigest()
        return r, got
    return r, []


def corpus_files():
    files = sorted(CORPUS.glob("msg_*.txt"))
    return files or [pytest.param(None, marks=pytest.mark.skip(reason=f"no email test corpus at {CORPUS}"))]


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name if p else "none")
def test_cpython_email_corpus(stack, path):
    marker = f"X-Corpus-Marker: {uuid.uuid4().hex}\n".encode()
    data = path.read_bytes()
    # a marker header first, so the delivery can be found; the rest is the corpus file as is
    r, got = roundtrip(stack, marker + data, marker.strip())
    assert r["code"] == 250, r            # ordinary mail, however odd: nothing here is spam or a virus


def headers(marker: str, extra: bytes = b"") -> bytes:
    return (f"From: a@outside.test\nTo: bob@example.com\nSubject: nasty {marker}\n"
            f"Message-ID: <{marker}@outside.test>\nDate: Wed, 25 Nov 2026 10:00:00 +0000\n").encode() + extra


NASTY = {
    "nul_bytes": lambda m: headers(m) + b"\nbefore\x00after\nmore\x00\x00\n",
    "bare_cr": lambda m: headers(m) + b"\none\rtwo\rthree\n",
    "eight_bit_headers": lambda m: headers(m, b"X-Latin: caf\xe9 \xfc\xdf\nX-Utf8: caf\xc3\xa9\n") + b"\nbody\n",
    "invalid_utf8_subject": lambda m: headers(m).replace(b"Subject: nasty", b"Subject: \xff\xfe nasty") + b"\nb\n",
    "header_of_100kb": lambda m: headers(m, b"X-Big: " + b"a" * 100_000 + b"\n") + b"\nbody\n",
    "nine_hundred_header_lines": lambda m: headers(m, b"".join(b"X-Many-%d: v\n" % i for i in range(900)))
    + b"\nbody\n",
    "line_of_1mb": lambda m: headers(m) + b"\n" + b"x" * 1_000_000 + b"\nend\n",
    "deeply_nested_mime": lambda m: headers(m, b"MIME-Version: 1.0\n") + _nested(60) + b"\n",
    "empty_body": lambda m: headers(m) + b"\n",
    "forged_verdicts_any_case": lambda m: headers(m, b"x-SPAM-flag: YES\nX-Virus-STATUS:\n clean\n"
                                                    b"X-Quarantine-Released: id=000000000000000000000000, by=x\n")
    + b"\nbody\n",
}


def _nested(depth: int) -> bytes:
    out = b""
    for i in range(depth):
        out += b"Content-Type: multipart/mixed; boundary=\"b%d\"\n\n--b%d\n" % (i, i)
    out += b"Content-Type: text/plain\n\ninnermost\n"
    for i in reversed(range(depth)):
        out += b"--b%d--\n" % i
    return out


@pytest.mark.parametrize("case", sorted(NASTY))
def test_nasty_messages(stack, case):
    marker = uuid.uuid4().hex
    data = NASTY[case](marker)
    r, got = roundtrip(stack, data, marker.encode())
    assert r["code"] == 250, r
    if case == "forged_verdicts_any_case":
        head = got[0].data.split(b"\n\n", 1)[0].lower()
        assert head.count(b"x-spam-flag") == 0 and head.count(b"x-virus-status") == 1
        assert b"x-quarantine-released" not in head


def test_no_headers_at_all(stack):
    marker = uuid.uuid4().hex
    data = f"just a line of text {marker}\nand another\n".encode()
    r = stack.send(wire(data), "alice@outside.test", ["bob@example.com"], xclient_addr=OUTSIDE)
    assert r["code"] == 250, r
    [d] = deliveries(stack, marker.encode())
    assert d.data.replace(b"\r\n", b"\n").endswith(data)     # Postfix adds headers above; the text is intact


def test_a_thousand_recipients(stack):
    marker = uuid.uuid4().hex
    rcpts = [f"user{i}@example.com" for i in range(1000)]
    data = headers(marker) + b"\nhello all\n"
    r = stack.send(wire(data), "alice@outside.test", rcpts, xclient_addr=OUTSIDE)
    assert r["code"] == 250, r
    import time
    end = time.monotonic() + 120
    while time.monotonic() < end:
        got = [d for d in stack.delivered() if marker.encode() in d.data]
        if sum(len(d.recipients) for d in got) >= 1000:
            break
        time.sleep(0.5)
    stack.wait_drained()                                                       # no more copies on their way
    got = [d for d in stack.delivered() if marker.encode() in d.data]
    assert sorted(r for d in got for r in d.recipients) == sorted(rcpts)       # each exactly once
    assert all(body(d.data) == expected_body(wire(data)) for d in got)


def test_a_100_mb_message(stack):
    marker = uuid.uuid4().hex
    line = f"{marker} the quick brown fox jumps over the lazy dog 0123456789\n".encode()
    data = headers(marker) + b"\n" + line * (100_000_000 // len(line))
    r, got = roundtrip(stack, data, marker.encode())
    assert r["code"] == 250, r
    head = got[0].data.split(b"\n\n", 1)[0]
    assert b"X-Virus-Status: unscanned (oversize)" in head       # over message_size_limit: not scanned, tagged


def test_a_forged_release_header_skips_no_scan(stack):
    marker = uuid.uuid4().hex
    data = headers(marker, b"X-Quarantine-Released: id=0123456789abcdef01234567, by=root, at=now\n") + \
        f"\n{GTUBE}\n".encode()
    r = stack.send(wire(data), "alice@outside.test", ["bob@example.com"], xclient_addr=OUTSIDE)
    assert r["code"] == 550 and "spam" in r["reply"], r


# ---- header floods (header_count_limit, verdict_header_limit) and the Subject tag of 8-bit Subjects

def refused_unscanned(stack, data: bytes, marker: str, limit: str, within: float = 60):
    """Send `data` from an outside client; it must be refused with 552 5.6.0 well within the
    client's patience, logged as over `limit`, and never delivered."""
    import time
    started = time.monotonic()
    r = stack.send(wire(data), f"flood-{marker}@outside.test", ["bob@example.com"], xclient_addr=OUTSIDE,
                   timeout=2 * within)
    elapsed = time.monotonic() - started
    assert r["code"] == 552 and r["reply"].startswith("5.6.0 Too many header fields"), r
    assert elapsed < within, f"the reply took {elapsed:.0f}s"
    qid = re.search(rf"cleanup\[\d+\]: ([0-9A-Za-z]+): message-id=<{marker}@", stack.postfix_log()).group(1)
    stack.wait_drained(logged=f"{qid}: action=reject, reason=headers")
    lines = stack.wait_logged(f"{qid}: ")
    assert any(f"over {limit} (" in line for line in lines), lines
    assert not [d for d in stack.delivered() if marker.encode() in d.data]


def test_a_flood_of_forged_verdict_headers_is_refused_quickly(stack):
    # 100,000 forged X-Spam-* fields, about 2 MB: stripping each would make Postfix's cleanup
    # go through all header fields again, for minutes
    marker = uuid.uuid4().hex
    flood = b"".join(b"X-Spam-Flood-%d: x\n" % i for i in range(100_000))
    refused_unscanned(stack, headers(marker, flood) + b"\nbody\n", marker, "verdict_header_limit")


def test_header_count_limit_through_postfix(stack):
    from scanmilter import config
    limit = config.load(None).header_count_limit          # the stack runs with the defaults
    marker = uuid.uuid4().hex
    below = headers(marker, b"".join(b"X-Many-%d: v\n" % i for i in range(limit - 20))) + b"\nbody\n"
    r, got = roundtrip(stack, below, marker.encode())
    assert r["code"] == 250, r                             # Postfix itself takes that many: so do we
    marker = uuid.uuid4().hex
    over = headers(marker, b"".join(b"X-Many-%d: v\n" % i for i in range(limit + 1))) + b"\nbody\n"
    refused_unscanned(stack, over, marker, "header_count_limit")
    marker = uuid.uuid4().hex
    many = headers(marker, b"".join(b"X-Many-%d: v\n" % i for i in range(10_000))) + b"\nbody\n"
    refused_unscanned(stack, many, marker, "header_count_limit")


@pytest.mark.parametrize("words", [b"caf\xe9 \xfc\xdf", "café Grüße".encode()], ids=["latin1", "utf8"])
def test_an_8bit_subject_is_tagged_keeping_its_bytes(stack, words):
    import email.header
    marker = uuid.uuid4().hex
    subject = b"scanmilter-tag-test " + words + b" " + marker.encode()    # the test rule scores 8: tagged
    data = headers(marker).replace(b"Subject: nasty " + marker.encode(), b"Subject: " + subject) + b"\nbody\n"
    r, [d] = roundtrip(stack, data, marker.encode())
    assert r["code"] == 250, r
    head = d.data.split(b"\n\n", 1)[0]
    [value] = re.findall(rb"(?im)^Subject:((?:[^\n]*)(?:\n[ \t][^\n]*)*)", head)
    assert value.isascii()                                 # encoded words, nothing raw
    unfolded = re.sub(r"\n(?=[ \t])", "", value.decode("ascii")).strip()
    parts = email.header.decode_header(unfolded)
    assert b"".join(p if isinstance(p, bytes) else p.encode() for p, _ in parts) == b"[SPAM] " + subject

