"""The attachment checks' detection core (scanmilter.attachments): real files built by the tests
(attachment_files.py) inside real MIME messages, walked as the spool holds them. Names, real types,
archives member by member, macros, encryption, bombs within their limits, malformed MIME."""
import dataclasses
import io
import json
import random
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import attachment_files as F
from conftest import ROOT
from scanmilter.attachments import (ENCRYPTED, MALFORMED, PROBLEM_KINDS, UNREADABLE, Limits, Report, names as N,
                                    walk)
from scanmilter.attachments.bench import time_walk
from scanmilter.message import Spool

DEFAULTS = Limits.defaults()
PE = "application/vnd.microsoft.portable-executable"     # what Debian 12's libmagic 5.44 calls a PE32 file


def walked(msg: bytes, **limits) -> Report:
    return walk(io.BytesIO(msg), dataclasses.replace(DEFAULTS, **limits))


def attached(report: Report):
    """The files but the text body (part 1)."""
    return [f for f in report.files if f.part != "1"]


def one(report: Report):
    [f] = [f for f in attached(report) if not f.container]
    return f


def kinds(problems) -> set[str]:
    return {p.kind for p in problems}


# ---- names -----------------------------------------------------------------------------------

def test_rfc2231_continuations_with_a_charset_are_joined_and_decoded():
    msg = F.message(F.attachment(F.pdf(), "application/pdf", disposition=(
        "attachment; filename*0*=utf-8''Rechnung%20f%C3%BCr; filename*1*=%20M%C3%A4rz; filename*2=.pdf")))
    f = one(walked(msg))
    assert [n.sent for n in f.names] == ["Rechnung für März.pdf"]
    assert f.names[0].extensions == ("pdf",) and f.problems == ()


def test_rfc2231_extended_value_and_plain_value_both_kept():
    msg = F.message(F.attachment(F.pe_exe(), disposition=(
        "attachment; filename=\"invoice.pdf\"; filename*=utf-8''invoice.pdf.exe")))
    f = one(walked(msg))
    assert {n.sent for n in f.names} == {"invoice.pdf", "invoice.pdf.exe"}
    assert f.names_disagree


def test_rfc2047_encoded_words_in_names_are_decoded():
    msg = F.message(F.attachment(F.pe_exe(), name='"=?UTF-8?B?w7xiZXJ3ZWlzdW5nLnBkZi5leGU=?="',
                                 filename='"=?iso-8859-1?Q?Beleg_=FCber?= =?utf-8?q?_100=E2=82=AC.exe?="'))
    f = one(walked(msg))
    assert {n.sent for n in f.names} == {"überweisung.pdf.exe", "Beleg über 100€.exe"}
    assert {n.source for n in f.names} == {"content-disposition", "content-type"}
    assert all(n.extension == "exe" for n in f.names)


def test_a_broken_encoded_word_is_kept_as_sent_and_reported():
    msg = F.message(F.attachment(F.pdf(), "application/pdf", filename='"=?utf-8?B?@@@?=.pdf"'))
    f = one(walked(msg))
    assert f.names[0].sent == "=?utf-8?B?@@@?=.pdf"
    assert any("RFC 2047" in p.detail for p in f.problems if p.kind == MALFORMED)


def test_names_that_disagree_are_both_kept():
    msg = F.message(F.attachment(F.pe_exe(), "application/pdf", name='"statement.pdf"', filename='"statement.scr"'))
    f = one(walked(msg))
    assert [(n.source, n.sent) for n in f.names] == [("content-disposition", "statement.scr"),
                                                     ("content-type", "statement.pdf")]
    assert f.names_disagree and f.name.extension == "scr"


def test_a_right_to_left_override_is_removed_and_reported():
    name = "invoice\u202efdp.exe"           # shown as "invoiceexe.pdf"
    msg = F.message(F.attachment(F.pe_exe(), "application/pdf", filename=f'"{name}"'))
    f = one(walked(msg))
    assert f.name.sent == name
    assert f.name.normal == "invoicefdp.exe" and f.name.extensions == ("exe",)
    assert N.BIDI in f.name.tricks


@pytest.mark.parametrize("sent, normal, extensions, trick", [
    ("Invoice.PDF.exe", "invoice.pdf.exe", ("pdf", "exe"), None),
    ("invoice.exe. . .", "invoice.exe", ("exe",), N.TRAILING),
    ("invoice.exe   ", "invoice.exe", ("exe",), N.TRAILING),
    ("INVOICE．ＥＸＥ", "invoice.exe", ("exe",), N.COMPATIBILITY),           # fullwidth stop and letters
    ("invoice\u2024exe", "invoice.exe", ("exe",), N.COMPATIBILITY),         # one dot leader
    ("inv\u200boice.e\u200dxe", "invoice.exe", ("exe",), N.INVISIBLE),      # zero width space, joiner
    ("invoice\u2066.pdf\u2069.exe", "invoice.pdf.exe", ("pdf", "exe"), N.BIDI),   # isolates
    ("a\u200fb\u200e.js", "ab.js", ("js",), N.BIDI),                        # RLM, LRM
    ("in\tvoice\x00.exe", "invoice.exe", ("exe",), N.CONTROL),
    ("..\\..\\Start Menu\\run.bat", "..\\..\\start menu\\run.bat", ("bat",), N.DIRECTORY),
    ("STRASSE.ß.TXT", "strasse.ss.txt", ("ss", "txt"), None),
])
def test_the_normal_form(sent, normal, extensions, trick):
    n = N.normalise(sent, "archive")
    assert n.normal == normal and n.extensions == extensions
    assert (trick in n.tricks) if trick else n.tricks == ()


def test_look_alike_letters_are_noted_and_mapped_in_the_skeleton():
    n = N.normalise("invoice.\u0435x\u0435", "content-disposition")     # Cyrillic "е"
    assert n.extensions == ("\u0435x\u0435",)                              # not what Windows opens as .exe
    assert n.skeleton == "invoice.exe" and {N.MIXED_SCRIPTS, N.LOOKALIKE} <= set(n.tricks)
    assert N.normalise("отчёт.pdf", "content-type").tricks == ()         # one script per word is no trick
    assert N.normalise("報告書ファイル.pdf", "content-type").tricks == ()


@pytest.mark.parametrize("charset, encoded, expected", [
    ("punycode", "abc-", "abc-"),                       # a Python codec, no mail charset: bytes as text
    ("unicode_escape", "%5Cu0041.exe", "\\u0041.exe"),
    ("no-such-charset", "%C3%A9.exe", "é.exe"),
    ("utf-7", "+2AA-.exe", "\ufffd.exe"),                # a lone surrogate never reaches the facts
])
def test_charsets_that_are_none_fall_back_to_text(charset, encoded, expected):
    values, _ = N.params([("filename*", f"{charset}''{encoded}")], "filename")
    assert values == [expected]


def test_every_extension_of_a_many_dotted_name():
    assert N.normalise("a.tar.gz.pdf..exe", "archive").extensions == ("tar", "gz", "pdf", "exe")
    assert N.normalise(".hidden", "archive").extensions == ("hidden",)
    assert N.normalise("noext", "archive").extensions == ()


def test_the_parameter_parser_is_linear_on_a_hostile_header():
    value = "attachment" + '; a="x;' * 19999 + "; filename=x.exe"
    start = time.monotonic()
    main, pairs, problems = N.split_value(value)
    assert time.monotonic() - start < 1.0
    assert main == "attachment" and problems == ["unterminated quoted string in a header"]
    start = time.monotonic()
    N.decode_words("=?utf-8?q?" * 20000)
    assert time.monotonic() - start < 1.0


# ---- real types --------------------------------------------------------------------------------

def test_an_exe_renamed_pdf_is_found_by_its_magic():
    msg = F.message(F.attachment(F.pe_exe(), "application/pdf", filename='"invoice.pdf"'))
    f = one(walked(msg))
    assert (f.declared_type, f.name.extension) == ("application/pdf", "pdf")
    assert f.detected_type == PE and f.description.startswith("PE32 executable")
    assert f.problems == ()


def test_a_double_extension_keeps_every_extension():
    msg = F.message(F.attachment(F.pe_exe(), "application/pdf", filename='"invoice.pdf.exe"'))
    f = one(walked(msg))
    assert f.name.extensions == ("pdf", "exe") and f.detected_type == PE


def test_an_executable_in_a_body_part_without_a_name_is_found():
    msg = F.message(F.attachment(F.pe_exe(), "text/plain", disposition=None))
    f = one(walked(msg))
    assert f.names == () and f.declared_type == "text/plain" and f.detected_type == PE


def test_a_clean_pdf_and_a_clean_png_are_clean():
    report = walked(F.message(F.attachment(F.pdf(), "application/pdf", filename="report.pdf"),
                              F.attachment(F.png(), "image/png", filename="photo.png", disposition="inline")))
    pdf, png = attached(report)
    assert (pdf.detected_type, pdf.description.split(",")[0]) == ("application/pdf", "PDF document")
    assert (png.detected_type, png.disposition) == ("image/png", "inline")
    assert png.description.startswith("PNG image data, 1 x 1")
    assert report.all_problems() == () and report.complete
    assert [f.size for f in report.files] == [len(b"Hello, please find the file attached."), len(F.pdf()), len(F.png())]


# ---- archives ----------------------------------------------------------------------------------

def test_a_zip_holding_a_script_lists_the_member():
    msg = F.message(F.attachment(F.archive("zip", [("docs/readme.txt", b"hello\n"), ("docs/run.js", F.JS)]),
                                 "application/zip", filename="docs.zip"))
    report = walked(msg)
    archive, readme, js = attached(report)
    assert archive.detected_type == "application/zip" and archive.archive_format.startswith("ZIP")
    assert archive.members == 2 and not archive.container
    assert (js.part, js.container, js.name.sent, js.name.basename, js.name.extension) == (
        "2", ("docs.zip",), "docs/run.js", "run.js", "js")
    assert js.detected_type == "text/plain" and js.size == len(F.JS)
    assert report.all_problems() == ()


def test_a_zip_inside_a_zip_inside_a_7z():
    inner = F.archive("zip", [("payload.exe", F.pe_exe())])
    middle = F.archive("zip", [("inner.zip", inner)])
    outer = F.archive("7zip", [("middle.zip", middle)])
    report = walked(F.message(F.attachment(outer, filename="outer.7z")))
    seven, mid, inn, exe = attached(report)
    assert (seven.detected_type, seven.archive_format) == ("application/x-7z-compressed", "7-Zip")
    assert mid.container == ("outer.7z",) and inn.container == ("outer.7z", "middle.zip")
    assert exe.container == ("outer.7z", "middle.zip", "inner.zip") and exe.depth == 3
    assert exe.detected_type == PE and exe.name.sent == "payload.exe"
    assert exe.where == "2: outer.7z > middle.zip > inner.zip > payload.exe"
    assert report.all_problems() == ()


def test_archives_nested_deeper_than_the_limit_are_reported_not_opened():
    inner = F.archive("zip", [("payload.exe", F.pe_exe())])
    outer = F.archive("7zip", [("middle.zip", F.archive("zip", [("inner.zip", inner)]))])
    report = walked(F.message(F.attachment(outer, filename="outer.7z")), archive_depth_limit=2)
    names = [f.name.sent for f in attached(report)]
    assert names == ["outer.7z", "middle.zip", "inner.zip"]           # payload.exe never listed
    assert [str(p) for p in attached(report)[-1].problems] == ["limit: archive_depth_limit"]
    assert report.limits == ("archive_depth_limit",)


def test_an_encrypted_zip_is_recognised():
    enc = F.zipcrypto([("invoice.exe", F.pe_exe()), ("notes.txt", b"x" * 100)])
    report = walked(F.message(F.attachment(enc, "application/zip", filename="invoice.zip")))
    archive, exe, notes = attached(report)
    assert archive.encrypted and ENCRYPTED in kinds(archive.problems)
    assert exe.encrypted and exe.name.extension == "exe" and exe.detected_type == ""
    assert notes.encrypted
    assert report.encrypted == (archive, exe, notes)


def test_an_iso_holding_an_exe():
    iso = F.archive("iso9660", [("SETUP.EXE", F.pe_exe()), ("README.TXT", b"read me\n")])
    report = walked(F.message(F.attachment(iso, "application/octet-stream", filename="disk.iso")))
    image = attached(report)[0]
    assert image.detected_type == "application/x-iso9660-image" and image.archive_format.startswith("ISO9660")
    exe = next(f for f in attached(report) if f.name and f.name.extension == "exe")
    assert exe.detected_type == PE and exe.container == ("disk.iso",)


def test_a_tarball_and_a_single_compressed_file():
    tgz = F.archive("ustar", [("bin/tool.exe", F.pe_exe())], filter_name="gzip")
    import gzip
    report = walked(F.message(F.attachment(tgz, filename="tools.tgz"),
                              F.attachment(gzip.compress(F.pe_exe()), filename="invoice.exe.gz")))
    by_name = {f.name.sent: f for f in attached(report)}
    assert by_name["bin/tool.exe"].detected_type == PE and by_name["tools.tgz"].archive_format == "POSIX ustar format"
    assert by_name["invoice.exe"].detected_type == PE and by_name["invoice.exe"].container == ("invoice.exe.gz",)
    assert report.all_problems() == ()


def test_a_cab_and_a_rar_holding_executables():
    report = walked(F.message(F.attachment(F.cab("setup.exe", F.pe_exe()), filename="update.cab"),
                              F.attachment(F.rar4("invoice.exe", F.pe_exe()), filename="invoice.rar")))
    cab, setup, rar, invoice = attached(report)
    assert (cab.detected_type, cab.archive_format) == ("application/vnd.ms-cab-compressed", "CAB 1.3 (NONE)")
    assert (rar.detected_type, rar.archive_format) == ("application/x-rar", "RAR")
    assert setup.detected_type == invoice.detected_type == PE
    assert (setup.container, invoice.container) == (("update.cab",), ("invoice.rar",))
    assert report.all_problems() == ()


def test_libarchive_warnings_are_facts_of_the_archive_not_log_lines(caplog):
    data, crc, size = F.deflated(b"hello world\n" * 10)
    lying = F.zip_of([("a.txt", data, crc, size * 3)])          # the header promises more than the data holds
    f = walked(F.message(F.attachment(lying, filename="a.zip"))).files[1]
    assert any(p.kind == MALFORMED and p.detail.startswith("archive: ") for p in f.problems), f.problems
    assert not [r for r in caplog.records if r.name == "libarchive"]


def test_something_named_an_archive_that_is_none_is_unreadable():
    report = walked(F.message(F.attachment(b"this is no zip at all\n" * 10, filename="invoice.zip")))
    f = one(report)
    assert UNREADABLE in kinds(f.problems) and f.members == 0


def test_a_truncated_archive_is_unreadable():
    whole = F.archive("zip", [("a.txt", b"a" * 5000), ("b.exe", F.pe_exe())])
    report = walked(F.message(F.attachment(whole[:len(whole) // 2], "application/zip", filename="a.zip")))
    assert UNREADABLE in kinds(one(report).problems)


def test_the_member_limit_stops_listing():
    many = F.archive("zip", [(f"f{i}.txt", b"x") for i in range(10)])
    report = walked(F.message(F.attachment(many, filename="many.zip"), F.attachment(many, filename="again.zip")),
                    archive_member_limit=4)
    assert report.limits == ("archive_member_limit",)
    assert len([f for f in report.files if f.container]) == 4
    again = next(f for f in report.files if f.name and f.name.sent == "again.zip")
    assert [str(p) for p in again.problems] == ["limit: archive_member_limit"]     # not opened at all


def test_the_ratio_limit_stops_a_small_bomb():
    data, crc = F.deflated_zeros(10 << 20)                  # 10 MiB of zeros in about 10 KB
    report = walked(F.message(F.attachment(F.zip_of([("zeros.txt", data, crc, 10 << 20)]), filename="small.zip")))
    archive, member = attached(report)
    assert report.limits == ("archive_ratio_limit",) and member.problems == archive.problems
    assert DEFAULTS.archive_ratio_floor < member.size < 2 * DEFAULTS.archive_ratio_floor


# ---- office documents -------------------------------------------------------------------------

def test_a_docm_with_a_macro_part():
    report = walked(F.message(F.attachment(F.docm(), filename="report.docm")))
    doc = attached(report)[0]
    assert doc.macros and doc.detected_type.startswith("application/vnd.openxmlformats-officedocument")
    vba = next(f for f in attached(report) if f.name and f.name.basename == "vbaproject.bin")
    assert vba.macros and vba.detected_type == "application/x-ole-storage"
    assert report.macros == (doc, vba) and report.all_problems() == ()


def test_a_docx_without_macros_has_none():
    report = walked(F.message(F.attachment(F.docx(), filename="report.docx")))
    assert not report.macros and report.all_problems() == ()


def test_a_word_97_document_with_a_vba_storage():
    report = walked(F.message(F.attachment(F.doc_with_macros(), "application/msword", filename="old.doc")))
    doc = one(report)
    assert doc.macros and doc.detected_type == "application/msword"


def test_an_encrypted_office_document_is_recognised():
    enc = F.ole({"EncryptionInfo": b"\x04\x00\x04\x00" + bytes(4092), "EncryptedPackage": bytes(4096)})
    doc = one(walked(F.message(F.attachment(enc, filename="salary.xlsx"))))
    assert doc.encrypted and not doc.macros and ENCRYPTED in kinds(doc.problems)


def test_a_broken_ole_file_is_unreadable():
    doc = one(walked(F.message(F.attachment(F.doc_with_macros()[:1024], filename="broken.doc"))))
    assert UNREADABLE in kinds(doc.problems) and not doc.macros


# ---- MIME structure ----------------------------------------------------------------------------

def test_an_attached_message_is_looked_into():
    inner = F.message(F.attachment(F.pe_exe(), filename="inner.exe"), boundary="inner")
    part = b"Content-Type: message/rfc822\r\nContent-Disposition: attachment\r\n\r\n" + inner
    report = walked(F.message(part))
    exe = next(f for f in report.files if f.name and f.name.sent == "inner.exe")
    assert exe.part == "2.2" and exe.detected_type == PE
    assert [f.part for f in report.files] == ["1", "2.1", "2.2"]
    assert report.all_problems() == ()


def test_a_single_part_message_is_part_1():
    msg = (b"From: a@example.org\r\nContent-Type: application/pdf; name=x.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + F.b64(F.pe_exe()))
    [f] = walked(msg).files
    assert f.part == "1" and f.detected_type == PE and f.name.sent == "x.pdf"


def test_nesting_past_the_limit_is_malformed_and_still_a_file():
    depth = 30
    msg = b"Content-Type: text/plain\r\n\r\n"
    for level in range(depth):
        msg = (f'Content-Type: multipart/mixed; boundary="b{level}"\r\n\r\n--b{level}\r\n').encode() + msg + \
            f"\r\n--b{level}--\r\n".encode()
    report = walked(msg, mime_nesting_limit=20)
    assert any("mime_nesting_limit" in d for d in report.malformed)
    assert report.files and report.complete


def test_a_multipart_without_a_boundary_is_one_malformed_file():
    msg = (b"Content-Type: multipart/mixed\r\n\r\n--x\r\nContent-Type: application/pdf\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + F.b64(F.pe_exe()) + b"--x--\r\n")
    report = walked(msg)
    assert report.files and any("without a boundary" in d for d in report.malformed)


def test_a_boundary_that_never_comes_leaves_the_body_as_a_file():
    msg = b'Content-Type: multipart/mixed; boundary="nowhere"\r\n\r\n' + F.pe_exe()
    report = walked(msg)
    [f] = report.files
    assert f.detected_type == PE and MALFORMED in kinds(f.problems)
    assert any("never comes" in d for d in report.malformed)


def test_a_multipart_that_is_not_closed_still_lists_its_parts():
    msg = F.message(F.attachment(F.pe_exe(), filename="a.exe")).rsplit(b"--=-=boundary=-=--", 1)[0]
    report = walked(msg)
    assert [f.name.sent for f in attached(report)] == ["a.exe"]
    assert any("not closed" in d for d in report.malformed)


def test_parts_after_the_closing_boundary_are_walked_and_reported():
    msg = F.message(F.attachment(F.pdf(), filename="a.pdf")) + b"--=-=boundary=-=\r\n" + \
        F.attachment(F.pe_exe(), filename="hidden.exe") + b"\r\n--=-=boundary=-=--\r\n"
    report = walked(msg)
    assert [f.name.sent for f in attached(report)] == ["a.pdf", "hidden.exe"]
    assert any("after the closing boundary" in d for d in report.malformed)


def test_bad_base64_is_reported_and_decoded_as_mail_clients_do():
    encoded = F.b64(F.pe_exe())
    broken = encoded[:40] + b"!!" + encoded[40:-4] + b"\r\n"             # a stray character, cut short
    part = (b'Content-Type: application/pdf; name="x.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\n' + broken)
    f = one(walked(F.message(part)))
    assert f.detected_type == PE
    assert {p.detail for p in f.problems} >= {"bad base64: characters outside the alphabet"}
    glued = F.b64(b"MZ")[:-2] + F.b64(F.pe_exe()[2:])     # two encodings glued: "TVo=" then the rest
    f = one(walked(F.message(b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                             + glued)))
    assert "bad base64: data after the padding" in {p.detail for p in f.problems}
    assert f.size == len(F.pe_exe()) and f.detected_type == PE          # decoded on, as mail clients do


def test_duplicate_content_fields_and_stray_header_lines_are_malformed():
    part = (b"Content-Type: application/pdf; name=a.pdf\r\nContent-Type: application/x-msdownload; name=a.exe\r\n"
            b"Content-Transfer-Encoding: base64\r\n" + F.b64(F.pe_exe()))   # no blank line: the body starts early
    report = walked(F.message(part))
    f = one(report)
    assert {n.sent for n in f.names} == {"a.pdf", "a.exe"}
    assert any("2 Content-Type fields" in d for d in report.malformed)
    assert any("no header field" in p.detail for p in f.problems)


def test_unknown_transfer_encodings_and_quoted_printable():
    qp = b"=4D=5A" + b"=00" * 62 + b"=\r\n"
    msg = F.message(b"Content-Type: application/octet-stream; name=a.exe\r\nContent-Transfer-Encoding: quoted-printable\r\n"
                    b"\r\n" + qp,
                    b"Content-Type: application/octet-stream; name=b.exe\r\nContent-Transfer-Encoding: x-uuencode\r\n"
                    b"\r\nbegin 644 b.exe\r\n")
    qpf, uuf, decoded = attached(walked(msg))
    assert qpf.size == 64 and qpf.description.startswith("MS-DOS executable") and qpf.problems == ()
    assert any("x-uuencode" in p.detail for p in uuf.problems)
    assert decoded.name.sent == "b.exe" and decoded.part == uuf.part     # what a mail client decodes


def test_the_part_limit_stops_the_walk():
    msg = F.message(*[F.attachment(b"x", filename=f"{i}.txt") for i in range(20)])
    report = walked(msg, mime_part_limit=10)
    assert not report.complete and report.limits == ("mime_part_limit",) and report.parts == 11


def test_a_content_header_over_its_limit_is_malformed():
    part = b"Content-Type: application/pdf; name=\"" + b"a" * 5000 + b".exe\"\r\n\r\nx\r\n"
    f = one(walked(F.message(part), mime_header_limit=1024))
    assert any("mime_header_limit" in p.detail for p in f.problems)


def test_the_walk_reads_the_spool_in_memory_and_on_disk(tmp_path):
    msg = F.message(F.attachment(F.archive("zip", [("a.js", F.JS)]), filename="a.zip"))
    for memory_limit in (1 << 20, 100):
        spool = Spool(memory_limit, 1 << 30, str(tmp_path))
        for i in range(0, len(msg), 7):
            spool.write(msg[i:i + 7])
        assert spool.on_disk == (memory_limit == 100)
        with spool.reader() as reader:
            report = walk(reader, DEFAULTS, str(tmp_path))
        assert [f.name.sent for f in attached(report)] == ["a.zip", "a.js"]
        spool.close()


def test_a_time_budget_stops_the_walk_with_its_own_clock():
    ticks = iter(range(10 ** 6))
    report = walk(io.BytesIO(F.message(F.attachment(F.zip_bomb(64 << 20), filename="b.zip"))),
                  dataclasses.replace(DEFAULTS, attachment_timeout=50), clock=lambda: next(ticks))
    assert report.limits == ("attachment_timeout",) and not report.complete


# ---- fuzzing -----------------------------------------------------------------------------------

SEED = F.message(F.attachment(F.archive("zip", [("a.js", F.JS)]), filename="a.zip"),
                 F.attachment(F.pe_exe(), "application/pdf", filename="=?utf-8?q?x=2Epdf?="),
                 b"Content-Type: message/rfc822\r\n\r\n" + F.message(F.attachment(F.pdf(), filename="b.pdf"), boundary="in"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(SEED)), st.integers(0, 40),
                          st.sampled_from([b"", b"--", b"\r\n", b"=", b"--=-=boundary=-=\r\n", b"--in--\r\n", b"\x00",
                                           b"Content-Type: multipart/mixed; boundary=in\r\n", b"\r\n\r\n", b"\xff"])),
                max_size=6), st.integers(0, len(SEED)))
def test_mangled_messages_never_raise_and_are_never_empty(edits, cut):
    msg = bytearray(SEED)
    for at, drop, insert in edits:
        msg[at:at + drop] = insert
    msg = bytes(msg[:max(cut, 300)])
    report = walked(msg)
    assert isinstance(report, Report) and report.parts >= 1
    assert report.files or not report.complete
    assert kinds(report.all_problems()) <= set(PROBLEM_KINDS)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise(data):
    report = walked(data)
    assert report.files and kinds(report.all_problems()) <= set(PROBLEM_KINDS)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_header_values_never_raise(value):
    main, pairs, problems = N.split_value(value)
    for param in ("filename", "name"):
        values, more = N.params(pairs, param)
        for v in values:
            n = N.normalise(v, "content-type")
            assert n.basename == n.basename.strip() and not n.basename.endswith(".")


# ---- bounded time and memory, measured in a fresh process -----------------------------------

MEASURE = r"""
import json, re, sys, time, tracemalloc
sys.path.insert(0, {milter!r})
from scanmilter.attachments import Limits, walk
from scanmilter.message import Spool
directory = {directory!r}
# a first walk of a small message like it: libmagic and libarchive allocate once, at first use
walk(open({warm!r}, "rb"), Limits.defaults(), directory)
{patch}
spool = Spool(1 << 20, 1 << 30, directory)
with open({path!r}, "rb") as f:
    while chunk := f.read(1 << 20):
        spool.write(chunk)
def status(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
# growth from the resident size now to this process's peak after the walk (VmHWM, reset here:
# ru_maxrss would carry the parent's peak over fork and exec)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
start = time.monotonic()
report = walk(spool.reader(), Limits.defaults(), directory)
seconds = time.monotonic() - start
after = status("VmHWM")
tracemalloc.start()
walk(spool.reader(), Limits.defaults(), directory)
python_peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({{"seconds": seconds, "rss_growth": after - before, "python_peak": python_peak,
                  "limits": list(report.limits), "files": [[f.where, f.detected_type, f.size] for f in report.files],
                  "problems": [str(p) for p in report.all_problems()]}}))
"""


def measure(tmp_path, msg: bytes, patch: str = "") -> dict:
    """Time, peak RSS growth and peak Python allocations of one walk of `msg`, in a new process
    (the peak RSS of this one is whatever earlier tests left). `patch`: code run before the walk."""
    path, warm = tmp_path / "message.eml", tmp_path / "warm.eml"
    path.write_bytes(msg)
    warm.write_bytes(F.message(F.attachment(random.randbytes(100 << 10), filename="w.bin"),
                               F.attachment(F.archive("zip", [("w.txt", b"w")]), filename="w.zip")))
    code = MEASURE.format(milter=str(ROOT / "milter"), directory=str(tmp_path), path=str(path), warm=str(warm),
                          patch=patch)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    print(f"seconds {result['seconds']:.3f}, RSS growth {result['rss_growth'] / 2**20:.1f} MiB, "
          f"Python peak {result['python_peak'] / 2**20:.1f} MiB")
    return result


MiB = 1 << 20


def test_a_zip_bomb_is_stopped_within_time_and_memory(tmp_path):
    bomb = F.zip_bomb(3 << 30)                                 # 3 GiB of zeros in about 3 MB
    r = measure(tmp_path, F.message(F.attachment(bomb, "application/zip", filename="bomb.zip")))
    assert r["limits"] == ["archive_expansion_limit"]
    [_, _, (where, _, size)] = r["files"]
    assert where == "2: bomb.zip > zeros.bin" and size <= DEFAULTS.archive_expansion_limit + 64 * 1024
    assert r["seconds"] < 10 and r["rss_growth"] < 16 * MiB and r["python_peak"] < 4 * MiB


def test_a_nested_bomb_is_stopped_within_time_and_memory(tmp_path):
    bomb = F.nested_bomb(levels=3, fan=16, leaf=256 << 20)     # 16^3 files of 256 MiB: 1 TiB in about 40 KB
    r = measure(tmp_path, F.message(F.attachment(bomb, "application/zip", filename="42.zip")))
    assert r["limits"] == ["archive_expansion_limit"]
    assert any(w.endswith("> 0.dll") for w, _, _ in r["files"])
    assert r["seconds"] < 10 and r["rss_growth"] < 16 * MiB and r["python_peak"] < 4 * MiB


@pytest.mark.parametrize("kind", ["plain", "zip"])
def test_a_50_mb_message_with_a_40_mb_attachment_is_walked_in_bounded_memory(tmp_path, kind):
    import os
    import zlib
    payload = os.urandom(40 * MiB)
    if kind == "zip":               # read whole: decoded to a temporary file, then listed by libarchive
        payload = F.zip_of([("data.bin", payload, zlib.crc32(payload), len(payload))], stored=True)
    msg = F.message(F.attachment(payload, filename=f"archive.{'zip' if kind == 'zip' else 'bin'}"))
    assert len(msg) > 50 * 10 ** 6
    r = measure(tmp_path, msg)
    assert r["problems"] == [] and r["files"][1][2] == len(payload)
    assert r["rss_growth"] < 8 * MiB and r["python_peak"] < 4 * MiB
    assert r["seconds"] < DEFAULTS.attachment_timeout


def test_the_benchmark_helper_times_a_walk():
    r = time_walk(F.message(F.attachment(F.pdf(), filename="a.pdf")), repeat=3)
    assert r["files"] == 2 and r["problems"] == [] and 0 < r["best"] <= r["median"] < 1


# ---- hostile encodings, boundaries and documents ---------------------------------------------------

class _Dribble(io.BytesIO):
    """A reader that hands out a few bytes at a time, so that every line and marker is split."""

    def read(self, n=-1):
        return super().read(7)


def test_a_uuencoded_file_split_across_reads_is_found_whole():
    import binascii
    exe = F.pe_exe()
    uu = b"begin 644 a.exe\r\n" + b"".join(binascii.b2a_uu(exe[i:i + 45]).replace(b"\n", b"\r\n")
                                         for i in range(0, len(exe), 45)) + b"`\r\nend\r\n"
    msg = b"Subject: x\r\n\r\n" + b"x" * 20000 + b"\r\nbegin here, nothing to see\r\n" + uu + b"tail\r\n"
    for reader in (io.BytesIO(msg), _Dribble(msg)):
        report = walk(reader, DEFAULTS)
        [embedded] = [f for f in report.files if f.name]
        assert embedded.name.sent == "a.exe" and embedded.size == len(exe) and embedded.detected_type == PE
        assert embedded.part == "1" and report.all_problems() == ()


def test_embedded_files_count_against_the_part_limit():
    msg = b"Subject: x\r\n\r\n" + b"".join(b"=ybegin line=128 size=1 name=%d.txt\r\nK\r\n=yend\r\n" % i
                                          for i in range(50))
    report = walked(msg, mime_part_limit=10)
    assert not report.complete and report.limits == ("mime_part_limit",)
    assert len(report.files) <= 10


def test_nested_base64_messages_are_walked_to_the_nesting_limit():
    msg = F.message(F.attachment(F.pe_exe(), filename="deep.exe"), boundary="b0")
    for level in range(1, 6):
        part = (b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n" + F.b64(msg))
        msg = F.message(part, boundary=f"b{level}")
    report = walked(msg)
    deep = next(f for f in report.files if f.name and f.name.sent == "deep.exe")
    assert deep.detected_type == PE and deep.part == "2.2.2.2.2.2"
    assert walked(msg, mime_nesting_limit=4).malformed and \
        not any(f.name and f.name.sent == "deep.exe" for f in walked(msg, mime_nesting_limit=4).files)


@pytest.mark.parametrize("line", [b"--\n", b"--x\r\n", b"--bx\n"])
def test_lines_that_only_look_like_boundaries_cost_no_time_and_hide_nothing(line):
    # every line starting with "--" used to cost a round of Python: 6 MB of them outlasted
    # attachment_timeout, and the executable after them went through as merely "unchecked"
    noise = line * (6_000_000 // len(line))
    msg = F.message(b"Content-Type: text/plain\r\n\r\n" + noise, F.attachment(F.pe_exe(), filename="a.exe"),
                    boundary="b")
    report = walked(msg, attachment_timeout=2.0)
    assert report.complete and report.limits == ()
    text, exe = attached(report)
    assert text.size == len(noise) and exe.name.sent == "a.exe" and exe.detected_type == PE


def _ole_entry_offset(doc: bytes, sid: int) -> int:
    """Where directory entry `sid` of a compound file built by attachment_files.ole lies."""
    import struct
    first_dir = struct.unpack_from("<I", doc, 0x30)[0]
    return 512 + first_dir * 512 + sid * 128


@pytest.mark.parametrize("link", [(1, 0x48, 1), (2, 0x4C, 0)], ids=["sibling loop", "child loop"])
def test_an_ole_directory_that_olefile_cannot_walk_still_shows_its_macros(link):
    # a loop in the directory's tree made olefile drop the branch holding Macros/VBA without a
    # word: the document read as "no macros, no problem"
    import struct
    doc = bytearray(F.doc_with_macros())
    sid, field, target = link                    # 0x48: right sibling, 0x4C: child
    struct.pack_into("<I", doc, _ole_entry_offset(doc, sid) + field, target)
    f = one(walked(F.message(F.attachment(bytes(doc), "application/msword", filename="old.doc"))))
    assert f.macros and UNREADABLE in kinds(f.problems)
