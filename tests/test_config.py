import pytest

from scanmilter import cli, config


def write(tmp_path, text, name="scanmilter.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_load():
    cfg = config.load(None)
    assert cfg.spamd_size_limit == 512 * 1024
    assert cfg.changed == frozenset()
    # header caps: far above real mail (a few dozen fields; Postfix's hopcount_limit is 50 Received lines)
    assert (cfg.header_count_limit, cfg.verdict_header_limit, cfg.header_limit_action) == (1000, 50, "reject")


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    with pytest.raises(config.ConfigError, match=r"unknown setting 'clamd_timout' \(did you mean clamd_timeout\?\)"):
        config.load(write(tmp_path, "clamd_timout = 3\n"))


@pytest.mark.parametrize("line, fragment", [
    ("clamd_timeout = \"soon\"", "clamd_timeout must be a number"),
    ("clamd_timeout = 0", "more than 0 seconds"),
    ("spamd_size_limit = -1", "spamd_size_limit must be a whole number of bytes"),
    ("scan_threads = 0", "at least 1"),
    ("clamd_enabled = 1", "clamd_enabled must be true or false"),
    ("spamd_oversize_action = \"drop\"", "must be one of skip, truncate"),
    ("clamd_socket = \"/run/clamd.ctl\"", "clamd_socket"),
    ("milter_socket = \"inet:127.0.0.1:8890\"", "libmilter syntax"),
    ("milter_socket_mode = \"rw\"", "octal"),
    ("spool_memory_limit = 100\nmessage_size_limit = 10", "larger than message_size_limit"),
    ("clamd_timeout = ", "not valid TOML"),
    ("header_count_limit = 0", "header_count_limit must be a whole number of count \\(at least 1\\)"),
    ("verdict_header_limit = -5", "verdict_header_limit must be a whole number"),
    ("header_limit_action = \"discard\"", "header_limit_action must be one of reject, tempfail"),
])
def test_bad_values_stop_with_the_key_named(tmp_path, line, fragment):
    with pytest.raises(config.ConfigError, match=fragment):
        config.load(write(tmp_path, line + "\n"))


def test_missing_file(tmp_path):
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(str(tmp_path / "nope.toml"))


def test_check_config_prints_defaults_and_changes(tmp_path, capsys):
    path = write(tmp_path, 'clamd_timeout = 5\nspamd_socket = "unix:/run/spamd.sock"\n')
    assert cli.main(["check-config", "-c", path]) == 0
    out = capsys.readouterr().out
    assert "clamd_timeout = 5.0  # changed, default 30.0" in out
    assert 'spamd_size_limit = 524288  # bytes:' in out
    assert cli.main(["check-config", "-c", path, "-n"]) == 0
    daemon_part = capsys.readouterr().out.split("# policy")[0]
    changed = [line for line in daemon_part.splitlines() if line and not line.startswith("#")]
    assert [line.split(" =")[0] for line in changed] == ["clamd_timeout", "spamd_socket"]


def test_check_config_fails_cleanly(tmp_path, capsys):
    assert cli.main(["check-config", "-c", write(tmp_path, "bogus = 1\n")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("scanmilter: fatal: ") and "bogus" in err and "Traceback" not in err


def test_check_config_n_shows_only_values_that_differ_from_the_defaults(tmp_path, capsys):
    """Like `postconf -n`: a setting written out with its default value is no change. Every
    setting is written with its default here, the mode without its leading zero, and one real change."""
    lines = [f"{s.name} = {config.toml_value(s.default)}" for s in config.DAEMON_SETTINGS
             if s.name not in ("milter_socket_mode", "spamd_timeout")]
    mode = next(s.default for s in config.DAEMON_SETTINGS if s.name == "milter_socket_mode")
    path = write(tmp_path, "\n".join(lines) + f'\nmilter_socket_mode = "{mode.lstrip("0")}"\nspamd_timeout = 31\n')
    assert config.load(path).changed == frozenset({"spamd_timeout"})
    assert cli.main(["check-config", "-c", path, "-n"]) == 0
    daemon_part = capsys.readouterr().out.split("# policy")[0]
    assert [line for line in daemon_part.splitlines() if line and not line.startswith("#")] == [
        "spamd_timeout = 31.0  # changed, default 30.0"]
    assert cli.main(["check-config", "-c", path]) == 0
    out = capsys.readouterr().out
    assert out.count("# changed") == 1 and f'milter_socket_mode = "{mode.lstrip("0")}"  # mode: ' in out


def test_check_config_prints_the_attachment_rules_and_digest_settings(tmp_path, capsys):
    """The effective policy shows every part that decides: [files] rules and actions, [notify]."""
    policy = tmp_path / "policy.toml"
    policy.write_text('[inbound.files]\nscript = "quarantine"\n[notify]\nsend = true\n'
                      '[files.rules.office]\nextensions = ["docm"]\n[outbound.files]\noffice = "reject"\n')
    path = write(tmp_path, f'policy_file = "{policy}"\nquarantine_directory = "{tmp_path}/q"\n')
    assert cli.main(["check-config", "-c", path]) == 0
    out = capsys.readouterr().out.split("# policy")[1]
    assert '"script" = "quarantine"' in out.split("[inbound.files]")[1].split("[")[0]
    assert '"office" = "reject"' in out.split("[outbound.files]")[1]
    assert '[files.rules."office"]' in out and 'extensions = ["docm"]' in out
    assert "[notify]\nsend = true" in out
