"""postfix-check against real Postfix configurations (read by Postfix's own postconf), one mistake each."""
import shutil

import pytest

from scanmilter import cli

pytestmark = pytest.mark.skipif(not shutil.which("postconf"), reason="Postfix is not installed")

GOOD = """compatibility_level = 3.6
smtpd_milters = unix:/run/scanmilter/scanmilter.sock
non_smtpd_milters = $smtpd_milters
milter_default_action = tempfail
milter_protocol = 6
milter_mail_macros = i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} {mail_mailer}
message_size_limit = 10240000
"""
MASTER_NO_CHROOT = "smtp inet n - n - - smtpd\n"


def check(tmp_path, capsys, main_cf=GOOD, master=MASTER_NO_CHROOT, clamd="StreamMaxLength 25M\nAlertExceedsMax yes\n", settings=""):
    (tmp_path / "main.cf").write_text(main_cf)
    (tmp_path / "master.cf").write_text(master)
    (tmp_path / "clamd.conf").write_text(clamd)
    (tmp_path / "scanmilter.toml").write_text(settings)
    rc = cli.main(["postfix-check", "-c", str(tmp_path / "scanmilter.toml"), "--main-cf", str(tmp_path / "main.cf"),
                   "--clamd-conf", str(tmp_path / "clamd.conf")])
    return rc, capsys.readouterr().out


def test_a_correct_setup_passes(tmp_path, capsys):
    rc, out = check(tmp_path, capsys)
    assert rc == 0 and out.strip() == "OK: no mismatches found"


@pytest.mark.parametrize("change, level, words", [
    (lambda m: m.replace("smtpd_milters = unix:/run/scanmilter/scanmilter.sock", "smtpd_milters ="),
     "error", "smtpd_milters (empty) does not name scanmilter's socket"),
    (lambda m: m.replace("non_smtpd_milters = $smtpd_milters\n", ""), "warning", "non_smtpd_milters is empty"),
    (lambda m: m.replace("milter_default_action = tempfail", "milter_default_action = accept"),
     "error", "milter_default_action = accept"),
    (lambda m: m + "milter_content_timeout = 20s\n", "error", "milter_content_timeout (20s) is not above"),
    (lambda m: m.replace("{auth_authen} ", ""), "error", "lacks {auth_authen}"),
    (lambda m: m.replace("message_size_limit = 10240000", "message_size_limit = 104857600"),
     "warning", "Postfix accepts messages up to 104857600 bytes"),
    (lambda m: m.replace("milter_protocol = 6", "milter_protocol = 2"), "warning", "milter_protocol is below 6"),
    (lambda m: m + "milter_connect_macros = {daemon_name} v _\n", "warning", "milter_connect_macros lacks j"),
    (lambda m: m + "milter_helo_macros =\n", "warning", "milter_helo_macros lacks {tls_version}"),
])
def test_each_mistake_is_reported_with_a_fix(tmp_path, capsys, change, level, words):
    rc, out = check(tmp_path, capsys, main_cf=change(GOOD))
    assert f"{level}: " in out and words in out and "  fix: " in out, out
    assert rc == (1 if level == "error" else 0)


def test_clamd_without_alert_exceeds_max_is_an_error(tmp_path, capsys):
    for conf in ("StreamMaxLength 25M\n", "StreamMaxLength 25M\nAlertExceedsMax no\n"):
        rc, out = check(tmp_path, capsys, clamd=conf)
        assert rc == 1 and "lacks AlertExceedsMax yes" in out and "fix: AlertExceedsMax yes" in out, out


@pytest.mark.parametrize("settings, words", [
    ("clamd_size_limit = 1048576\n", "messages of 1048577 to 26214400 bytes are not sent to clamd"),
    ('spamd_oversize_action = "skip"\n', "messages of 524289 to 26214400 bytes are not sent to spamd"),
])
def test_every_band_of_unscanned_sizes_is_reported(tmp_path, capsys, settings, words):
    rc, out = check(tmp_path, capsys, settings=settings)
    assert rc == 0 and f"warning: {words}" in out, out


def test_authenticated_senders_unseen_by_spamd_warns_even_when_inbound(tmp_path, capsys):
    policy = tmp_path / "policy.toml"
    policy.write_text("[directions]\nauthenticated_is_outbound = false\n")
    rc, out = check(tmp_path, capsys, main_cf=GOOD.replace("{auth_authen} ", ""),
                    settings=f'policy_file = "{policy}"\n')
    assert rc == 0 and "warning: milter_mail_macros lacks {auth_authen}: spamd cannot see" in out, out


def test_clamd_stream_limit_below_ours(tmp_path, capsys):
    rc, out = check(tmp_path, capsys, clamd="StreamMaxLength 10M\n")
    assert rc == 1 and "above clamd's StreamMaxLength (10485760)" in out


def test_chrooted_smtpd_needs_the_socket_inside_the_queue_directory(tmp_path, capsys):
    rc, out = check(tmp_path, capsys, master="smtp inet n - y - - smtpd\n")
    assert rc == 1 and "smtpd runs chrooted" in out
    main = GOOD.replace("unix:/run/scanmilter/scanmilter.sock", "unix:/scanmilter/scanmilter.sock")
    rc, out = check(tmp_path, capsys, main_cf=main, master="smtp inet n - y - - smtpd\n",
                    settings='milter_socket = "unix:/var/spool/postfix/scanmilter/scanmilter.sock"\n')
    assert rc == 0, out


def test_a_socket_postfix_cannot_write(tmp_path, capsys):
    rc, out = check(tmp_path, capsys, settings='milter_socket_mode = "0600"\n')
    assert rc == 1 and "cannot write to the milter socket" in out


def test_outbound_services_need_daemon_name(tmp_path, capsys):
    (tmp_path / "policy.toml").write_text('[directions]\noutbound_services = ["submission"]\n')
    rc, out = check(tmp_path, capsys, main_cf=GOOD + "milter_connect_macros = j _\n",
                    settings=f'policy_file = "{tmp_path}/policy.toml"\n')
    assert rc == 1 and "lacks {daemon_name}" in out
