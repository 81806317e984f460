import pytest

from scanmilter import config, policy as P
from scanmilter.scanners import ScanResult
from scanmilter.verdict import combine, safe_name

POLICY = config.load_policy("")


def clamd(outcome="clean", virus=None, detail=""):
    return ScanResult("clamd", outcome, detail, viruses=(virus,) if virus else ())


def spamd(score=0.0, rules=(), outcome=None, detail=""):
    if outcome:
        return ScanResult("spamd", outcome, detail)
    return ScanResult("spamd", "found" if score >= 5 else "clean", score=score, required=5.0, rules=rules)


def decide(*results, oversize=False, **changes):
    pol = config.parse(config.POLICY_SETTINGS, changes, "test") if changes else POLICY
    return P.decide(combine(list(results), oversize), pol)


def headers(d):
    return dict(d.headers)


def test_clean_ham_is_accepted_with_both_status_headers():
    d = decide(spamd(1.2, ("ALL_TRUSTED",)), clamd())
    assert (d.action, d.reason, d.subject_tag) == ("accept", "ham", "")
    assert headers(d) == {"X-Virus-Status": "clean",
                          "X-Spam-Status": "No, score=1.2 required=5.0 tests=ALL_TRUSTED"}


def test_virus_is_rejected_naming_it():
    d = decide(spamd(0.0), clamd("found", "Eicar-Test-Signature.UNOFFICIAL"))
    assert d.action == "reject"
    assert d.reply == ("550", "5.7.1", "Message rejected: virus Eicar-Test-Signature.UNOFFICIAL found")


def test_virus_beats_a_spamd_failure():
    d = decide(spamd(outcome="error", detail="timeout: x"), clamd("found", "V"))
    assert d.action == "reject" and d.reason == "virus"


def test_spam_over_reject_level_is_rejected():
    d = decide(spamd(1000.0, ("GTUBE",)), clamd())
    assert d.action == "reject" and d.reply[:2] == ("550", "5.7.1") and "1000.0" in d.reply[2]


def test_spam_between_tag_and_reject_is_tagged():
    d = decide(spamd(8.0, ("A", "B")), clamd())
    assert (d.action, d.reason, d.subject_tag) == ("accept", "tagged", "[SPAM]")
    assert headers(d)["X-Spam-Flag"] == "YES"
    assert headers(d)["X-Spam-Status"] == "Yes, score=8.0 required=5.0 tests=A,B"


def test_tag_level_can_follow_spamd():
    res = ScanResult("spamd", "clean", score=4.0, required=3.0)
    d = P.decide(combine([res]), config.parse(config.POLICY_SETTINGS, {"tag_level": "spamd"}, "t"))
    assert d.reason == "tagged" and "required=3.0" in headers(d)["X-Spam-Status"]


@pytest.mark.parametrize("failing", ["clamd", "spamd"])
def test_scan_failure_tempfails_by_default_never_clean(failing):
    results = [clamd("error", detail="refused: x") if failing == "clamd" else clamd(),
               spamd(outcome="error", detail="timeout: y") if failing == "spamd" else spamd(0.0)]
    d = decide(*results)
    assert d.action == "tempfail" and d.reply[:2] == ("451", "4.7.1")


def test_scan_failure_accept_marks_unscanned():
    d = decide(spamd(0.5), clamd("error", detail="refused: no socket"), scan_failure_action="accept")
    assert d.action == "accept" and headers(d)["X-Virus-Status"] == "unscanned (refused)"
    assert headers(d)["X-Spam-Status"].startswith("No, score=0.5")


def test_oversize_actions():
    results = [ScanResult("spamd", "skipped", "oversize"), ScanResult("clamd", "skipped", "oversize")]
    tag = decide(*results, oversize=True)
    assert tag.action == "accept" and headers(tag) == {"X-Virus-Status": "unscanned (oversize)",
                                                       "X-Spam-Status": "unscanned (oversize)"}
    assert decide(*results, oversize=True, oversize_action="skip").headers == ()
    rej = decide(*results, oversize=True, oversize_action="reject")
    assert rej.action == "reject" and rej.reply[:2] == ("552", "5.3.4")


def test_spamd_skipped_for_size_still_gets_virus_verdict():
    d = decide(ScanResult("spamd", "skipped", "size"), clamd())
    assert d.action == "accept" and headers(d) == {"X-Virus-Status": "clean",
                                                   "X-Spam-Status": "unscanned (size)"}


def test_disabled_engine_adds_no_header():
    assert headers(decide(clamd())) == {"X-Virus-Status": "clean"}


def test_virus_accept_action_tags_infected():
    d = decide(clamd("found", "Heuristics.X"), virus_action="accept")
    assert d.action == "accept" and headers(d)["X-Virus-Status"] == "infected (Heuristics.X)"


def test_hostile_names_are_neutralised():
    d = decide(clamd("found", "Evil\r\nX-Spam-Flag: NO"), virus_action="accept")
    assert "\r" not in headers(d)["X-Virus-Status"] and "\n" not in headers(d)["X-Virus-Status"]
    assert safe_name("a b%c\x1b[0m") == "a_b_c__0m"


@pytest.mark.parametrize("subject, expected", [
    (" Hello", "[SPAM] Hello"),
    (" [SPAM] Hello", None),
    (None, "[SPAM]"),
    (" =?utf-8?q?Gr=C3=BC=C3=9Fe?=", "[SPAM] =?utf-8?q?Gr=C3=BC=C3=9Fe?="),
    ("", "[SPAM]"),
])
def test_subject_is_tagged_once(subject, expected):
    assert P.tag_subject(subject, "[SPAM]") == expected


def test_empty_tag_leaves_the_subject():
    assert P.tag_subject(" Hello", "") is None
