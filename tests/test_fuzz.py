"""Property-based fuzzing (hypothesis) of everything that reads untrusted bytes or operator files:
the clamd and spamd reply parsers, header value handling and edits, the policy loader.
Bounded budgets keep it fast enough for every CI run."""
import re
import string

from hypothesis import HealthCheck, event, given, settings, strategies as st

from scanmilter import config, headers as H, policy as P, policyfile
from scanmilter.message import Seen
from scanmilter.scanners import ScanResult
from scanmilter.scanners import clamd as C, spamd as S
from scanmilter.verdict import combine, safe_name
from support import assert_safe, decoded, parsed_or_protocol_error

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

rule_names = st.lists(st.sampled_from([b"GTUBE", b"NO_RELAYS", b"_X", b"R" * 128, b"R" * 129, b"1ST", b"A-B",
                                        b"", b" X", b"X\r\n"]), max_size=4).map(b",".join)


def _spamd_reply(code, spam, score, req, body, length):
    length = b"%d" % len(body) if length == b"exact" else length
    return b"SPAMD/1.1 %s EX_OK\r\nContent-length: %s\r\nSpam: %s ; %s / %s\r\n\r\n%s" % (
        code, length, spam, score, req, body)


spamd_like = st.one_of(
    st.binary(max_size=300),
    st.builds(_spamd_reply,
              st.sampled_from([b"0", b"76", b"x"]), st.sampled_from([b"True", b"False", b"Maybe"]),
              st.sampled_from([b"1.0", b"-3", b"1e9", b"nan", b""]), st.sampled_from([b"5.0", b""]),
              st.one_of(rule_names, st.binary(max_size=200)),
              st.sampled_from([b"exact", b"exact", b"0", b"12", b"-1", b"9" * 5000, b""])))


@FUZZ
@given(spamd_like)
def test_spamd_parser_returns_a_result_or_a_protocol_error(reply):
    r = parsed_or_protocol_error(S.parse_reply, reply)
    if r is None:
        return
    assert r.outcome in ("clean", "found") and r.score is not None
    assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", rule) for rule in r.rules)
    # nothing is dropped or made up: the body is exactly the rule list, of the announced length
    head, _, body = reply.partition(b"\r\n\r\n")
    assert body == ",".join(r.rules).encode()
    assert re.search(rb"(?im)^Content-length: *%d\r?$" % len(body), head)


clamd_like = st.one_of(
    st.text(max_size=200),
    st.builds("stream: {} {}".format,
              st.one_of(st.text(max_size=40), st.sampled_from(["Heuristics.Limits.Exceeded.MaxFileSize", "Eicar",
                                                               "Heuristics.Limits.Exceeded.X.UNOFFICIAL"])),
              st.sampled_from(["FOUND", "OK", "ERROR", "FOUND!"])))


@FUZZ
@given(clamd_like)
def test_clamd_parser_returns_a_result_or_a_protocol_error(reply):
    r = parsed_or_protocol_error(C.parse_reply, reply)
    if r is None:
        return
    assert r.outcome in ("clean", "found", "skipped")
    if r.outcome == "clean":
        assert reply == "stream: OK"
    elif r.outcome == "found":
        assert reply == f"stream: {r.viruses[0]} FOUND" and not r.viruses[0].startswith(" ")
    else:                                # only clamd's own limit alerts stand for a skipped scan
        assert r.detail == "limits" and reply.startswith("stream: Heuristics.Limits.Exceeded")


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


# Header values as they come from the wire: ASCII, UTF-8 and Latin-1 words, control characters,
# line ends that fold and ones that do not, encoded words and our own tag, white space between.
value_piece = st.one_of(
    st.text(string.ascii_letters + string.digits + string.punctuation, min_size=1, max_size=10).map(str.encode),
    st.text(min_size=1, max_size=6).map(str.encode),
    st.text(st.characters(min_codepoint=0xA0, max_codepoint=0xFF), min_size=1, max_size=6).map(
        lambda s: s.encode("latin-1")),
    st.sampled_from([b"\x00", b"\x1b[2J", b"\x7f", b"\r", b"\n", b"\r\n", b"\r\n\t", b"\n ", b"\t"]),
    st.sampled_from([b"=?utf-8?q?Gr=C3=BC=C3=9Fe?=", b"=?iso-8859-1?b?Y2Fm6Q==?=", b"=?x?q?", b"[SPAM]"]),
    st.binary(min_size=1, max_size=8))
header_value = st.builds(lambda lead, pieces: lead + b"".join(p + sep for p, sep in pieces),
                         st.sampled_from([b" ", b"", b"\t", b" [SPAM] "]),    # some already tagged
                         st.lists(st.tuples(value_piece, st.sampled_from([b" ", b"", b"  ", b"\t"])), max_size=10))
# a Subject first in about half the messages, then anything (more Subjects among it)
message_headers = st.builds(lambda first, rest: first + rest,
                            st.one_of(st.just([]), st.tuples(st.just("Subject"), header_value).map(lambda h: [h])),
                            st.lists(st.tuples(st.sampled_from(["Subject", "X-Spam-Flag", "x-virus-status", "Received",
                                                                "X-Quarantine-Released", "X-Mailer"]), header_value),
                                     max_size=11))
# scores in every band of the default policy: ham, tagged (subject_tag_level 5 up to reject_level 15), rejected
score_bands = st.one_of(st.floats(-10, 4.9), st.floats(5.0, 14.9), st.floats(15.0, 50.0))
HEADER_EDIT_PATHS = {"refused", "not tagged", "subject changed", "subject added", "already tagged"}


def reader_view(raw: bytes) -> bytes:
    """What a reader makes of a raw value: unfolded (RFC 5322), control characters as spaces."""
    unfolded = re.sub(rb"(?:\r\n|\r|\n)(?=[ \t])", b"", raw)
    return re.sub(rb"[\x00-\x08\x0a-\x1f\x7f]", b" ", unfolded).strip(b" \t")


def check_header_edits(raw, score, outbound) -> str:
    """The properties of the header edits for one message; the path it took."""
    counts, seen = {}, []
    for name, value in raw:
        counts[name.lower()] = counts.get(name.lower(), 0) + 1
        seen.append(Seen(name, counts[name.lower()], value))
    policy = policyfile.load("")
    env = P.Envelope("127.0.0.1" if outbound else "203.0.113.7", "", "", "a@b.test", ("c@example.com",))
    verdict = combine([ScanResult("spamd", "clean", score=score, required=5.0), ScanResult("clamd", "clean")])
    outcome = P.decide(verdict, env, policy)
    if outcome.action != "accept":
        return "refused"
    edits = H.edits(verdict, outcome, seen, policy)
    removed = {(e.name.lower(), e.index) for e in edits if e.kind == "remove"}
    forged = {(h.name.lower(), h.index) for h in seen if h.name.lower().startswith(P.VERDICT_HEADER_PREFIXES)}
    assert removed == (set() if outbound else forged)
    kinds = [e.kind for e in edits]
    assert kinds == sorted(kinds, key=["change", "remove", "add"].index)     # changes, removals, additions
    for e in edits:
        assert_safe(e.value)
    subject = next((h for h in seen if h.name.lower() == "subject"), None)
    [tagged] = [e for e in edits if e.name.lower() == "subject"] or [None]
    if tagged is None:
        return "already tagged" if outcome.headers_from.subject_tag and subject else "not tagged"
    if tagged.kind == "add":
        assert subject is None and tagged.value == "[SPAM]"
        return "subject added"
    assert (tagged.kind, tagged.index) == ("change", subject.index)
    original = reader_view(subject.value)
    if b"=?" not in original:              # sender's encoded words decode their own way: test_headers.py
        assert decoded(tagged.value) == (b"[SPAM] " + original if original else b"[SPAM]")
    return "subject changed"


@FUZZ
@given(message_headers, score_bands, st.booleans())
def test_header_edits_never_crash_and_remove_every_forged_verdict(raw, score, outbound):
    event(check_header_edits(raw, score, outbound))


def test_a_bare_line_end_in_the_subject_is_no_fold():
    # a lone LF inside the value: the tagged Subject must not start a line without white space
    assert check_header_edits([("Subject", b"a\nb")], 8.0, False) == "subject changed"
    assert check_header_edits([("Subject", b" caf\xe9\r\nBcc: x@y")], 8.0, False) == "subject changed"


def test_the_header_edit_generator_reaches_every_path():
    paths = set()

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(message_headers, score_bands, st.booleans())
    def run(raw, score, outbound):
        paths.add(check_header_edits(raw, score, outbound))

    run()
    assert paths == HEADER_EDIT_PATHS


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
