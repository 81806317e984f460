"""Policy files: every error names the file and line; warnings for rules that never matter."""
import pytest

from conftest import ROOT
from scanmilter import cli, config, policyfile


def check(tmp_path, text):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return policyfile.check(str(path))


@pytest.mark.parametrize("text, message", [
    ("[inbound]\ntag_level = 5.0\nreject_lvl = 3\n", r"policy.toml:3: unknown setting 'reject_lvl' \(did you mean reject_level\?\)"),
    ("[inbound]\n\n\nreject_level = \"high\"\n", r"policy.toml:4: reject_level must be a number"),
    ("[inbound]\ntag_level = 20.0\n", r"policy.toml:2: thresholds out of order in \[inbound\]: tag_level 20.0 is above"),
    ("[inbound.domains.\"example.com\"]\nsubject_tag_level = 2.0\n",
     r"policy.toml:2: thresholds out of order in \[inbound.domains.\"example.com\"\]: subject_tag_level 2.0 is below"),
    ("[lists]\nallow_clients = [\"10.0.0.0/33\"]\n", r"policy.toml:2: allow_clients: '10.0.0.0/33' is not a network"),
    ("[directions]\ninternal_networks = [\"nonsense\"]\n", r"policy.toml:2: internal_networks"),
    ("[outbound]\nvirus_action = \"quarantine\"\n", r"policy.toml:2: virus_action in \[outbound\] needs the quarantine store"),
    ("[inbound]\nquarantine_level = 8.0\n", r"policy.toml:2: quarantine_level .* needs the quarantine store"),
    ("[virus_classes]\n\"PUA.*\" = \"ignore\"\n", r"policy.toml:2: 'PUA.\*' must be one of"),
    ("[inbound.domains.\"a@b\"]\nreject_level = 1.0\n", r"policy.toml:1: 'a@b' is not a domain"),
    ("[inbound.recipients.\"nobody\"]\nreject_level = 1.0\n", r"policy.toml:1: 'nobody' is not an address"),
    ("[inbound.wat]\nx = 1\n", r"policy.toml:1: unknown table 'wat'"),
    ("[[header_rewrite]]\naction = \"remove\"\nname = \"Bad Name\"\n", r"policy.toml:1: name must be a header field name"),
    ("x = 1\n[[header_rewrite]]\naction = \"add\"\nname = \"X-A\"\nvalue = \"v\"\n[[header_rewrite]]\naction = \"replace\"\nname = \"X-B\"\nmatch = \"(\"\nvalue = \"v\"\n",
     r"policy.toml:1: unknown table or setting 'x'"),
    ("[[header_rewrite]]\naction = \"add\"\nname = \"X-A\"\nvalue = \"v\"\n[[header_rewrite]]\naction = \"replace\"\nname = \"X-B\"\nmatch = \"(\"\nvalue = \"v\"\n",
     r"policy.toml:5: match is not a valid regular expression"),
    ("[[header_rewrite]]\naction = \"add\"\nname = \"X-Spam-Flag\"\nvalue = \"NO\"\n", r"verdict header scanmilter owns"),
    ("[inbound]\nsubject_tag = \"[SPÄM]\"\n", r"policy.toml:2: subject_tag: use printable ASCII"),
    ("[inbound]\nspam_reply = \"{nope}\"\n", r"policy.toml:2: spam_reply: bad placeholder"),
])
def test_errors_name_file_and_line(tmp_path, text, message):
    with pytest.raises(config.ConfigError, match=message):
        check(tmp_path, text)


def test_warnings_for_rules_that_never_matter(tmp_path):
    _, warnings = check(tmp_path, '[inbound]\nsubject_tag_level = 15.0\n[lists]\nallow_senders = ["x@y.test"]\n'
                                  'block_senders = ["x@y.test"]\nblock_recipients = ["gone@example.com"]\n'
                                  '[inbound.recipients."gone@example.com"]\nreject_level = 30.0\n')
    text = "\n".join(warnings)
    assert "policy.toml:2: subject_tag_level is not below reject_level" in text
    assert "x@y.test is in both allow_senders and block_senders" in text
    assert "policy.toml:7: rules for gone@example.com never apply" in text


def test_shipped_default_policy_is_the_builtin_default():
    shipped, warnings = policyfile.check(str(ROOT / "policies" / "default.toml"))
    builtin = policyfile.load("")
    assert warnings == []
    assert shipped.directions == builtin.directions
    for d in ("inbound", "outbound"):      # the file spells out every setting of both directions
        text = (ROOT / "policies" / "default.toml").read_text()
        section = text.split(f"[{d}]")[1].split("\n[")[0]
        assert {s.name for s in config.DIRECTION_SETTINGS} <= {line.split(" =")[0] for line in section.splitlines()}


@pytest.mark.parametrize("example", sorted((ROOT / "policies" / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_examples_load_without_warnings(example):
    policy, warnings = policyfile.check(str(example))
    assert warnings == []


def test_check_config_shows_policy_changes_and_warnings(tmp_path, capsys):
    (tmp_path / "policy.toml").write_text('[inbound]\nreject_level = 12.0\n[inbound.domains."example.com"]\n'
                                          'reject_level = 9.0\n[lists]\nallow_senders = ["a@b.test"]\n'
                                          'block_senders = ["a@b.test"]\n')
    (tmp_path / "s.toml").write_text(f'policy_file = "{tmp_path}/policy.toml"\n')
    assert cli.main(["check-config", "-c", str(tmp_path / "s.toml"), "-n"]) == 0
    out = capsys.readouterr().out
    assert "reject_level = 12.0  # changed, default 15.0" in out
    assert '[inbound.domains."example.com"]\nreject_level = 9.0' in out
    assert "# warning: " in out and "allow_senders and block_senders" in out
