"""Error paths that used to pass in silence: postfix-check with a master.cf or clamd.conf it cannot
read, explain of a message over message_size_limit, a policy that writes an X-Quarantine-* header,
an engine check that would hang for the whole scan timeout."""
import time

import pytest

from fakes import BadServer
from scanmilter import cli, config, policyfile, scanners

MAIN_CF = "smtpd_milters = unix:/run/scanmilter/scanmilter.sock\nnon_smtpd_milters = $smtpd_milters\n"


def postfix_check(tmp_path, capsys, master=True, clamd=True, settings=""):
    (tmp_path / "postfix").mkdir()
    (tmp_path / "postfix" / "main.cf").write_text(MAIN_CF)
    if master:
        (tmp_path / "postfix" / "master.cf").write_text("smtp inet n - n - - smtpd\n")
    if clamd:
        (tmp_path / "clamd.conf").write_text("StreamMaxLength 25M\nAlertExceedsMax yes\n")
    (tmp_path / "scanmilter.toml").write_text('milter_socket = "unix:/run/scanmilter/scanmilter.sock"\n' + settings)
    cli.main(["postfix-check", "-c", str(tmp_path / "scanmilter.toml"), "--main-cf", str(tmp_path / "postfix/main.cf"),
              "--clamd-conf", str(tmp_path / "clamd.conf"), "--no-connect"])
    return capsys.readouterr().out


def test_postfix_check_says_when_master_cf_cannot_be_read(tmp_path, capsys):
    out = postfix_check(tmp_path, capsys, master=False)
    assert (f"warning: cannot read master.cf ({tmp_path}/postfix/master.cf: No such file or directory): "
            "which services run chrooted") in out, out
    assert "clamd.conf" not in out


def test_postfix_check_says_when_clamd_conf_cannot_be_read(tmp_path, capsys):
    out = postfix_check(tmp_path, capsys, clamd=False)
    assert (f"warning: cannot read clamd.conf ({tmp_path}/clamd.conf: No such file or directory): "
            "StreamMaxLength and AlertExceedsMax were not checked") in out, out
    assert "master.cf" not in out


def test_postfix_check_is_quiet_about_clamd_conf_when_clamd_is_off(tmp_path, capsys):
    assert "clamd.conf" not in postfix_check(tmp_path, capsys, clamd=False, settings="clamd_enabled = false\n")


@pytest.mark.parametrize("given", [[], ["--score", "1", "--virus", "Eicar"]])
def test_explain_treats_a_message_over_message_size_limit_as_the_daemon_does(tmp_path, capsys, given):
    (tmp_path / "scanmilter.toml").write_text("message_size_limit = 2000\nspool_memory_limit = 2000\n")
    (tmp_path / "big.eml").write_bytes(b"Subject: big\r\n\r\n" + b"a line of text\r\n" * 200)
    assert cli.main(["explain", str(tmp_path / "big.eml"), "-c", str(tmp_path / "scanmilter.toml"),
                     "--rcpt", "bob@example.com", *given]) == 0
    out = capsys.readouterr().out
    assert "scan: none, the message is over message_size_limit (2000 bytes)" in out, out
    assert "  clamd: skipped oversize;" in out and "  spamd: skipped oversize;" in out, out
    assert "=> accept (oversize): oversize_action = \"tag\" from [inbound]" in out, out
    assert "+ X-Virus-Status: unscanned (oversize)" in out, out


def test_explain_of_a_message_within_message_size_limit_uses_the_given_score(tmp_path, capsys):
    (tmp_path / "scanmilter.toml").write_text("message_size_limit = 2000\nspool_memory_limit = 2000\n")
    (tmp_path / "small.eml").write_bytes(b"Subject: small\r\n\r\nhello\r\n")
    assert cli.main(["explain", str(tmp_path / "small.eml"), "-c", str(tmp_path / "scanmilter.toml"),
                     "--rcpt", "bob@example.com", "--score", "1"]) == 0
    out = capsys.readouterr().out
    assert "scan: given on the command line" in out and "=> accept (ham)" in out and "oversize" not in out, out


@pytest.mark.parametrize("action", ["add", "replace"])
def test_a_policy_cannot_write_an_x_quarantine_header(tmp_path, action):
    """X-Quarantine-* is a verdict header like X-Spam-*: stripped from what arrives, so a rule must
    not be able to forge one (X-Quarantine-Released says a postmaster let the message through)."""
    (tmp_path / "policy.toml").write_text(f'[[header_rewrite]]\naction = "{action}"\nname = "X-Quarantine-Released"\n'
                                          'value = "id=0, by=postmaster"\n')
    with pytest.raises(config.ConfigError, match="X-Quarantine-Released is a verdict header scanmilter owns"):
        policyfile.load(str(tmp_path / "policy.toml"))


def test_engine_check_timeout_bounds_a_ping_far_below_the_scan_timeout(tmp_path):
    server = BadServer("hang", unix_path=tmp_path / "clamd.sock")
    try:
        settings = {"clamd_socket": f"unix:{tmp_path}/clamd.sock", "clamd_timeout": 60.0, "spamd_enabled": False,
                    "files_enabled": False,
                    "engine_check_timeout": 0.3}
        cfg = config.parse(config.DAEMON_SETTINGS, settings, "test")
        [clamd] = scanners.from_settings(cfg)
        start = time.monotonic()
        problem = clamd.ping()
        took = time.monotonic() - start
    finally:
        server.close()
    assert problem and took < 0.3 + 2, (problem, took)
