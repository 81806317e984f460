"""Rule resolution: facts + policy -> one decision per recipient -> one outcome per message."""
import math

import pytest
from hypothesis import given, settings, strategies as st

from scanmilter import policy as P, policyfile
from scanmilter.scanners import ScanResult
from scanmilter.verdict import combine

DEFAULT = policyfile.load("")
OUTSIDE = P.Envelope("203.0.113.7", "", "smtpd", "alice@outside.test", ("bob@example.com",))
INSIDE = P.Envelope("127.0.0.1", "", "smtpd", "carol@example.com", ("dave@elsewhere.test",))


def policy_from(tmp_path, text):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return policyfile.load(str(path))


def clamd(outcome="clean", virus=None, detail=""):
    return ScanResult("clamd", outcome, detail, viruses=(virus,) if virus else ())


def spamd(score=0.0, rules=(), outcome=None, detail=""):
    if outcome:
        return ScanResult("spamd", outcome, detail)
    return ScanResult("spamd", "found" if score >= 5 else "clean", score=score, required=5.0, rules=rules)


def decide(*results, env=OUTSIDE, policy=DEFAULT, oversize=False):
    return P.decide(combine(list(results), oversize), env, policy)


# --- directions

@pytest.mark.parametrize("env, direction", [
    (P.Envelope("203.0.113.7"), "inbound"),
    (P.Envelope("127.0.0.1"), "outbound"),
    (P.Envelope("::1"), "outbound"),
    (P.Envelope("::ffff:127.0.0.1"), "outbound"),
    (P.Envelope("203.0.113.7", auth_user="carol"), "outbound"),
    (P.Envelope("2001:db8::1"), "inbound"),
    (P.Envelope(""), "inbound"),
])
def test_direction(env, direction):
    assert P.direction_of(env, DEFAULT)[0] == direction


def test_direction_by_service_and_networks(tmp_path):
    pol = policy_from(tmp_path, '[directions]\ninternal_networks = ["10.0.0.0/8", "2001:db8::/32"]\n'
                                'outbound_services = ["submission"]\nauthenticated_is_outbound = false\n')
    assert P.direction_of(P.Envelope("10.1.2.3"), pol)[0] == "outbound"
    assert P.direction_of(P.Envelope("2001:db8::5"), pol)[0] == "outbound"
    assert P.direction_of(P.Envelope("127.0.0.1"), pol)[0] == "inbound"
    assert P.direction_of(P.Envelope("203.0.113.7", auth_user="x"), pol)[0] == "inbound"
    assert P.direction_of(P.Envelope("203.0.113.7", daemon_name="submission"), pol)[0] == "outbound"


# --- the default policy

def test_inbound_ham_is_accepted():
    out = decide(spamd(1.2), clamd())
    assert (out.action, out.reason, out.direction) == ("accept", "ham", "inbound")


def test_inbound_virus_is_rejected_naming_it():
    out = decide(spamd(0.0), clamd("found", "Eicar-Test-Signature.UNOFFICIAL"))
    assert out.action == "reject"
    assert out.reply == ("550", "5.7.1", "Message rejected: virus Eicar-Test-Signature.UNOFFICIAL found")


def test_inbound_spam_levels():
    assert decide(spamd(1000.0), clamd()).reply == ("550", "5.7.1", "Message rejected as spam (score 1000.0, limit 15.0)")
    tagged = decide(spamd(8.0), clamd())
    lead = tagged.headers_from
    assert (tagged.action, tagged.reason, lead.spam_flag, lead.subject_tag) == ("accept", "tagged", True, "[SPAM]")


def test_outbound_rejects_with_a_message_for_the_local_user_and_never_tags():
    out = decide(spamd(12.0), clamd(), env=INSIDE)
    assert out.action == "reject" and out.reply[2].startswith("Your message was not sent: it looks like spam")
    tagged = decide(spamd(7.0), clamd(), env=INSIDE)
    assert tagged.action == "accept" and tagged.headers_from.subject_tag == ""
    assert tagged.headers_from.scope.add_scan_headers is False
    virus = decide(spamd(0.0), clamd("found", "W32.Bad"), env=INSIDE)
    assert virus.reply[2] == "Your message was not sent: it contains a virus (W32.Bad); please contact your postmaster"


@pytest.mark.parametrize("failing", ["clamd", "spamd"])
def test_scan_failure_tempfails_never_clean(failing):
    results = [clamd("error", detail="refused: x") if failing == "clamd" else clamd(),
               spamd(outcome="error", detail="timeout: y") if failing == "spamd" else spamd(0.0)]
    out = decide(*results)
    assert out.action == "tempfail" and out.reply[:2] == ("451", "4.7.1")


def test_virus_beats_a_spamd_failure():
    assert decide(spamd(outcome="error", detail="timeout: x"), clamd("found", "V")).reason == "virus"


def test_oversize():
    results = [ScanResult("spamd", "skipped", "oversize"), ScanResult("clamd", "skipped", "oversize")]
    assert decide(*results, oversize=True).action == "accept"


# --- overrides, most specific wins

OVERRIDES = """
[inbound]
reject_level = 15.0
[inbound.domains."example.com"]
reject_level = 10.0
tag_level = 4.0
subject_tag_level = 4.0
[inbound.recipients."abuse@example.com"]
reject_level = 1000.0
"""


def test_most_specific_rule_wins(tmp_path):
    pol = policy_from(tmp_path, OVERRIDES)
    s = pol.scope("inbound", "abuse@example.com")
    assert (s.reject_level, s.tag_level) == (1000.0, 4.0)
    assert s.origin["reject_level"] == '[inbound.recipients."abuse@example.com"]'
    assert s.origin["tag_level"] == '[inbound.domains."example.com"]'
    assert pol.scope("inbound", "Bob@Example.COM").reject_level == 10.0
    assert pol.scope("inbound", "x@other.test").reject_level == 15.0
    assert pol.scope("outbound", "bob@example.com").reject_level == 10.0   # outbound's own default


def test_mixed_recipients_without_quarantine_reject_for_all(tmp_path):
    pol = policy_from(tmp_path, OVERRIDES)
    env = P.Envelope("203.0.113.7", "", "", "a@outside.test", ("abuse@example.com", "bob@example.com"))
    out = decide(spamd(12.0), clamd(), env=env, policy=pol)
    assert [d.action for d in out.recipients] == ["accept", "reject"]
    assert out.action == "reject" and "rejected for all" in out.note


def test_mixed_recipients_with_quarantine_are_split(tmp_path):
    import dataclasses
    pol = dataclasses.replace(policy_from(tmp_path, OVERRIDES), quarantine_available=True)
    env = P.Envelope("203.0.113.7", "", "", "a@outside.test", ("abuse@example.com", "bob@example.com"))
    out = decide(spamd(12.0), clamd(), env=env, policy=pol)
    assert out.action == "accept" and out.remove == ("bob@example.com",) and out.quarantine == ("bob@example.com",)
    assert out.headers_from.recipient == "abuse@example.com"


def test_mixed_tag_levels_take_the_most_cautious_headers(tmp_path):
    pol = policy_from(tmp_path, OVERRIDES)
    env = P.Envelope("203.0.113.7", "", "", "a@outside.test", ("x@other.test", "bob@example.com"))
    out = decide(spamd(4.5), clamd(), env=env, policy=pol)
    assert out.action == "accept" and out.remove == ()
    assert out.headers_from.recipient == "bob@example.com" and out.headers_from.subject_tag == "[SPAM]"


def test_one_tempfail_tempfails_all(tmp_path):
    pol = policy_from(tmp_path, '[inbound.domains."strict.test"]\nscan_failure_action = "tempfail"\n'
                                '[inbound]\nscan_failure_action = "accept"\n')
    env = P.Envelope("203.0.113.7", "", "", "a@o.test", ("a@strict.test", "b@lax.test"))
    out = decide(spamd(outcome="error", detail="timeout: x"), clamd(), env=env, policy=pol)
    assert out.action == "tempfail" and out.reply[0] == "451"


def test_discard_for_one_recipient_removes_only_that_one(tmp_path):
    pol = policy_from(tmp_path, '[inbound.recipients."trap@example.com"]\nvirus_action = "discard"\n'
                                '[inbound]\nvirus_action = "tag"\n')
    env = P.Envelope("203.0.113.7", "", "", "a@o.test", ("trap@example.com", "bob@example.com"))
    out = decide(spamd(0.0), clamd("found", "V"), env=env, policy=pol)
    assert out.action == "accept" and out.remove == ("trap@example.com",) and out.quarantine == ()


# --- lists

LISTS = """
[lists]
allow_senders = ["@partner.test", "news@letters.test"]
allow_clients = ["198.51.100.0/24"]
allow_recipients = ["spamlover@example.com"]
block_senders = ["spammer.test"]
block_clients = ["192.0.2.0/28"]
"""


def test_block_lists_reject(tmp_path):
    pol = policy_from(tmp_path, LISTS)
    for env in (P.Envelope("203.0.113.7", sender="x@spammer.test", recipients=("b@example.com",)),
                P.Envelope("192.0.2.5", sender="a@o.test", recipients=("b@example.com",))):
        out = decide(spamd(0.0), clamd(), env=env, policy=pol)
        assert (out.action, out.reason, out.reply[2]) == ("reject", "blocked", "Message rejected by policy")


def test_allow_listed_sender_skips_spam_but_not_viruses(tmp_path):
    pol = policy_from(tmp_path, LISTS)
    env = P.Envelope("203.0.113.7", sender="anyone@partner.test", recipients=("b@example.com",))
    assert P.engines_needed(env, pol) == {"clamd"}
    assert decide(clamd(), env=env, policy=pol).reason == "allowed"
    assert decide(clamd("found", "V"), env=env, policy=pol).action == "reject"


def test_allow_senders_clients_stops_a_forged_sender_buying_an_exemption(tmp_path):
    pol = policy_from(tmp_path, LISTS + 'allow_senders_clients = ["192.0.2.64/26"]\n')
    spam = spamd(20.0)
    forged = P.Envelope("203.0.113.7", sender="anyone@partner.test", recipients=("b@example.com",))
    assert P.engines_needed(forged, pol) == {"clamd", "spamd"}
    assert decide(spam, clamd(), env=forged, policy=pol).action == "reject"
    for env in (P.Envelope("192.0.2.70", sender="anyone@partner.test", recipients=("b@example.com",)),
                P.Envelope("203.0.113.7", auth_user="partner", sender="anyone@partner.test",
                           recipients=("b@example.com",))):
        out = decide(clamd(), env=env, policy=pol)
        assert out.reason == "allowed" and P.engines_needed(env, pol) == {"clamd"}, env
    # without the setting the envelope sender alone is enough, as documented
    assert decide(clamd(), env=forged, policy=policy_from(tmp_path, LISTS)).reason == "allowed"


def test_an_engine_skipped_for_its_size_makes_the_message_oversize(tmp_path):
    strict = policy_from(tmp_path, '[inbound]\noversize_action = "reject"\n')
    for skipped in (ScanResult("clamd", "skipped", "size"), ScanResult("clamd", "skipped", "limits")):
        out = decide(spamd(0.0), skipped, policy=strict)
        assert (out.action, out.reason, out.reply[:2]) == ("reject", "oversize", ("552", "5.3.4")), skipped
        assert decide(spamd(0.0), skipped).reason == "oversize"            # default: accepted, marked
    out = decide(ScanResult("spamd", "skipped", "size"), clamd(), policy=strict)
    assert out.action == "reject" and out.reason == "oversize"
    # a skip that is not about size changes nothing
    assert decide(ScanResult("spamd", "skipped", "decided"), clamd(), policy=strict).action == "accept"


def test_allow_can_skip_virus_scan_only_when_said(tmp_path):
    pol = policy_from(tmp_path, LISTS + "allow_skips_virus_scan = true\n")
    env = P.Envelope("198.51.100.9", sender="a@o.test", recipients=("b@example.com",))
    assert P.engines_needed(env, pol) == set()


def test_allow_listed_recipient_still_scanned_for_the_others(tmp_path):
    pol = policy_from(tmp_path, LISTS)
    env = P.Envelope("203.0.113.7", sender="a@o.test", recipients=("spamlover@example.com", "b@example.com"))
    assert P.engines_needed(env, pol) == {"clamd", "spamd"}
    out = decide(spamd(20.0), clamd(), env=env, policy=pol)
    assert [d.action for d in out.recipients] == ["accept", "reject"]


# --- virus classes

def test_virus_classes_exact_beats_longest_pattern_beats_default(tmp_path):
    pol = policy_from(tmp_path, '[virus_classes]\n"Heuristics.*" = "tag"\n"Heuristics.Phishing.*" = "reject"\n'
                                '"Heuristics.Phishing.Email.SpoofedDomain" = "tag"\n"PUA.*" = "tag"\n')
    assert P.virus_action("Heuristics.Encrypted.PDF", pol, "reject")[0] == "tag"
    assert P.virus_action("Heuristics.Phishing.URL", pol, "reject")[0] == "reject"
    assert P.virus_action("Heuristics.Phishing.Email.SpoofedDomain", pol, "reject")[0] == "tag"
    assert P.virus_action("Win.Trojan.X", pol, "reject") == ("reject", "")
    out = decide(spamd(0.0), clamd("found", "PUA.Win.Tool"), policy=pol)
    assert out.action == "accept" and out.reason == "virus"


# --- properties

levels = st.floats(min_value=-10, max_value=60, allow_nan=False)
ACTIONS = {"accept", "reject", "tempfail", "discard", "quarantine"}


@settings(max_examples=300, deadline=None)
@given(score=st.one_of(st.none(), st.floats(-20, 2000, allow_nan=False)),
       virus=st.sampled_from([None, "Eicar", "Heuristics.X"]),
       clamd_fails=st.booleans(), spamd_fails=st.booleans(), inside=st.booleans(), oversize=st.booleans())
def test_every_combination_yields_exactly_one_documented_action(score, virus, clamd_fails, spamd_fails, inside,
                                                                  oversize):
    results = [clamd("error", detail="timeout: x") if clamd_fails else clamd("found" if virus else "clean", virus)]
    if spamd_fails or score is None:
        results.append(spamd(outcome="error", detail="refused: y"))
    else:
        results.append(spamd(score))
    out = decide(*results, env=INSIDE if inside else OUTSIDE, oversize=oversize)
    assert out.action in ACTIONS and len(out.recipients) == 1
    if out.action in ("reject", "tempfail"):
        assert out.reply and out.reply[0][0] == ("5" if out.action == "reject" else "4")
    if virus and not clamd_fails:
        assert out.action == "reject" and out.reason == "virus"
    elif clamd_fails or spamd_fails or score is None:
        assert out.action in ("reject", "tempfail")        # never accepted as if clean


ORDER = ["ham", "tagged", "reject"]


@settings(max_examples=200, deadline=None)
@given(a=st.floats(-10, 100, allow_nan=False), b=st.floats(-10, 100, allow_nan=False))
def test_levels_are_monotonic(a, b):
    low, high = sorted((a, b))

    def rank(score):
        out = decide(spamd(score), clamd())
        return ORDER.index("reject" if out.action == "reject" else out.reason)
    assert rank(low) <= rank(high)


@settings(max_examples=100, deadline=None)
@given(tag=st.floats(0, 20), extra=st.floats(0, 20), score=st.floats(-5, 60))
def test_thresholds_decide_exactly_as_documented(tmp_path_factory, tag, extra, score):
    reject = tag + extra
    path = tmp_path_factory.mktemp("p") / "policy.toml"
    path.write_text(f"[inbound]\ntag_level = {tag!r}\nsubject_tag_level = {tag!r}\nreject_level = {reject!r}\n")
    out = decide(spamd(score), clamd(), policy=policyfile.load(str(path)))
    expected = "reject" if score >= reject else ("tagged" if score >= tag else "ham")
    assert ("reject" if out.action == "reject" else out.reason) == expected
    assert not math.isnan(score)
