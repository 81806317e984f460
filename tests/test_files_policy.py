"""The [files] policy: parsing the rules and their actions, deciding per recipient on the facts of
real files built by the tests (attachment_files.py), and the attachment checks as an engine of the
pipeline: beside the others, bounded, never "clean" on a failure, cached as facts."""
import dataclasses
import io
import re
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

import attachment_files as F
from conftest import ROOT
from scanmilter import cli, config, headers as H, logs, policy as P, policyfile
from scanmilter.attachments import Limits, names as N, walk
from scanmilter.commands.explain import explain
from scanmilter.config import ConfigError
from scanmilter.message import Spool
from scanmilter.metrics import Metrics
from scanmilter.pipeline import Pipeline, scan_pool
from scanmilter.scancache import ScanCache
from scanmilter.scanners import CLEAN, DECIDED, OVERSIZE, ScanResult
from scanmilter.scanners import files as files_engine
from scanmilter.scanners.files import FilesScanner
from scanmilter.verdict import combine, safe_file_name

POOL = scan_pool(8)
OUTSIDE, INSIDE = "203.0.113.7", "127.0.0.1"
LIMITS = Limits.defaults()
PE = "application/vnd.microsoft.portable-executable"     # libmagic 5.44 (Debian 12)


def load(tmp_path, text, quarantine=False):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return policyfile.check(str(path), quarantine_available=quarantine)


def files_result(msg: bytes) -> ScanResult:
    return ScanResult("files", CLEAN, report=walk(io.BytesIO(msg), LIMITS))


def decide(msg: bytes, policy=None, rcpts=("bob@example.com",), client=OUTSIDE, score=1.0):
    results = [files_result(msg), ScanResult("clamd", CLEAN), ScanResult("spamd", CLEAN, score=score, required=5.0)]
    verdict = combine(results)
    outcome = P.decide(verdict, P.Envelope(client, "", "", "a@outside.test", tuple(rcpts)),
                       policy or policyfile.load(""))
    return verdict, outcome


def status(verdict, outcome) -> str:
    return dict(H.scan_headers(verdict, outcome)).get("X-Attachment-Status", "")


def rtlo_name() -> str:
    return "invoice\u202efdp.exe"          # shows as "invoiceexe.pdf"


# ---- parsing --------------------------------------------------------------------------------------

def test_the_shipped_default_policy_spells_out_the_builtin_rules_and_actions():
    shipped, warnings = policyfile.check(str(ROOT / "policies" / "default.toml"))
    builtin = policyfile.load("")
    assert warnings == []
    assert shipped.file_actions == builtin.file_actions
    assert [dataclasses.replace(r, where="") for r in shipped.file_rules] == \
        [dataclasses.replace(r, where="") for r in builtin.file_rules]
    assert [r.name for r in builtin.file_rules] == list(policyfile.DEFAULT_FILE_RULES)
    inbound, outbound = builtin.file_actions["inbound"], builtin.file_actions["outbound"]
    assert inbound["files.executable"] == inbound["files.script"] == inbound["files.disk-image"] == "reject"
    # outbound is more permissive: never refused, at most marked in the log and the metrics
    assert set(outbound.values()) <= {"tag", "accept"}


def test_the_name_tricks_a_rule_may_name_are_the_ones_the_normal_form_reports():
    assert set(policyfile.NAME_TRICKS) == {N.BIDI, N.INVISIBLE, N.CONTROL, N.TRAILING, N.COMPATIBILITY,
                                           N.MIXED_SCRIPTS, N.LOOKALIKE, N.DIRECTORY}


def test_rules_their_actions_and_overrides_per_direction_domain_and_recipient(tmp_path):
    policy, warnings = load(tmp_path, """
[files.rules.archives]
extensions = [".ZIP", "7z"]
names = ["*.tar.*"]
declared_types = ["application/x-zip*"]

[files.rules.executable]
extensions = ["exe"]

[inbound.files]
archives = "tag"
script = "accept"

[inbound.domains."lab.example.com".files]
executable = "tag"

[inbound.recipients."ceo@example.com".files]
archives = "discard"
""")
    assert warnings == []
    rule = next(r for r in policy.file_rules if r.name == "archives")
    assert rule.extensions == {"zip", "7z"} and rule.names == ("*.tar.*",) and rule.where.endswith("policy.toml:2")
    executable = next(r for r in policy.file_rules if r.name == "executable")
    assert executable.extensions == {"exe"} and not executable.detected_types     # replaced whole
    assert [r.name for r in policy.file_rules][-1] == "archives"                   # new rules after the built-in
    s = policy.scope("inbound", "x@lab.example.com")
    assert (s.values["files.executable"], s.origin["files.executable"]) == ("tag", '[inbound.domains."lab.example.com".files]')
    assert (s.values["files.archives"], s.origin["files.archives"]) == ("tag", "[inbound.files]")
    assert s.values["files.script"] == "accept" and s.values["files.disk-image"] == "reject"
    ceo = policy.scope("inbound", "CEO@example.com")
    assert (ceo.values["files.archives"], ceo.origin["files.archives"]) == ("discard", '[inbound.recipients."ceo@example.com".files]')
    assert policy.scope("outbound", "x@lab.example.com").values["files.archives"] == "accept"


@pytest.mark.parametrize("text, error", [
    ('[files]\nbanned = ["exe"]\n', "policy.toml:2: unknown key 'banned' in [files]"),
    ('[files.rules.Exe]\nextensions = ["exe"]\n', "rule name 'Exe'"),
    ('[files.rules.x]\nextension = ["exe"]\n', "policy.toml:2: unknown key 'extension' in [files.rules.x]"),
    ('[files.rules.x]\nextensions = "exe"\n', "policy.toml:2: extensions in [files.rules.x] must be a list"),
    ('[files.rules.x]\nextensions = ["*.exe"]\n', "'*.exe' is not an extension"),
    ('[files.rules.x]\ndetected_types = ["executable"]\n', "'executable' is not a content type"),
    ('[files.rules.x]\nname_tricks = ["rtlo"]\n', "unknown name trick 'rtlo'"),
    ('[files.rules.x]\ndescription = "nothing"\n', "[files.rules.x] matches nothing"),
    ('[files.rules.x]\nmacros = "yes"\n', "macros in [files.rules.x] must be true or false"),
    ('[inbound.files]\nexecutabel = "tag"\n', "policy.toml:2: no rule 'executabel' in [files.rules] (did you mean executable?)"),
    ('[inbound.files]\nexecutable = "tempfail"\n', "executable must be one of reject, quarantine, discard, tag, accept"),
    ('[inbound.recipients."a@example.com".files]\nscript = "bounce"\n', "policy.toml:2: script must be one of"),
    ('[inbound]\nmalformed_action = "accept"\n', "malformed_action must be one of tag, tempfail, reject, quarantine"),
    ('[inbound.files]\nexecutable = "quarantine"\n', 'policy.toml:2: executable = "quarantine" in [inbound] needs the quarantine store'),
    ('[outbound.domains."example.org"]\nlimit_action = "quarantine"\n', 'limit_action = "quarantine" in [outbound.domains."example.org"] needs'),
    ('[inbound]\nbanned_reply = "no {attachment}"\n', "bad placeholder ('attachment')"),
])
def test_mistakes_are_refused_with_file_and_line(tmp_path, text, error):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    assert error in str(e.value)


def test_quarantine_actions_load_with_a_store_and_a_rule_that_never_acts_is_a_warning(tmp_path):
    policy, warnings = load(tmp_path, '[files.rules.old]\nextensions = ["arj"]\n[inbound.files]\nexecutable = '
                                      '"quarantine"\n[inbound]\nunreadable_action = "quarantine"\n', quarantine=True)
    assert policy.file_actions["inbound"]["files.executable"] == "quarantine"
    assert warnings == [f"{tmp_path}/policy.toml:1: rule old has no action but accept in any [DIRECTION.files] "
                        "table: it never acts"]


def test_reply_texts_take_the_file_the_rule_and_the_problem(tmp_path):
    policy, _ = load(tmp_path, '[inbound]\nbanned_reply = "No {file} here, rule {rule} ({virus})"\n')
    _, outcome = decide(F.message(F.attachment(F.pe_exe(), filename="a.exe")), policy)
    assert outcome.reply == ("554", "5.7.1", "No a.exe here, rule executable (-)")


# ---- decisions on real files, default policy -------------------------------------------------------

REJECTED = {
    "exe renamed pdf": (F.message(F.attachment(F.pe_exe(), "application/pdf", filename='"invoice.pdf"')),
                        "invoice.pdf (executable)"),
    "double extension": (F.message(F.attachment(F.pe_exe(), "application/pdf", filename='"invoice.pdf.exe"')),
                         "invoice.pdf.exe (executable)"),
    "rtlo": (F.message(F.attachment(F.pdf(), "application/pdf", filename=f'"{rtlo_name()}"')),
             "invoice\\u202efdp.exe (executable)"),
    "rfc 2231": (F.message(F.attachment(F.pe_exe(), disposition="attachment; filename*0*=utf-8''Rechnung%20f%C3%BCr;"
                                        " filename*1*=%20M%C3%A4rz.pdf.exe")),
                 "Rechnung f\\xfcr M\\xe4rz.pdf.exe (executable)"),
    "zip holding js": (F.message(F.attachment(F.archive("zip", [("docs/readme.txt", b"hi\n"), ("docs/run.js", F.JS)]),
                                              "application/zip", filename="docs.zip")),
                       "docs.zip > docs/run.js (script)"),
    "zip in zip in 7z": (F.message(F.attachment(F.archive("7zip", [("middle.zip", F.archive("zip", [(
        "inner.zip", F.archive("zip", [("payload.exe", F.pe_exe())]))]))]), filename="outer.7z")),
        "outer.7z > middle.zip > inner.zip > payload.exe (executable)"),
    "iso holding exe": (F.message(F.attachment(F.archive("iso9660", [("SETUP.EXE", F.pe_exe())]), filename="disk.iso")),
                        "disk.iso (disk-image)"),
    "exe in a body part": (F.message(F.attachment(F.pe_exe(), "text/plain", disposition=None)),
                           "part 2 (executable)"),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_the_default_policy_rejects_executables_scripts_and_disk_images_inbound(case):
    msg, shown = REJECTED[case]
    verdict, outcome = decide(msg)
    assert (outcome.action, outcome.reason) == ("reject", "banned")
    assert outcome.reply == ("554", "5.7.1", f"Message rejected: banned attachment {shown}")
    assert outcome.reply[2].isascii() and outcome.reply[2].isprintable()
    # outbound (your own users): accepted, only marked
    _, out = decide(msg, client=INSIDE)
    assert (out.action, out.reason, out.direction) == ("accept", "banned", "outbound")


def test_encrypted_archives_and_macros_are_tagged_inbound_and_accepted_outbound():
    for msg, mark in [(F.message(F.attachment(F.zipcrypto([("notes.txt", b"x" * 100)]), "application/zip",
                                              filename="invoice.zip")), "encrypted: invoice.zip"),
                      (F.message(F.attachment(F.docm(), filename="report.docm")), "office-macros: report.docm")]:
        verdict, outcome = decide(msg)
        assert (outcome.action, outcome.reason, outcome.reply) == ("accept", "banned", None)
        assert status(verdict, outcome) == mark
        _, out = decide(msg, client=INSIDE)
        assert (out.action, out.reason) == ("accept", "ham")


def test_an_encrypted_zip_that_names_an_executable_is_rejected_by_the_name():
    msg = F.message(F.attachment(F.zipcrypto([("invoice.exe", F.pe_exe())]), "application/zip", filename="inv.zip"))
    _, outcome = decide(msg)
    assert outcome.reply[2] == "Message rejected: banned attachment inv.zip > invoice.exe (executable)"


def test_a_zip_bomb_is_refused_inbound_by_default_and_tagged_when_the_policy_says_so(tmp_path):
    """Past a limit the rest of the message is unseen, and a banned file could hide there."""
    msg = F.message(F.attachment(F.zip_bomb(1 << 30), "application/zip", filename="bomb.zip"))
    _, outcome = decide(msg)
    assert (outcome.action, outcome.reason) == ("reject", "unchecked")
    assert re.fullmatch(r"Message not accepted: attachment bomb\.zip could not be checked \(archive_\w+_limit\)",
                        outcome.reply[2]) and outcome.reply[:2] == ("554", "5.7.1")
    policy, _ = load(tmp_path, '[inbound.recipients."lenient@example.com"]\nlimit_action = "tag"\n'
                               '[inbound.recipients."later@example.com"]\nlimit_action = "tempfail"\n')
    verdict, outcome = decide(msg, policy, rcpts=("lenient@example.com",))
    assert (outcome.action, outcome.reason) == ("accept", "unchecked")
    assert re.fullmatch(r"unchecked: archive_(expansion|ratio)_limit in bomb\.zip", status(verdict, outcome))
    _, outcome = decide(msg, policy, rcpts=("later@example.com",))
    assert outcome.action == "tempfail" and outcome.reply[:2] == ("451", "4.7.1")


def test_malformed_mime_is_tagged_by_default_tempfailed_by_setting_never_no_attachment(tmp_path):
    broken = (b"From: a@outside.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
              b"--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
              b"TVqQ!!!AAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAA\r\n")       # bad base64, never closed
    verdict, outcome = decide(broken)
    assert (outcome.action, outcome.reason) == ("accept", "malformed")
    assert status(verdict, outcome).startswith("malformed: ")
    policy, _ = load(tmp_path, '[inbound]\nmalformed_action = "tempfail"\n')
    _, outcome = decide(broken, policy)
    assert (outcome.action, outcome.reason) == ("tempfail", "malformed")
    assert outcome.reply[:2] == ("451", "4.6.0") and outcome.reply[2].startswith("Message not accepted: malformed MIME (")


def test_clean_files_get_no_mark():
    msg = F.message(F.attachment(F.pdf(), "application/pdf", filename="report.pdf"),
                    F.attachment(F.png(), "image/png", filename="photo.png", disposition="inline"))
    verdict, outcome = decide(msg)
    assert (outcome.action, outcome.reason) == ("accept", "ham")
    assert "X-Attachment-Status" not in dict(H.scan_headers(verdict, outcome))
    assert outcome.recipients[0].files == ()


def test_a_per_recipient_override_changes_the_outcome(tmp_path):
    policy, _ = load(tmp_path, '[inbound.recipients."lab@example.com".files]\nexecutable = "tag"\n'
                               'encrypted = "reject"\n')
    exe = REJECTED["double extension"][0]
    assert decide(exe, policy)[1].action == "reject"
    verdict, outcome = decide(exe, policy, rcpts=("lab@example.com",))
    assert (outcome.action, outcome.reason) == ("accept", "banned")
    assert status(verdict, outcome) == "executable: invoice.pdf.exe"
    assert 'executable = "tag" from [inbound.recipients."lab@example.com".files]' in outcome.recipients[0].rule
    enc = F.message(F.attachment(F.zipcrypto([("a.txt", b"x")]), filename="a.zip"))
    assert decide(enc, policy)[1].action == "accept"
    _, outcome = decide(enc, policy, rcpts=("lab@example.com",))
    assert outcome.reply == ("554", "5.7.1", "Message rejected: banned attachment a.zip (encrypted)")
    # mixed recipients without a quarantine: a reject cannot be kept per recipient
    _, outcome = decide(enc, policy, rcpts=("bob@example.com", "lab@example.com"))
    assert outcome.action == "reject"


def test_the_strictest_matching_rule_decides_and_ties_go_to_the_first_file(tmp_path):
    policy, _ = load(tmp_path, '[inbound.files]\nscript = "discard"\n')
    msg = F.message(F.attachment(F.JS, filename="a.js"), F.attachment(F.pe_exe(), filename="b.exe"),
                    F.attachment(F.pe_exe(), filename="c.exe"))
    _, outcome = decide(msg, policy)
    assert outcome.action == "reject" and "b.exe (executable)" in outcome.reply[2]
    hits = outcome.recipients[0].files
    assert [(h.name, h.action) for h in hits] == [("executable", "reject"), ("executable", "reject"), ("script", "discard")]


def test_a_virus_decides_before_a_banned_file_and_spam_marks_stay_on_a_tagged_one():
    msg = F.message(F.attachment(F.docm(), filename="report.docm"))
    results = [files_result(msg), ScanResult("clamd", "found", viruses=("Eicar",)), ScanResult("spamd", CLEAN, score=0.0)]
    outcome = P.decide(combine(results), P.Envelope(OUTSIDE, recipients=("b@example.com",)), policyfile.load(""))
    assert outcome.reason == "virus"
    verdict, outcome = decide(msg, score=7.0)
    d = outcome.recipients[0]
    assert (d.action, d.reason, d.spam_flag, d.subject_tag) == ("accept", "banned", True, "[SPAM]")
    assert ("X-Spam-Flag", "YES") in H.scan_headers(verdict, outcome)


def test_allow_skips_virus_scan_skips_the_attachment_checks_too(tmp_path):
    policy, _ = load(tmp_path, '[lists]\nallow_senders = ["a@outside.test"]\nallow_skips_virus_scan = true\n')
    env = P.Envelope(OUTSIDE, "", "", "a@outside.test", ("bob@example.com",))
    assert P.checks_needed(env, policy) == set()
    assert P.checks_needed(dataclasses.replace(env, sender="x@y.test"), policy) == {"clamd", "files", "spamd"}
    _, outcome = decide(REJECTED["double extension"][0], policy)
    assert outcome.action == "accept" and "files: not checked (allow_skips_virus_scan)" in outcome.recipients[0].steps


# ---- what reaches replies, headers and logs -------------------------------------------------------

def test_names_are_made_safe_for_replies_headers_and_logs():
    hostile = "a\r\nX-Evil: 1\x00\u202e\u200b" + "é" * 300 + ", action=accept.exe"
    msg = F.message(F.attachment(F.pe_exe(), disposition="attachment; filename*=utf-8''"
                                 + "".join(f"%{b:02X}" for b in hostile.encode())))
    verdict, outcome = decide(msg)
    text = outcome.reply[2]
    assert text.isascii() and text.isprintable() and len(text) < 200
    assert "\\u202e" in text and "\\x00" in text and "..." in text
    line = logs.summary("Q1", outcome.action, outcome, verdict, "a@x", 1, 100, 5)
    field = re.search(r"banned=(\S+?), banned_rule=executable", line).group(1)
    assert "\\u202e" in field and "\\x0d\\x0a" in field and " " not in field and "," not in field
    assert line.isprintable() and "\n" not in line
    tagged = decide(msg, client=INSIDE)
    assert status(*tagged).isascii()
    assert safe_file_name("x" * 500).endswith("...") and len(safe_file_name("x" * 500)) == 100


def test_the_log_line_names_the_part_and_problems():
    verdict, outcome = decide(REJECTED["zip in zip in 7z"][0])
    line = logs.summary("Q1", outcome.action, outcome, verdict, "a@x", 1, 100, 5)
    assert "reason=banned" in line and "banned=outer.7z>middle.zip>inner.zip>payload.exe, banned_rule=executable" in line
    verdict, outcome = decide(F.message(F.attachment(F.zip_bomb(1 << 30), filename="bomb.zip")))
    line = logs.summary("Q2", outcome.action, outcome, verdict, "a@x", 1, 100, 5)
    assert re.search(r"reason=unchecked, .*file_problems=limit:archive_\w+_limit", line)


def test_forged_attachment_verdicts_are_stripped_like_the_others():
    assert "x-attachment-status".startswith(P.VERDICT_HEADER_PREFIXES)


# ---- explain -------------------------------------------------------------------------------------

def test_explain_lists_the_files_and_the_rule_that_decided():
    data = REJECTED["zip in zip in 7z"][0]
    engines = [FilesScanner(LIMITS)]
    env = P.Envelope(OUTSIDE, "", "", "a@outside.test", ("bob@example.com",))
    out = explain(data, env, policyfile.load(""), engines, 1 << 20, score=1.0)
    assert "  files: clean; 5 files;" in out
    assert '        2: "payload.exe": real application/vnd.microsoft.portable-executable' in out
    assert ("  files: rule executable matches 2: outer.7z > middle.zip > inner.zip > payload.exe (extension .exe); "
            'executable = "reject" from [inbound.files]') in out
    assert "SMTP reply: 554 5.7.1 Message rejected: banned attachment outer.7z > middle.zip > inner.zip > " \
           "payload.exe (executable)" in out


def test_explain_from_the_command_line_shows_an_override_that_turned_a_rule_off(tmp_path, capsys):
    (tmp_path / "m.eml").write_bytes(REJECTED["double extension"][0])
    (tmp_path / "p.toml").write_text('[inbound.recipients."lab@example.com".files]\nexecutable = "accept"\n')
    (tmp_path / "s.toml").write_text(f'policy_file = "{tmp_path}/p.toml"\n')
    assert cli.main(["explain", str(tmp_path / "m.eml"), "-c", str(tmp_path / "s.toml"), "--rcpt", "lab@example.com",
                     "--client-ip", OUTSIDE, "--score", "1"]) == 0
    out = capsys.readouterr().out
    assert 'settings from [inbound.recipients."lab@example.com".files], [inbound]' in out
    assert ('files: rule executable matches 2: invoice.pdf.exe (extension .exe); executable = "accept" from '
            '[inbound.recipients."lab@example.com".files]') in out
    assert "=> accept (ham)" in out


# ---- the attachment checks in the pipeline ---------------------------------------------------------

class Engine:
    def __init__(self, name, result, scan=None, timeout=5.0):
        self.name, self.result, self.timeout, self._scan = name, result, timeout, scan
        self.calls = 0

    def scan(self, spool):
        self.calls += 1
        if self._scan:
            self._scan()
        return self.result

    def ping(self):
        return ""


def spool_of(msg: bytes, limit: int = 1 << 30) -> Spool:
    s = Spool(1 << 20, limit)
    s.write(msg)
    return s


ENVELOPE = P.Envelope(OUTSIDE, "", "", "a@outside.test", ("bob@example.com",))
HAM = ScanResult("spamd", CLEAN, score=0.5, required=5.0)


def test_the_checks_run_beside_clamd_and_spamd_from_the_start():
    """clamd and spamd each wait for the walk to have started: run one after the other (or the
    walk after clamd's head start), they would give up after 5 s and say so."""
    walking = threading.Event()
    seen = []

    class Files(FilesScanner):
        def scan(self, spool):
            walking.set()
            return super().scan(spool)

    clamd = Engine("clamd", ScanResult("clamd", CLEAN), lambda: seen.append(("clamd", walking.wait(5))))
    spamd = Engine("spamd", HAM, lambda: seen.append(("spamd", walking.wait(5))))
    pipe = Pipeline([spamd, clamd, Files(LIMITS)], POOL, head_start=10.0)
    start = time.monotonic()
    inspection = pipe.inspect(spool_of(REJECTED["double extension"][0]), ENVELOPE, policyfile.load(""))
    assert sorted(seen) == [("clamd", True), ("spamd", True)] and time.monotonic() - start < 5
    assert (inspection.outcome.action, inspection.outcome.reason) == ("reject", "banned")


def test_a_virus_clamd_settles_still_gets_the_walk_that_already_started():
    virus = ScanResult("clamd", "found", viruses=("Eicar",))
    spamd = Engine("spamd", HAM)
    pipe = Pipeline([spamd, Engine("clamd", virus), FilesScanner(LIMITS)], POOL, head_start=1.0)
    inspection = pipe.inspect(spool_of(REJECTED["double extension"][0]), ENVELOPE, policyfile.load(""))
    assert spamd.calls == 0 and inspection.outcome.reason == "virus"
    assert inspection.verdict.files is not None and ("spamd", DECIDED) in inspection.verdict.skipped


def test_a_failure_of_the_walk_is_a_scan_failure_never_clean(monkeypatch):
    def broken(*a, **kw):
        raise MemoryError("libarchive ran out")
    monkeypatch.setattr(files_engine, "walk", broken)
    pipe = Pipeline([Engine("clamd", ScanResult("clamd", CLEAN)), FilesScanner(LIMITS)], POOL)
    inspection = pipe.inspect(spool_of(REJECTED["double extension"][0]), ENVELOPE, policyfile.load(""))
    assert inspection.verdict.failed == (("files", "failed: MemoryError: libarchive ran out"),)
    assert (inspection.outcome.action, inspection.outcome.reason) == ("tempfail", "scan-error")
    assert inspection.outcome.reply == ("451", "4.7.1", "Message could not be scanned, please try again later")
    # failing open: accepted, marked unchecked, never passed as checked
    policy = policyfile.load("")
    policy = dataclasses.replace(policy, directions={**policy.directions,
                                                     "inbound": {**policy.directions["inbound"], "scan_failure_action": "accept"}})
    inspection = pipe.inspect(spool_of(REJECTED["double extension"][0]), ENVELOPE, policy)
    assert (inspection.outcome.action, inspection.outcome.reason) == ("accept", "scan-error")
    assert ("X-Attachment-Status", "unchecked (failed)") in H.scan_headers(inspection.verdict, inspection.outcome)


def test_a_walk_stuck_past_its_deadline_is_a_timeout(monkeypatch):
    release = threading.Event()

    def stuck(*a, **kw):
        release.wait(30)
        raise RuntimeError("released")
    monkeypatch.setattr(files_engine, "walk", stuck)
    pipe = Pipeline([Engine("clamd", ScanResult("clamd", CLEAN)), FilesScanner(dataclasses.replace(
        LIMITS, attachment_timeout=0.2))], POOL)
    start = time.monotonic()
    try:
        inspection = pipe.inspect(spool_of(REJECTED["double extension"][0]), ENVELOPE, policyfile.load(""))
    finally:
        release.set()
    assert time.monotonic() - start < 0.2 + 1.0 + 1.0           # attachment_timeout + the pipeline's grace
    assert inspection.verdict.failed[0][0] == "files" and inspection.verdict.failed[0][1].startswith("timeout")
    assert inspection.outcome.action == "tempfail"


def test_an_oversize_spool_is_not_walked_and_gets_oversize_action():
    files = FilesScanner(LIMITS)
    pipe = Pipeline([Engine("clamd", ScanResult("clamd", CLEAN)), files], POOL)
    msg = REJECTED["double extension"][0]
    inspection = pipe.inspect(spool_of(msg, limit=len(msg) // 2), ENVELOPE, policyfile.load(""))
    assert ("files", OVERSIZE) in inspection.verdict.skipped and inspection.verdict.files is None
    assert (inspection.outcome.action, inspection.outcome.reason) == ("accept", "oversize")
    assert ("X-Attachment-Status", "unchecked (oversize)") in H.scan_headers(inspection.verdict, inspection.outcome)


def test_the_cache_keeps_facts_and_the_policy_in_force_judges_them(tmp_path):
    walks = []

    class Files(FilesScanner):
        def scan(self, spool):
            walks.append(1)
            return super().scan(spool)

    pipe = Pipeline([Engine("clamd", ScanResult("clamd", CLEAN)), Files(LIMITS)], POOL, cache=ScanCache(60, 100))
    msg = REJECTED["double extension"][0]
    first = pipe.inspect(spool_of(msg), ENVELOPE, policyfile.load(""), key=b"k")
    relaxed, _ = load(tmp_path, '[inbound.files]\nexecutable = "accept"\n')
    again = pipe.inspect(spool_of(msg), ENVELOPE, relaxed, key=b"k")
    assert len(walks) == 1 and "files" in again.verdict.cached
    assert (first.outcome.action, again.outcome.action, again.outcome.reason) == ("reject", "accept", "ham")
    # a walk cut short by attachment_timeout is not kept: it says how busy the host was
    slow = Pipeline([Files(dataclasses.replace(LIMITS, attachment_timeout=1e-9))], POOL, cache=ScanCache(60, 100))
    slow.inspect(spool_of(msg), ENVELOPE, policyfile.load(""), key=b"t")
    slow.inspect(spool_of(msg), ENVELOPE, policyfile.load(""), key=b"t")
    assert len(walks) == 3


def test_rule_hits_and_problems_are_counted_per_message():
    m = Metrics(CollectorRegistry())
    pipe = Pipeline([FilesScanner(LIMITS)], POOL, metrics=m)
    msg = F.message(F.attachment(F.pe_exe(), filename="a.exe"), F.attachment(F.pe_exe(), filename="b.exe"),
                    F.attachment(F.zipcrypto([("x.txt", b"x")]), filename="x.zip"))
    pipe.inspect(spool_of(msg), P.Envelope(OUTSIDE, recipients=("a@example.com", "b@example.com")), policyfile.load(""))
    value = m.registry.get_sample_value
    assert value("scanmilter_file_rule_hits_total", {"rule": "executable", "action": "reject"}) == 1
    assert value("scanmilter_file_rule_hits_total", {"rule": "encrypted", "action": "tag"}) == 1
    assert value("scanmilter_attachment_problems_total", {"kind": "encrypted"}) == 1
    assert value("scanmilter_scans_total", {"engine": "files", "outcome": "clean"}) == 1


def test_the_engine_is_built_from_the_settings_and_can_be_turned_off(tmp_path):
    from scanmilter import scanners
    path = tmp_path / "s.toml"
    path.write_text("attachment_timeout = 3.5\narchive_depth_limit = 2\n")
    [files] = [e for e in scanners.from_settings(config.load(str(path))) if e.name == "files"]
    assert files.timeout == 3.5 and files.limits.archive_depth_limit == 2 and files.ping() == ""
    path.write_text("files_enabled = false\n")
    assert "files" not in [e.name for e in scanners.from_settings(config.load(str(path)))]


def test_long_text_keeps_its_type_when_libmagic_reads_only_its_start():
    script = b"#!/bin/sh\n" + b"echo hello world\n" * 10000
    html = b"<!DOCTYPE html>\n<html><head><title>x</title></head><body>\n" + b"<p>hello</p>\n" * 10000
    report = walk(io.BytesIO(F.message(F.attachment(script, "text/plain", filename="run.txt"),
                                       F.attachment(html, "text/html", filename="page.htm"))), LIMITS)
    assert [f.detected_type for f in report.files[1:]] == ["text/x-shellscript", "text/html"]


# ---- ways around the checks, each through the default policy -------------------------------------

JSCRIPT = b'var shell = new ActiveXObject("WScript.Shell");\r\nshell.Run("calc.exe");\r\n'


def test_a_zip_whose_central_directory_names_a_script_its_local_header_hides_is_rejected():
    # Windows Explorer and 7-Zip list and extract by the central directory's name; libarchive
    # reads the local header's: "readme.txt" there, "invoice.js" for the recipient
    hidden = F.zip_names([(b"readme.txt", b"invoice.js", JSCRIPT, b"")])
    verdict, outcome = decide(F.message(F.attachment(hidden, filename="docs.zip")))
    assert (outcome.action, outcome.reason) == ("reject", "banned")
    assert "docs.zip > invoice.js" in outcome.reply[2] and "(script)" in outcome.reply[2]
    assert [f.name.sent for f in verdict.files.files if f.container] == ["readme.txt", "invoice.js"]
    assert any("central directory" in p.detail for p in verdict.files.all_problems() if p.kind == "malformed")


def test_a_unicode_path_field_in_the_central_directory_is_a_name_too():
    extra = F.unicode_path_field("invoice.js", b"readme.txt")
    hidden = F.zip_names([(b"readme.txt", b"readme.txt", JSCRIPT, extra)])
    verdict, outcome = decide(F.message(F.attachment(hidden, filename="docs.zip")))
    assert (outcome.action, outcome.reason) == ("reject", "banned") and "invoice.js" in outcome.reply[2]


def test_members_after_an_archive_limit_are_still_judged_by_their_names():
    # a member that trips archive_ratio_limit first used to end the listing: the script after it
    # was never seen and the message was only tagged "unchecked"
    zeros, crc = F.deflated_zeros(4 << 20)
    packed, js_crc, js_size = F.deflated(JSCRIPT)
    bomb_first = F.zip_of([("zeros.txt", zeros, crc, 4 << 20), ("invoice.js", packed, js_crc, js_size)])
    verdict, outcome = decide(F.message(F.attachment(bomb_first, filename="docs.zip")))
    assert (outcome.action, outcome.reason) == ("reject", "banned") and "invoice.js" in outcome.reply[2]
    js = next(f for f in verdict.files.files if f.name and f.name.sent == "invoice.js")
    assert [str(p) for p in js.problems] == ["limit: archive_ratio_limit"]      # named, never read
    assert verdict.files.limits == ("archive_ratio_limit",)


@pytest.mark.parametrize("encode", [F.uuencoded, lambda n, d: F.uuencoded(n, d, True), F.yencoded],
                         ids=["uuencode", "uuencode -m", "yenc"])
def test_a_file_encoded_inside_a_plain_text_body_is_judged_like_an_attachment(encode):
    # mail clients show "begin 644 NAME" (and yEnc's "=ybegin ... name=") in a text/plain body as an
    # attachment: the walker saw only text, and the message went through as ham
    body = b"Hello,\r\nthe invoice is attached.\r\n\r\n" + encode("invoice.pdf.exe", F.pe_exe()) + b"\r\nBye\r\n"
    single = b"From: a@outside.test\r\nSubject: invoice\r\nContent-Type: text/plain\r\n\r\n" + body
    for msg in (single, F.message(b"Content-Type: text/plain; charset=us-ascii\r\n\r\n" + body)):
        verdict, outcome = decide(msg)
        assert (outcome.action, outcome.reason) == ("reject", "banned"), outcome
        exe = next(f for f in verdict.files.files if f.name and f.name.sent == "invoice.pdf.exe")
        assert exe.detected_type == PE
    script = b"From: a@outside.test\r\nSubject: x\r\n\r\nsee below\r\n" + encode("readme.txt", b"WScript.Echo 1\r\n")
    assert decide(script)[1].action == "accept"        # an innocent name and text content stay innocent


def test_a_base64_encoded_attached_message_is_looked_into():
    # message/rfc822 may only be 7bit, 8bit or binary (RFC 2046), yet mail clients open a base64
    # one; its attachments were never seen and the message was only tagged "malformed"
    inner = F.message(F.attachment(F.pe_exe(), filename="inner.exe"), boundary="inner")
    for encoding, body in (("base64", F.b64(inner)),
                           ("quoted-printable", __import__("quopri").encodestring(inner.replace(b"\r\n", b"\n"))
                            .replace(b"\n", b"\r\n"))):
        part = (f"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: {encoding}\r\n"
                "Content-Disposition: attachment\r\n\r\n").encode() + body
        verdict, outcome = decide(F.message(part))
        assert (outcome.action, outcome.reason) == ("reject", "banned"), (encoding, outcome)
        exe = next(f for f in verdict.files.files if f.name and f.name.sent == "inner.exe")
        assert exe.part == "2.2" and exe.detected_type == PE
        assert any("transfer encoding" in p for p in verdict.files.malformed)     # still not what RFC 2046 allows


@pytest.mark.parametrize("encoding", ["x-uuencode", "uuencode", "x-uue"])
def test_a_part_in_a_uuencode_transfer_encoding_is_decoded_and_judged(encoding):
    # Thunderbird decodes these Content-Transfer-Encodings; the walker passed the encoded text to
    # libmagic ("begin 644 ..." is text) and the executable inside was merely "malformed"
    part = (f"Content-Type: application/pdf; name=invoice.pdf\r\nContent-Transfer-Encoding: {encoding}\r\n"
            "Content-Disposition: attachment; filename=invoice.pdf\r\n\r\n").encode() + F.uuencoded("invoice.pdf", F.pe_exe())
    verdict, outcome = decide(F.message(part))
    assert (outcome.action, outcome.reason) == ("reject", "banned"), outcome
    assert any(f.detected_type == PE for f in verdict.files.files)


def _symlink_zip(name: bytes, target: bytes) -> bytes:
    """A zip whose one member is a Unix symlink: its data is the link's target."""
    import struct
    packed, crc, size = F.deflated(target)
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(packed), size, len(name), 0) + name
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, (3 << 8) | 20, 20, 0, 8, 0, 0, crc, len(packed), size,
                          len(name), 0, 0, 0, 0, 0o120777 << 16, 0) + name
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local) + len(packed), 0)
    return local + packed + central + end


def _symlink_tar(name: str, target: str) -> bytes:
    import tarfile
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = tarfile.SYMTYPE, target
        tar.addfile(info)
    return out.getvalue()


@pytest.mark.parametrize("archive", ["zip", "tar"])
def test_a_link_member_is_judged_like_a_file(archive):
    # libarchive reports a symlink, and the walk skipped every member that was not a regular file;
    # Windows Explorer (zip) and 7-Zip (tar) ignore the Unix mode and write invoice.js with the
    # "target" as its content: a script
    target = F.JS.decode()
    data = (_symlink_zip(b"invoice.js", F.JS) if archive == "zip" else _symlink_tar("invoice.js", target))
    verdict, outcome = decide(F.message(F.attachment(data, filename=f"docs.{archive}")))
    assert (outcome.action, outcome.reason) == ("reject", "banned"), outcome
    assert f"docs.{archive} > invoice.js (script)" in outcome.reply[2]
    link = next(f for f in verdict.files.files if f.container)
    assert link.size == len(F.JS) and link.problems == ()          # listed by libarchive, with its content


def test_a_banned_file_hidden_past_the_part_limit_is_refused_by_default(tmp_path):
    """500 empty parts, then a script: the walk stops at mime_part_limit and never sees the script.
    What lies past a limit is unseen, so the inbound default refuses the message rather than
    passing it tagged."""
    filler = [F.attachment(b"", "text/plain", filename=f"p{i}.txt") for i in range(LIMITS.mime_part_limit + 10)]
    msg = F.message(*filler, F.attachment(b'WScript.Echo "hi"\r\n', "text/plain", filename="run.vbs"))
    verdict, outcome = decide(msg)
    assert not any(f.name and f.name.normal == "run.vbs" for f in verdict.files.files)     # never seen
    assert (outcome.action, outcome.reason) == ("reject", "unchecked"), outcome
    assert outcome.reply[:2] == ("554", "5.7.1") and "mime_part_limit" in outcome.reply[2]
