"""Header edits: forged verdicts stripped, rewrite rules, safe values, the Subject tag."""
import email.header
import re

import pytest

from scanmilter import headers as H, policy as P, policyfile
from scanmilter.message import Seen
from scanmilter.scanners import ScanResult
from scanmilter.verdict import combine
from support import assert_safe, decoded

OUTSIDE = P.Envelope("203.0.113.7", "", "", "a@outside.test", ("bob@example.com",))
INSIDE = P.Envelope("127.0.0.1", "", "", "carol@example.com", ("dave@elsewhere.test",))


def run(score, seen, env=OUTSIDE, policy=None):
    policy = policy or policyfile.load("")
    verdict = combine([ScanResult("spamd", "clean", score=score, required=5.0, rules=("R1",)),
                       ScanResult("clamd", "clean")])
    outcome = P.decide(verdict, env, policy)
    assert outcome.action == "accept"
    return H.edits(verdict, outcome, seen, policy)


def test_inbound_strips_forged_verdicts_then_adds_ours():
    seen = [Seen("X-Spam-Flag", 1, b" YES"), Seen("x-spam-flag", 2, b" YES"), Seen("X-Virus-Status", 1, b" clean"),
            Seen("X-Quarantine-Released", 1, b" id=1"), Seen("Subject", 1, b" hi")]
    edits = run(1.0, seen)
    assert [(e.kind, e.name, e.index) for e in edits if e.kind == "remove"] == [
        ("remove", "X-Quarantine-Released", 1), ("remove", "x-spam-flag", 2), ("remove", "X-Spam-Flag", 1),
        ("remove", "X-Virus-Status", 1)]
    assert [(e.name, e.value) for e in edits if e.kind == "add"] == [
        ("X-Virus-Status", "clean"), ("X-Spam-Status", "No, score=1.0 required=5.0 tests=R1")]


def test_outbound_keeps_headers_and_adds_no_scan_details():
    seen = [Seen("X-Spam-Flag", 1, b" YES"), Seen("Subject", 1, b" hi")]
    assert run(7.0, seen, env=INSIDE) == []


def test_subject_tagged_once_and_missing_subject_added():
    assert H.Edit("change", "Subject", 1, "[SPAM] hi") in run(8.0, [Seen("Subject", 1, b" hi")])
    assert not [e for e in run(8.0, [Seen("Subject", 1, b" [SPAM] hi")]) if e.name == "Subject"]
    assert H.Edit("add", "Subject", 0, "[SPAM]") in run(8.0, [])


@pytest.mark.parametrize("subject, expected", [
    (b" Hello", "[SPAM] Hello"),
    (b" [SPAM] Hello", None),
    (None, "[SPAM]"),
    (b" =?utf-8?q?Gr=C3=BC=C3=9Fe?=", "[SPAM] =?utf-8?q?Gr=C3=BC=C3=9Fe?="),
    (b"", "[SPAM]"),
    (b" \t", "[SPAM]"),
    (b" caf\xe9", "[SPAM] =?iso-8859-1?q?caf=E9?="),            # not UTF-8: every byte kept
    (b" caf\xc3\xa9 ok", "[SPAM] =?utf-8?q?caf=C3=A9?= ok"),    # UTF-8: as UTF-8
    (b" a\nb", "[SPAM] a b"),                                    # a bare line end is no fold
    (b" a\r\n\tb\x00c\x1b[2J", "[SPAM] a\tb c [2J"),            # a fold unfolds; controls become spaces
])
def test_tag_subject(subject, expected):
    assert H.tag_subject(subject, "[SPAM]") == expected


def test_tagged_encoded_subject_still_decodes():
    new = H.tag_subject(b" =?utf-8?q?Gr=C3=BC=C3=9Fe?=", "[SPAM]")
    assert str(email.header.make_header(email.header.decode_header(new))) == "[SPAM] Grüße"


@pytest.mark.parametrize("raw", [
    b" caf\xe9",                                   # Latin-1 from the wire
    b" Gr\xfc\xdfe aus K\xf6ln, 100% sicher",      # Latin-1 words among ASCII ones
    "  Grüße aus Köln = ? _ \t und  mehr ".encode(),       # UTF-8, spaces and tabs between
    "你好 世界".encode() * 20,                     # long: several encoded words, folded
    b"\xff\xfe" * 80,                              # invalid anywhere, long
    b" ok " + "ü".encode() + b"\xe9",               # one word mixing UTF-8 and a stray byte
])
def test_tagged_subject_keeps_every_byte(raw):
    new = H.tag_subject(raw, "[SPAM]")
    assert_safe(new)
    assert decoded(new) == b"[SPAM] " + raw.strip(b" \t")
    assert all(len(line) <= 78 for line in ("Subject: " + new).split("\n"))


def test_space_next_to_an_encoded_word_survives_decoding():
    # decoders drop white space between two encoded words: the space must travel inside ours
    raw = b" =?utf-8?q?Gr=C3=BC=C3=9Fe?= caf\xe9 =?utf-8?q?aus?= K\xf6ln"
    new = H.tag_subject(raw, "[SPAM]")
    assert_safe(new)
    assert decoded(new) == "[SPAM] Grüße caf".encode() + b"\xe9 aus K\xf6ln"


def test_a_folded_subject_stays_folded_validly():
    raw = b" first line of a long subject\r\n\tsecond line with caf\xe9\r\n third"
    new = H.tag_subject(raw, "[SPAM]")
    assert_safe(new)
    assert decoded(new) == b"[SPAM] first line of a long subject\tsecond line with caf\xe9 third"


REWRITES = """
[[header_rewrite]]
direction = "outbound"
action = "remove"
name = "X-Originating-IP"

[[header_rewrite]]
direction = "outbound"
action = "remove"
name = "Received"
match = "from \\\\S+ \\\\(\\\\S+ \\\\[10\\\\."

[[header_rewrite]]
direction = "any"
action = "replace"
name = "X-Mailer"
match = "^Secret"
value = "mail client"

[[header_rewrite]]
direction = "inbound"
action = "add"
name = "X-Gateway"
value = "Grüße\\r\\nBcc: evil@example.org"
"""


def test_rewrite_rules_by_direction(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(REWRITES)
    pol = policyfile.load(str(path))
    seen = [Seen("Received", 1, b" from pc1 (pc1 [10.1.2.3])\r\n\tby mx"), Seen("Received", 2, b" from x (x [192.0.2.1])"),
            Seen("X-Originating-IP", 1, b" 10.1.2.3"), Seen("X-Mailer", 1, b" Secret Tool 1.0"),
            Seen("Subject", 1, b" hi")]
    out = run(0.0, seen, env=INSIDE, policy=pol)
    assert [(e.kind, e.name, e.index) for e in out] == [
        ("change", "X-Mailer", 1), ("remove", "Received", 1), ("remove", "X-Originating-IP", 1)]
    inbound = run(0.0, seen, env=OUTSIDE, policy=pol)
    added = [e for e in inbound if e.name == "X-Gateway"]
    assert len(added) == 1 and "\r" not in added[0].value and "\nBcc" not in added[0].value
    decoded = str(email.header.make_header(email.header.decode_header(added[0].value)))
    assert decoded == "Grüße Bcc: evil@example.org"


def test_safe_value_folds_long_ascii():
    value = H.safe_value("X-Long", " ".join(["word"] * 60))
    assert all(len(line) <= 78 for line in ("X-Long: " + value).split("\n"))
    assert re.sub(r"\s+", " ", value) == " ".join(["word"] * 60)


def test_fold_keeps_lines_short_and_adds_only_white_space():
    value = "Yes, score=9.0 required=5.0 tests=" + ",".join(f"RULE_NUMBER_{i}" for i in range(12))
    folded = H.fold("X-Spam-Status", value)
    lines = ("X-Spam-Status: " + folded).split("\n")
    assert all(len(line) <= 78 for line in lines) and len(lines) > 1
    assert re.sub(r"\s", "", folded) == re.sub(r"\s", "", value)


def test_oversize_skip_adds_no_scan_headers_but_tag_does(tmp_path):
    path = tmp_path / "p.toml"
    results = [ScanResult("spamd", "skipped", "oversize"), ScanResult("clamd", "skipped", "oversize")]
    for action, expected in (("skip", []), ("tag", ["X-Virus-Status", "X-Spam-Status"])):
        path.write_text(f'[inbound]\noversize_action = "{action}"\n')
        pol = policyfile.load(str(path))
        verdict = combine(results, oversize=True)
        outcome = P.decide(verdict, OUTSIDE, pol)
        assert [e.name for e in H.edits(verdict, outcome, [], pol) if e.kind == "add"] == expected
