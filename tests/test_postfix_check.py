"""postfix-check against real Postfix configurations (read by Postfix's own postconf), one mistake
each; then against live sockets: none, a stale one, one Postfix may not use, one where something
else listens, and a running scanmilter."""
import grp
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, scratch
from scanmilter import cli
from scanmilter.commands import miltertalk as MT
from support import as_user, needs_root

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
# Debian's packaged master.cf chroots smtpd and cleanup
MASTER_DEBIAN = "smtp inet n - y - - smtpd\npickup unix n - y 60 1 pickup\ncleanup unix n - y - 0 cleanup\n"
SOCKET = 'milter_socket = "unix:/run/scanmilter/scanmilter.sock"\n'
IN_CHROOT = 'milter_socket = "unix:/var/spool/postfix/scanmilter/scanmilter.sock"\n'


def check(tmp_path, capsys, main_cf=GOOD, master=MASTER_NO_CHROOT, clamd="StreamMaxLength 25M\nAlertExceedsMax yes\n",
          settings="", socket=SOCKET, live=False, extra=()):
    """postfix-check on these files; offline (--no-connect) unless live."""
    (tmp_path / "main.cf").write_text(main_cf)
    (tmp_path / "master.cf").write_text(master)
    (tmp_path / "clamd.conf").write_text(clamd)
    (tmp_path / "scanmilter.toml").write_text(socket + settings)
    rc = cli.main(["postfix-check", "-c", str(tmp_path / "scanmilter.toml"), "--main-cf", str(tmp_path / "main.cf"),
                   "--clamd-conf", str(tmp_path / "clamd.conf"), *([] if live else ["--no-connect"]), *extra])
    return rc, capsys.readouterr().out


def fixes(out):
    return [line.split("fix: ", 1)[1] for line in out.splitlines() if line.startswith("  fix: ")]


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
    rc, out = check(tmp_path, capsys, master=MASTER_DEBIAN)
    assert rc == 1 and "smtpd runs chrooted" in out, out
    assert "postconf -e 'smtpd_milters = unix:/scanmilter/scanmilter.sock'" in out
    main = GOOD.replace("unix:/run/scanmilter/scanmilter.sock", "unix:/scanmilter/scanmilter.sock")
    rc, out = check(tmp_path, capsys, main_cf=main, master=MASTER_DEBIAN, socket=IN_CHROOT)
    assert rc == 0 and out.strip() == "OK: no mismatches found", out


def test_a_socket_postfix_cannot_write(tmp_path, capsys):
    rc, out = check(tmp_path, capsys, settings='milter_socket_mode = "0600"\n')
    assert rc == 1 and "cannot write to the milter socket" in out


# ---------------------------------------------------------------- milter lists Postfix refuses or misreads

def apply_and_recheck(tmp_path, capsys, out, **kw):
    """Run the `postconf -e` fixes postfix-check printed on the test's main.cf, then check again."""
    commands = [f for f in fixes(out) if f.startswith("postconf -e ")]
    assert commands, out
    for command in commands:
        subprocess.run(shlex.split(command)[:1] + ["-c", str(tmp_path)] + shlex.split(command)[1:], check=True)
    return check(tmp_path, capsys, main_cf=(tmp_path / "main.cf").read_text(), **kw)


@pytest.mark.parametrize("main_cf, master, socket, fix", [
    # the trap: the path alone, where Postfix wants transport:endpoint
    (GOOD.replace("unix:/run/", "/run/"), MASTER_NO_CHROOT, SOCKET,
     "postconf -e 'smtpd_milters = unix:/run/scanmilter/scanmilter.sock'"),
    (GOOD.replace("unix:/run/", "/run/"), MASTER_DEBIAN, IN_CHROOT.replace("/var/spool/postfix", "/run"),
     "milter_socket = \"unix:/var/spool/postfix/scanmilter/scanmilter.sock\" in scanmilter's configuration, then "
     "postconf -e 'smtpd_milters = unix:/scanmilter/scanmilter.sock' (or chroot n for smtp/inet in master.cf)"),
    (GOOD.replace("unix:/run/scanmilter/scanmilter.sock", "/scanmilter/scanmilter.sock"), MASTER_DEBIAN, IN_CHROOT,
     "postconf -e 'smtpd_milters = unix:/scanmilter/scanmilter.sock'"),
    # another milter's bare path breaks scanmilter too: Postfix refuses the whole list
    (GOOD.replace("unix:/run/scanmilter/scanmilter.sock", "unix:/run/scanmilter/scanmilter.sock /run/other.sock"),
     MASTER_NO_CHROOT, SOCKET, "postconf -e 'smtpd_milters = unix:/run/scanmilter/scanmilter.sock unix:/run/other.sock'"),
    (GOOD.replace("non_smtpd_milters = $smtpd_milters", "non_smtpd_milters = /run/scanmilter/scanmilter.sock"),
     MASTER_NO_CHROOT, SOCKET, "postconf -e 'non_smtpd_milters = unix:/run/scanmilter/scanmilter.sock'"),
], ids=["smtpd", "smtpd-chroot-socket-outside", "smtpd-chroot", "another-milter", "non-smtpd"])
def test_a_bare_path_is_an_error_and_the_fix_names_the_transport(tmp_path, capsys, main_cf, master, socket, fix):
    """Postfix answers 451 4.3.5 to all mail for "smtpd_milters = /path" ("Milter service needs
    transport:endpoint"). postfix-check used to say OK, and to suggest that very line."""
    rc, out = check(tmp_path, capsys, main_cf=main_cf, master=master, socket=socket)
    assert rc == 1 and "is not transport:endpoint" in out and "451 4.3.5" in out, out
    assert "OK" not in out and fix in fixes(out), out
    assert all("unix:" in f for f in fixes(out)), out
    if socket != IN_CHROOT.replace("/var/spool/postfix", "/run"):
        rc, out = apply_and_recheck(tmp_path, capsys, out, master=master, socket=socket)
        assert rc == 0 and out.strip() == "OK: no mismatches found", out


@pytest.mark.parametrize("master, non_smtpd, words, fix", [
    # cleanup chrooted, smtpd not: $smtpd_milters names the path outside the chroot
    ("smtp inet n - n - - smtpd\ncleanup unix n - y - 0 cleanup\n", "$smtpd_milters",
     "non_smtpd_milters (main.cf) names unix:/var/spool/postfix/scanmilter/scanmilter.sock, but cleanup/unix runs "
     "chrooted in /var/spool/postfix: it reaches scanmilter's socket as unix:/scanmilter/scanmilter.sock",
     "postconf -e 'non_smtpd_milters = unix:/scanmilter/scanmilter.sock'"),
    ("smtp inet n - n - - smtpd\ncleanup unix n - n - 0 cleanup\n", "unix:/elsewhere.sock",
     "non_smtpd_milters (unix:/elsewhere.sock) does not name scanmilter's socket",
     "postconf -e 'non_smtpd_milters = unix:/elsewhere.sock unix:/run/scanmilter/scanmilter.sock'"),
])
def test_non_smtpd_milters_must_name_the_socket_as_cleanup_sees_it(tmp_path, capsys, master, non_smtpd, words, fix):
    socket = IN_CHROOT if non_smtpd == "$smtpd_milters" else SOCKET
    main = GOOD.replace("non_smtpd_milters = $smtpd_milters", f"non_smtpd_milters = {non_smtpd}").replace(
        "unix:/run/scanmilter/", f"unix:{socket.split(':')[1].rsplit('/', 1)[0]}/")
    rc, out = check(tmp_path, capsys, main_cf=main, master=master, socket=socket)
    assert rc == 1 and words in out and fixes(out) == [fix], out
    rc, out = apply_and_recheck(tmp_path, capsys, out, master=master, socket=socket)
    assert rc == 0 and out.strip() == "OK: no mismatches found", out


def test_socket_in_the_chroot_with_cleanup_outside_it(tmp_path, capsys):
    """smtpd chrooted, cleanup not: the two lists must name the same socket differently."""
    main = GOOD.replace("unix:/run/scanmilter/scanmilter.sock", "unix:/scanmilter/scanmilter.sock")
    master = "smtp inet n - y - - smtpd\ncleanup unix n - n - 0 cleanup\n"
    rc, out = check(tmp_path, capsys, main_cf=main, master=master, socket=IN_CHROOT)
    assert rc == 1 and "cleanup/unix does not run chrooted: it reaches scanmilter's socket as " \
                       "unix:/var/spool/postfix/scanmilter/scanmilter.sock" in out, out
    rc, out = apply_and_recheck(tmp_path, capsys, out, master=master, socket=IN_CHROOT)
    assert rc == 0, out
    assert "non_smtpd_milters = unix:/var/spool/postfix/scanmilter/scanmilter.sock" in (tmp_path / "main.cf").read_text()


def test_services_read_their_own_milters_from_master_cf(tmp_path, capsys):
    """A -o override in master.cf is what that service uses: empty on purpose (the quarantine
    release service), or wrong for its chroot."""
    release = "127.0.0.1:10026 inet n - y - - smtpd -o smtpd_milters= -o non_smtpd_milters=\n"
    rc, out = check(tmp_path, capsys, master=MASTER_NO_CHROOT + release)
    assert rc == 0 and out.strip() == "OK: no mismatches found", out
    submission = "submission inet n - n - - smtpd\n  -o smtpd_milters=/run/scanmilter/scanmilter.sock\n"
    rc, out = check(tmp_path, capsys, master=MASTER_NO_CHROOT + submission)
    assert rc == 1 and "smtpd_milters entry '/run/scanmilter/scanmilter.sock' (submission/inet)" in out, out
    assert "postconf -P 'submission/inet/smtpd_milters=unix:/run/scanmilter/scanmilter.sock'" in fixes(out)


def test_chrooted_and_unchrooted_smtpd_cannot_share_a_unix_path(tmp_path, capsys):
    main = GOOD.replace("unix:/run/scanmilter/scanmilter.sock", "unix:/scanmilter/scanmilter.sock")
    rc, out = check(tmp_path, capsys, main_cf=main, master=MASTER_NO_CHROOT + "submission inet n - y - - smtpd\n",
                    socket=IN_CHROOT)
    assert rc == 1 and "smtpd_milters (main.cf) serves chrooted (submission/inet) and unchrooted (smtp/inet) " \
                       "services: one unix path cannot name the socket for both" in out, out


# ---------------------------------------------------------------- live checks

def open_dir():
    """A directory user postfix can search (pytest's tmp_path is closed to it)."""
    d = scratch("scanmilter-pfc-")
    os.chmod(d, 0o755)
    return d


def live(tmp_path, capsys, sock, **kw):
    main = GOOD.replace("unix:/run/scanmilter/scanmilter.sock", f"unix:{sock}")
    return check(tmp_path, capsys, main_cf=main, socket=f'milter_socket = "unix:{sock}"\n', live=True, **kw)


@pytest.fixture(scope="module")
def daemon():
    """A real `scanmilter serve` (engines off) on a unix socket in a directory Postfix can reach."""
    d = open_dir()
    sock = f"{d}/scanmilter.sock"
    with open(f"{d}/scanmilter.toml", "w") as f:
        f.write(f'milter_socket = "unix:{sock}"\nmetrics_address = ""\nclamd_enabled = false\n'
                'spamd_enabled = false\n')
    log = open(f"{d}/out.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "scanmilter", "serve", "-c", f"{d}/scanmilter.toml"], stdout=log,
                            stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(ROOT / "milter")))
    try:
        deadline = time.monotonic() + 20
        while True:                 # ready when a negotiation succeeds
            assert proc.poll() is None, open(f"{d}/out.log").read()
            try:
                MT.negotiate_on(MT.connect(f"unix:{sock}", 2))
                break
            except (OSError, MT.MilterError):
                assert time.monotonic() < deadline, "scanmilter did not answer"
                time.sleep(0.05)
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()


@pytest.mark.integration
def test_no_socket_means_scanmilter_is_not_running(tmp_path, capsys):
    rc, out = live(tmp_path, capsys, f"{open_dir()}/scanmilter.sock")
    assert rc == 1 and "scanmilter.sock does not exist: scanmilter is not running" in out, out
    assert "fix: systemctl start scanmilter" in out


@pytest.mark.integration
def test_a_socket_file_left_by_a_stopped_daemon(tmp_path, capsys):
    sock = f"{open_dir()}/scanmilter.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(sock)
    s.close()                   # the file stays, nobody listens
    os.chmod(sock, 0o666)
    rc, out = live(tmp_path, capsys, sock)
    assert rc == 1 and f"nobody accepts connections at unix:{sock}: scanmilter is not running" in out, out


@needs_root
@pytest.mark.integration
def test_a_running_scanmilter_that_postfix_may_reach_passes(tmp_path, capsys, daemon):
    """Connected as user postfix, with postfix's primary group only, as smtpd and cleanup run."""
    os.chown(daemon, 0, grp.getgrnam("postfix").gr_gid)          # systemd: Group=postfix
    rc, out = live(tmp_path, capsys, daemon)
    assert rc == 0, out
    assert out.splitlines() == [f"live: a milter answered at unix:{daemon} (as user postfix)",
                                "OK: no mismatches found"]


@needs_root
@pytest.mark.integration
def test_a_running_scanmilter_that_postfix_may_not_reach_fails(tmp_path, capsys, daemon):
    os.chown(daemon, 0, 0)                                       # 0660 root:root: closed to postfix
    try:
        rc, out = live(tmp_path, capsys, daemon)
    finally:
        os.chown(daemon, 0, grp.getgrnam("postfix").gr_gid)
    assert rc == 1 and f"Postfix (user postfix) cannot connect to the milter socket {daemon}: Permission denied " \
                       "(mode 0660, owner root:root)" in out, out
    assert "live:" not in out


@needs_root
@pytest.mark.integration
def test_as_another_user_the_modes_are_judged_and_root_is_asked_for(tmp_path, capsys, daemon):
    d = open_dir()
    main = GOOD.replace("unix:/run/scanmilter/scanmilter.sock", f"unix:{daemon}")
    for name, text in (("main.cf", main), ("master.cf", MASTER_NO_CHROOT), ("clamd.conf", "AlertExceedsMax yes\n"),
                       ("scanmilter.toml", f'milter_socket = "unix:{daemon}"\n')):
        with open(f"{d}/{name}", "w") as f:
            f.write(text)
    argv = ["postfix-check", "-c", f"{d}/scanmilter.toml", "--main-cf", f"{d}/main.cf", "--clamd-conf",
            f"{d}/clamd.conf"]
    os.chown(daemon, 0, 0)
    try:
        rc, out = as_user("nobody", lambda: cli.main(argv))
    finally:
        os.chown(daemon, 0, grp.getgrnam("postfix").gr_gid)
    assert rc == 1 and "Postfix (user postfix) cannot connect to the milter socket" in out, out
    assert "warning: not run as root: whether user postfix may connect was judged from modes only" in out
    rc, out = as_user("nobody", lambda: cli.main(argv))
    assert rc == 0 and "cannot connect to the milter socket" not in out and "not run as root" in out, out


def serve_once(sock, behaviour):
    """Something that is not a milter, listening on a unix socket for one connection."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(sock)
    os.chmod(sock, 0o666)
    server.listen(1)
    done = threading.Event()

    def run():
        conn, _ = server.accept()
        if behaviour == "banner":
            conn.sendall(b"220 mail.example.com ESMTP\r\n")
        if behaviour in ("banner", "silent"):
            done.wait(30)
        conn.close()
        server.close()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return done, thread


@pytest.mark.integration
@pytest.mark.parametrize("behaviour, words", [
    # which of the three depends on timing: the close can come before, during or after our write
    ("closes", ("the milter closed the connection", "Connection reset by peer", "Broken pipe")),
    ("banner", ("bad packet length",)),
    ("silent", ("timed out",)),
])
def test_something_else_listening_is_not_a_milter(tmp_path, capsys, behaviour, words):
    sock = f"{open_dir()}/scanmilter.sock"
    done, thread = serve_once(sock, behaviour)
    try:
        rc, out = live(tmp_path, capsys, sock, extra=["--timeout", "1"])
    finally:
        done.set()
        thread.join(10)
    assert rc == 1 and f"something accepts connections at unix:{sock}, but no milter answered the negotiation" \
        in out and any(w in out for w in words), out


def test_outbound_services_need_daemon_name(tmp_path, capsys):
    (tmp_path / "policy.toml").write_text('[directions]\noutbound_services = ["submission"]\n')
    rc, out = check(tmp_path, capsys, main_cf=GOOD + "milter_connect_macros = j _\n",
                    settings=f'policy_file = "{tmp_path}/policy.toml"\n')
    assert rc == 1 and "lacks {daemon_name}" in out


def test_the_scan_deadline_follows_the_spam_engine_in_force(tmp_path, capsys):
    rc, out = check(tmp_path, capsys, settings='spam_engine = "rspamd"\nrspamd_timeout = 400.0\n')
    assert rc == 1 and "milter_content_timeout (300s) is not above scanmilter's scan deadline (400s)" in out, out
    rc, out = check(tmp_path, capsys, settings='spam_engine = "rspamd"\nspamd_timeout = 400.0\n')
    assert "milter_content_timeout" not in out, out          # spamd is not asked
