"""Per-user spamd: spamd_user as a pattern, a scan per distinct user, each recipient decided
by its own user's score, the cap and its fallback, and user names that are safe to send."""
import dataclasses
import threading

import pytest

from scanmilter import config, policyfile
from scanmilter import policy as P
from scanmilter.message import Spool
from scanmilter.pipeline import Pipeline, SpamdUsers, scan_pool
from scanmilter.scancache import ScanCache
from scanmilter.scanners import ScanResult
from scanmilter.scanners.spamd import ForUser, check_user_pattern, is_user_pattern, safe_user, user_for
from scanmilter.verdict import combine
from test_scanners import FakeServer, spamd_behave, spamd_scanner, spool_of, symbols_reply

POOL = scan_pool(8)
CLEAN = ScanResult("clamd", "clean")


def envelope(*recipients):
    return P.Envelope("203.0.113.7", "", "smtpd", "eve@outside.test", recipients)


def policy(quarantine=True):
    return dataclasses.replace(policyfile.load(""), quarantine_available=quarantine)


def spool():
    s = Spool(1000, 1000)
    s.write(b"Subject: x\r\n\r\nbody\r\n")
    return s


class Spamd:
    """A spamd whose score depends on the user it is asked as; records every user asked."""
    name, timeout = "spamd", 5.0

    def __init__(self, scores, default=10.0, barrier=None):
        self.scores, self.default, self.barrier = scores, default, barrier
        self.users, self.lock = [], threading.Lock()

    def scan(self, spool):
        user = getattr(spool, "spamd_user", None)
        with self.lock:
            self.users.append(user)
        if self.barrier is not None:
            self.barrier.wait(timeout=5)      # only passes when the scans run at the same time
        score = self.scores.get(user, self.default)
        return ScanResult("spamd", "found" if score >= 5 else "clean", score=score, required=5.0)


class Clamd:
    name, timeout = "clamd", 5.0

    def scan(self, spool):
        return CLEAN


# ---------------------------------------------------------------- the pattern
def test_a_pattern_expands_per_recipient_and_a_plain_name_stays_fixed():
    assert user_for("%r", "Alice@Example.COM") == "alice@example.com"
    assert user_for("%d", "alice@example.com") == "example.com"
    assert user_for("prefs-%d", "<bob@lab.example.org>") == "prefs-lab.example.org"
    assert user_for("%%r", "alice@example.com") == "_r"      # %% is a percent sign, not an expansion
    assert is_user_pattern("%r") and is_user_pattern("x-%d") and not is_user_pattern("spamuser")
    assert not is_user_pattern("100%%")


@pytest.mark.parametrize("pattern", ["%x", "%", "a%", "%r%"])
def test_a_pattern_with_an_unknown_expansion_is_refused(pattern):
    assert check_user_pattern(pattern)
    with pytest.raises(config.ConfigError):
        config.parse(config.DAEMON_SETTINGS, {"spamd_user": pattern}, "test")


def test_hostile_recipient_text_becomes_one_safe_word():
    for hostile in ("a\r\nUser: root", "../../etc/passwd", "x y\x00z", ".hidden@example.com", "a" * 1000):
        user = user_for("%r", hostile)
        assert set(user) <= set("abcdefghijklmnopqrstuvwxyz0123456789._@+-_"), user
        assert "/" not in user and not user.startswith(".") and len(user) <= 128
    assert safe_user("a\r\nUser: root") == "a__User__root"


def test_a_hostile_user_cannot_add_a_spamc_header(tmp_path):
    srv = FakeServer(tmp_path, spamd_behave(symbols_reply(b"False ; 0.1 / 5.0", b"")))
    result = spamd_scanner(srv.path).scan(ForUser(spool_of(b"Subject: x\r\n\r\nbody\r\n"),
                                                  user_for("%r", "a\r\nUser: root\r\nX: y")))
    assert result.outcome == "clean" and result.user == "a__user__root__x__y"
    head = srv.received[0].split(b"\r\n\r\n")[0]
    assert head.split(b"\r\n") == [b"SYMBOLS SPAMC/1.5", b"Content-length: 20", b"User: a__user__root__x__y"]
    # the client itself reduces whatever user it is handed
    spamd_scanner(srv.path).scan(ForUser(spool_of(b"Subject: x\r\n\r\nbody\r\n"), "a\r\nUser: root"))
    assert srv.received[1].split(b"\r\n\r\n")[0].split(b"\r\n")[2:] == [b"User: a__User__root"]


# ---------------------------------------------------------------- the cap and its fallback
def test_distinct_users_are_capped_and_the_rest_share_the_fallback():
    users = SpamdUsers("%r", limit=2, fallback="overflow")
    got = users.assign(["a@x.test", "b@x.test", "A@x.test", "c@x.test", "d@x.test"])
    assert got == {"a@x.test": "a@x.test", "b@x.test": "b@x.test", "A@x.test": "a@x.test",
                   "c@x.test": "overflow", "d@x.test": "overflow"}
    assert SpamdUsers("%d", limit=1).assign(["a@x.test", "b@x.test", "c@y.test"]) == \
        {"a@x.test": "x.test", "b@x.test": "x.test", "c@y.test": ""}
    assert SpamdUsers("fixed").assign(["a@x.test"]) == {} and SpamdUsers("").assign(["a@x.test"]) == {}


def test_recipients_beyond_the_cap_use_the_fallback_users_score():
    spamd = Spamd({"a@x.test": 20.0, "": 0.5})
    pipe = Pipeline([spamd, Clamd()], POOL, users=SpamdUsers("%r", limit=1))
    inspection = pipe.inspect(spool(), envelope("a@x.test", "b@x.test", "c@x.test"), policy())
    assert sorted(spamd.users) == ["", "a@x.test"]          # two scans: a's own, one for the rest
    assert {r: v.score for r, v in inspection.verdicts.items()} == {"a@x.test": 20.0, "b@x.test": 0.5,
                                                                     "c@x.test": 0.5}


# ---------------------------------------------------------------- the pipeline and the policy
def test_each_recipient_is_decided_by_its_own_users_score_scanned_in_parallel():
    spamd = Spamd({"alice@example.com": 20.0, "bob@example.com": 0.1}, barrier=threading.Barrier(2))
    pipe = Pipeline([spamd, Clamd()], POOL, users=SpamdUsers("%r"))
    inspection = pipe.inspect(spool(), envelope("alice@example.com", "bob@example.com"), policy())
    assert sorted(spamd.users) == ["alice@example.com", "bob@example.com"]
    out = inspection.outcome
    by = {d.recipient: d for d in out.recipients}
    assert (by["alice@example.com"].action, by["alice@example.com"].reason) == ("reject", "spam")
    assert (by["bob@example.com"].action, by["bob@example.com"].reason) == ("accept", "ham")
    # mixed recipients: delivered to Bob, Alice's copy held; the headers follow Bob's score
    assert out.action == "accept" and out.remove == ("alice@example.com",) and out.quarantine == ("alice@example.com",)
    assert inspection.verdict.score == 0.1 and inspection.verdicts["alice@example.com"].score == 20.0


def test_recipients_of_one_user_share_one_scan():
    spamd = Spamd({"example.com": 7.0})
    pipe = Pipeline([spamd, Clamd()], POOL, users=SpamdUsers("%d"))
    inspection = pipe.inspect(spool(), envelope("a@example.com", "b@example.com"), policy())
    assert spamd.users == ["example.com"] and inspection.verdict.score == 7.0
    assert inspection.outcome.recipients[0].reason == "tagged"


@pytest.mark.parametrize("setting", ["", "spamuser"])
def test_a_fixed_user_scans_once_as_before(setting):
    spamd = Spamd({})
    pipe = Pipeline([spamd, Clamd()], POOL, users=SpamdUsers(setting))
    inspection = pipe.inspect(spool(), envelope("a@example.com", "b@other.test"), policy())
    assert spamd.users == [None] and inspection.verdicts == {}     # the scanner's own user
    assert [r.engine for r in inspection.results] == ["spamd", "clamd"]


def test_the_scan_cache_keys_each_users_score_apart():
    spamd = Spamd({"bob@example.com": 0.1, "carol@example.com": 9.0})
    pipe = Pipeline([spamd, Clamd()], POOL, cache=ScanCache(60, 100), users=SpamdUsers("%r"))
    first = pipe.inspect(spool(), envelope("bob@example.com"), policy(), key=b"k")
    other = pipe.inspect(spool(), envelope("carol@example.com"), policy(), key=b"k")
    again = pipe.inspect(spool(), envelope("bob@example.com"), policy(), key=b"k")
    assert spamd.users == ["bob@example.com", "carol@example.com"]
    assert (first.verdict.score, other.verdict.score, again.verdict.score) == (0.1, 9.0, 0.1)
    assert "spamd" in again.verdict.cached and "spamd" not in other.verdict.cached


def test_allow_listed_recipients_cost_no_scan_of_their_own(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text('[lists]\nallow_recipients = ["friend@example.com"]\n')
    spamd = Spamd({"bob@example.com": 0.1})
    pipe = Pipeline([spamd, Clamd()], POOL, users=SpamdUsers("%r"))
    inspection = pipe.inspect(spool(), envelope("friend@example.com", "bob@example.com"),
                              policyfile.load(str(path)))
    assert spamd.users == ["bob@example.com"]
    assert [d.reason for d in inspection.outcome.recipients] == ["allowed", "ham"]


def test_policy_decides_each_recipient_from_its_own_verdict():
    high = combine([ScanResult("spamd", "found", score=20.0, required=5.0), CLEAN])
    low = combine([ScanResult("spamd", "clean", score=0.1, required=5.0), CLEAN])
    env = envelope("alice@example.com", "bob@example.com")
    out = P.decide(low, env, policy(), {"alice@example.com": high})
    assert [(d.recipient, d.action) for d in out.recipients] == [("alice@example.com", "reject"),
                                                                  ("bob@example.com", "accept")]
    assert "score 20.0" in out.recipients[0].reply[2]
    assert P.decide(low, env, policy()).action == "accept"       # without verdicts: one score for all
