"""Property-based fuzzing (hypothesis) of everything that reads untrusted bytes or operator files:
the clamd and spamd reply parsers, header value handling and edits, the policy loader.
Bounded budgets keep it fast enough for every CI run."""
import re
import string

from hypothesis import HealthCheck, given, settings, strategies as st

from scanmilter import config, headers as H, policy as P, policyfile
from scanmilter.message import Seen
from scanmilter.scanners import EngineError, ScanResult
from scanmilter.scanners import clamd as C, spamd as S
from scanmilter.verdict import combine, safe_name

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

spamd_like = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda code, spam, score, req, body: b"SPAMD/1.1 %s EX_OK\r\nSpam: %s ; %s / %s\r\n\r\n%s" % (
        code, spam, score, req, body),
        st.sampled_from([b"0", b"76", b"x"]), st.sampled_from([b"True", b"False", b"Maybe"]),
        st.sampled_from([b"1.0", b"-3", b"1e9", b"nan", b""]), st.sampled_from([b"5.0", b""]),
        st.binary(max_size=200)))


@FUZZ
@given(spamd_like)
def test_spamd_parser_returns_a_result_or_a_protocol_error(reply):
    try:
        r = S.parse_reply(reply)
    except EngineError as e:
        assert e.kind == "protocol"
        return
    assert r.outcome in ("clean", "found") and r.score is not None
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+", rule) for rule in r.rules)


@FUZZ
@given(st.text(max_size=200))
def test_clamd_parser_returns_a_result_or_a_protocol_error(reply):
    try:
        r = C.parse_reply(reply)
    except EngineError as e:
        assert e.kind == "protocol"
        return
    assert r.outcome in ("clean", "found")
    if r.outcome == "clean":
        assert reply == "stream: OK"


@FUZZ
@given(st.text(max_size=300))
def test_names_from_engines_are_always_safe(name):
    safe = safe_name(name)
    assert safe and re.fullmatch(r"[A-Za-z0-9_.:/+-]+", safe) and len(safe) <= 100


header_name = st.text(alphabet=string.ascii_letters + "-", min_size=1, max_size=20)


@FUZZ
@given(st.text(max_size=500), header_name)
def test_header_values_cannot_inject_lines(value, name):
    out = H.safe_value(name, value)
    assert "\r" not in out
    for continuation in out.split("\n")[1:]:
        assert continuation.startswith("\t")      # every new line is a folded continuation
    assert all(ch == "\t" or ch == "\n" or ord(ch) >= 32 for ch in out)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["Subject", "X-Spam-Flag", "x-virus-status", "Received",
                                           "X-Quarantine-Released", "X-Mailer"]),
                          st.binary(max_size=80)), max_size=12),
       st.floats(-10, 50), st.booleans())
def test_header_edits_never_crash_and_remove_every_forged_verdict(raw, score, outbound):
    counts, seen = {}, []
    for name, value in raw:
        counts[name.lower()] = counts.get(name.lower(), 0) + 1
        seen.append(Seen(name, counts[name.lower()], value))
    policy = policyfile.load("")
    env = P.Envelope("127.0.0.1" if outbound else "203.0.113.7", "", "", "a@b.test", ("c@example.com",))
    verdict = combine([ScanResult("spamd", "clean", score=score, required=5.0), ScanResult("clamd", "clean")])
    outcome = P.decide(verdict, env, policy)
    if outcome.action != "accept":
        return
    edits = H.edits(verdict, outcome, seen, policy)
    removed = {(e.name.lower(), e.index) for e in edits if e.kind == "remove"}
    forged = {(h.name.lower(), h.index) for h in seen if h.name.lower().startswith(P.VERDICT_HEADER_PREFIXES)}
    assert removed == (set() if outbound else forged)
    kinds = [e.kind for e in edits]
    assert kinds == sorted(kinds, key=["change", "remove", "add"].index)     # changes, removals, additions
    for e in edits:
        assert "\r" not in e.value and all(line.startswith("\t") for line in e.value.split("\n")[1:])


toml_values = st.one_of(st.integers(-5, 100), st.floats(allow_nan=False, allow_infinity=False, width=32),
                        st.booleans(), st.text(max_size=20), st.lists(st.text(max_size=10), max_size=3))


def _toml(v):
    return config.toml_value(v)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["inbound", "outbound", "lists", "directions", "virus_classes", "nonsense"]),
       st.sampled_from([s.name for s in config.DIRECTION_SETTINGS + config.LISTS_SETTINGS
                        + config.DIRECTIONS_SETTINGS] + ["PUA.*", "bogus"]),
       toml_values)
def test_policy_loader_accepts_or_names_the_problem(tmp_path_factory, table, key, value):
    path = tmp_path_factory.mktemp("fuzz") / "policy.toml"
    path.write_text(f'[{table}]\n"{key}" = {_toml(value)}\n')
    try:
        policyfile.check(str(path))
    except config.ConfigError as e:
        assert str(e).startswith(str(path))          # every error names the file
