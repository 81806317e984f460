"""End to end through real Postfix, clamd and spamd: attachments built by the tests
(attachment_files.py), judged by the shipped [files] rules for bob@example.com and by per-recipient
overrides for lab@example.com; replies, delivered bytes, headers, log lines and metrics."""
import base64
import time
import uuid

import pytest

import attachment_files as F
from support import delivered_with, get, header_lines, not_delivered, peak_rss_kib, scrape, send, \
    wait_summary

pytestmark = pytest.mark.integration

DEFAULT, LAB = "bob@example.com", "lab@example.com"

POLICY = """
[inbound.recipients."lab@example.com"]
limit_action = "tag"

[inbound.recipients."lab@example.com".files]
executable = "tag"
script = "accept"
disk-image = "tag"
encrypted = "reject"
office-macros = "reject"
"""


@pytest.fixture(scope="module")
def stack(stack_with):
    return stack_with(policy_text=POLICY)


def encoded(name: str) -> str:
    return f'"=?utf-8?b?{base64.b64encode(name.encode()).decode()}?="'


def nested_7z() -> bytes:
    inner = F.archive("zip", [("payload.exe", F.pe_exe())])
    return F.archive("7zip", [("middle.zip", F.archive("zip", [("inner.zip", inner)]))])


# case -> (the attachment part, what bob@ gets, what lab@ gets). "reject TEXT": 554 5.7.1 with
# "Message rejected: banned attachment TEXT"; "mark TEXT": delivered with X-Attachment-Status: TEXT;
# "clean": delivered without it.
CASES = {
    "exe renamed pdf": (lambda: F.attachment(F.pe_exe(), "application/pdf", filename='"invoice.pdf"'),
                        "reject invoice.pdf (executable)", "mark executable: invoice.pdf"),
    "pdf.exe": (lambda: F.attachment(F.pe_exe(), "application/pdf", filename='"invoice.pdf.exe"'),
                "reject invoice.pdf.exe (executable)", "mark executable: invoice.pdf.exe"),
    "rtlo": (lambda: F.attachment(F.pe_exe(), "application/pdf", filename=encoded("invoice\u202efdp.exe")),
             "reject invoice\\u202efdp.exe (executable)",
             "mark executable: invoice\\u202efdp.exe; deceptive-name: invoice\\u202efdp.exe"),
    "rfc 2231": (lambda: F.attachment(F.pe_exe(), disposition="attachment; filename*0*=utf-8''Rechnung%20f%C3%BCr;"
                                      " filename*1*=%20M%C3%A4rz.pdf.exe"),
                 "reject Rechnung f\\xfcr M\\xe4rz.pdf.exe (executable)",
                 "mark executable: Rechnung f\\xfcr M\\xe4rz.pdf.exe"),
    "zip holding js": (lambda: F.attachment(F.archive("zip", [("docs/readme.txt", b"read me\n"), ("docs/run.js", F.JS)]),
                                            "application/zip", filename="docs.zip"),
                       "reject docs.zip > docs/run.js (script)", "clean"),
    "zip in zip in 7z": (lambda: F.attachment(nested_7z(), filename="outer.7z"),
                         "reject outer.7z > middle.zip > inner.zip > payload.exe (executable)",
                         "mark executable: outer.7z > middle.zip > inner.zip > payload.exe"),
    "encrypted zip": (lambda: F.attachment(F.zipcrypto([("statement.txt", b"x" * 200)]), "application/zip",
                                           filename="statement.zip"),
                      "mark encrypted: statement.zip", "reject statement.zip (encrypted)"),
    "iso holding exe": (lambda: F.attachment(F.archive("iso9660", [("SETUP.EXE", F.pe_exe()), ("README.TXT", b"hi\n")]),
                                             filename="disk.iso"),
                        "reject disk.iso (disk-image)", "mark disk-image: disk.iso; executable: disk.iso > "),
    "docm with a macro": (lambda: F.attachment(F.docm(), filename="report.docm"),
                          "mark office-macros: report.docm", "reject report.docm (office-macros)"),
}


def message(marker: str, *parts: bytes) -> bytes:
    return F.message(*parts, headers=f"Message-ID: <{marker}@outside.test>\r\nSubject: files {marker}\r\n")


def check(stack, marker, data, rcpt, expected):
    r = send(stack, data, rcpt=rcpt)
    if expected.startswith("reject "):
        assert (r["code"], r["reply"]) == (554, f"5.7.1 Message rejected: banned attachment {expected[7:]}"), r
        assert not_delivered(stack, marker)
        return r
    assert r["code"] == 250, r
    d = delivered_with(stack, marker)
    marks = header_lines(d.data, "X-Attachment-Status")
    if expected == "clean":
        assert marks == []
    else:
        [line] = marks
        value = line.replace("\n", "").replace("\t", " ")
        assert value.startswith(f"X-Attachment-Status: {expected[5:]}"), value
    return r


@pytest.mark.parametrize("case", list(CASES))
def test_default_policy_and_a_per_recipient_override(stack, case):
    part, default, override = CASES[case]
    for rcpt, expected in ((DEFAULT, default), (LAB, override)):
        marker = uuid.uuid4().hex
        check(stack, marker, message(marker, part()), rcpt, expected)
        line = wait_summary(stack, marker)
        assert "direction=inbound" in line
        if expected.startswith("reject "):
            assert "action=reject, reason=banned" in line and "banned_rule=" in line, line
        elif expected.startswith("mark "):
            assert "action=accept, reason=banned" in line and "banned_rule=" in line, line


def test_the_log_line_names_the_banned_part_and_the_metric_counts_the_rule(stack):
    before = get(scrape(stack), "scanmilter_file_rule_hits_total", rule="executable", action="reject")
    marker = uuid.uuid4().hex
    r = send(stack, message(marker, F.attachment(F.pe_exe(), "application/pdf", filename='"invoice.pdf.exe"')))
    assert r["code"] == 554, r
    line = wait_summary(stack, marker)
    assert "action=reject, reason=banned" in line and "banned=invoice.pdf.exe, banned_rule=executable" in line
    assert get(scrape(stack), "scanmilter_file_rule_hits_total", rule="executable", action="reject") == before + 1
    assert get(scrape(stack), "scanmilter_scans_total", engine="files", outcome="clean") >= 1


def test_a_zip_bomb_is_stopped_within_its_time_and_memory_limits(stack):
    [(pid, _)] = stack.pids("scanmilter")
    bomb = F.zip_bomb(3 << 30)                       # 3 GiB of zeros in about 3 MB
    rss_before = peak_rss_kib(pid)
    for rcpt in (DEFAULT, LAB):
        marker = uuid.uuid4().hex
        start = time.monotonic()
        r = send(stack, message(marker, F.attachment(bomb, "application/zip", filename="bomb.zip")), rcpt=rcpt)
        assert time.monotonic() - start < 30, r      # spamd's share included; the walk stops at its limit
        line = wait_summary(stack, marker)
        assert "file_problems=limit:archive_" in line, line
        if rcpt == LAB:                              # limit_action = "tag" for lab@: delivered, marked unchecked
            assert r["code"] == 250, r
            [mark] = header_lines(delivered_with(stack, marker).data, "X-Attachment-Status")
            assert mark.startswith("X-Attachment-Status: unchecked: archive_") and mark.endswith(" in bomb.zip")
        else:                                        # the default limit_action = "reject"
            assert r["code"] == 554 and "could not be checked (archive_" in r["reply"], r
            assert "reason=unchecked" in line and not_delivered(stack, marker)
    # the daemon's peak resident memory grew by far less than the 3 GiB the bomb holds
    assert peak_rss_kib(pid) - rss_before < 48 * 1024


def test_a_clean_pdf_and_a_clean_image_are_delivered_untouched(stack):
    marker = uuid.uuid4().hex
    data = message(marker, F.attachment(F.pdf(), "application/pdf", filename="report.pdf"),
                   F.attachment(F.png(), "image/png", filename="photo.png", disposition="inline"))
    r = send(stack, data)
    assert r["code"] == 250, r
    d = delivered_with(stack, marker)
    body = data.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n")
    assert d.data.split(b"\n\n", 1)[1] == body                      # byte for byte
    assert F.b64(F.pdf()).replace(b"\r\n", b"\n") in body and F.b64(F.png()).replace(b"\r\n", b"\n") in body
    assert header_lines(d.data, "X-Attachment-Status") == []
    assert "reason=ham" in wait_summary(stack, marker) or "reason=tagged" in wait_summary(stack, marker)


def test_a_forged_attachment_verdict_is_removed(stack):
    marker = uuid.uuid4().hex
    data = F.message(F.attachment(F.pdf(), "application/pdf", filename="report.pdf"),
                     headers=f"Message-ID: <{marker}@outside.test>\r\nX-Attachment-Status: clean (trust me)\r\n")
    assert send(stack, data)["code"] == 250
    assert header_lines(delivered_with(stack, marker).data, "X-Attachment-Status") == []


def test_outbound_mail_with_an_executable_is_only_marked_in_the_log(stack):
    marker = uuid.uuid4().hex
    data = message(marker, F.attachment(F.pe_exe(), filename="setup.exe"))
    r = stack.send(data, "carol@example.com", ["dave@elsewhere.test"])          # from 127.0.0.1: outbound
    assert r["code"] == 250, r
    d = delivered_with(stack, marker)
    assert header_lines(d.data, "X-Attachment-Status") == []                    # add_scan_headers = false
    line = wait_summary(stack, marker)
    assert "action=accept, reason=banned, direction=outbound" in line and "banned=setup.exe" in line


def _attached_message(inner: bytes) -> bytes:
    return (b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=forwarded.eml\r\n\r\n" + F.b64(inner))


def _bomb_then_script() -> bytes:
    zeros, crc = F.deflated_zeros(4 << 20)
    return F.zip_of([("zeros.txt", zeros, crc, 4 << 20), ("invoice.js", *F.deflated(F.JS))])


# ways around the checks: each of these reached bob@ (as ham, or merely tagged) before they were closed
PAST_THE_CHECKS = {
    "zip central directory names a script": (
        lambda: F.attachment(F.zip_names([(b"readme.txt", b"invoice.js", F.JS, b"")]), "application/zip",
                             filename="docs.zip"),
        "docs.zip > invoice.js (script)"),
    "script after an archive limit": (lambda: F.attachment(_bomb_then_script(), "application/zip",
                                                           filename="docs.zip"),
                                      "docs.zip > invoice.js (script)"),
    "uuencoded in the text": (lambda: b"Content-Type: text/plain\r\n\r\nThe invoice:\r\n\r\n"
                              + F.uuencoded("invoice.pdf.exe", F.pe_exe()),
                              "invoice.pdf.exe (executable)"),
    "base64 attached message": (lambda: _attached_message(F.message(F.attachment(F.pe_exe(), filename="inner.exe"),
                                                                    boundary="inner")),
                                "inner.exe (executable)"),
}


@pytest.mark.parametrize("case", list(PAST_THE_CHECKS))
def test_what_used_to_get_past_the_checks_is_refused(stack, case):
    part, expected = PAST_THE_CHECKS[case]
    marker = uuid.uuid4().hex
    check(stack, marker, message(marker, part()), DEFAULT, f"reject {expected}")
    assert "action=reject, reason=banned" in wait_summary(stack, marker)
