"""The real layout, end to end: the built wheel in a fresh venv, the units and /etc/scanmilter files
as tools/install-units installs them, the daemon run the way systemd runs the shipped unit, beside
a Postfix that uses Debian's packaged master.cf (smtpd and cleanup chrooted in the queue directory).

What the test does as systemd would for scanmilter.service (and scanmilter-purge.service):
- runs ExecStartPre, then execs ExecStart, as User= with Group= as its group and, as supplementary
  groups, what initgroups(User, Group) gives plus SupplementaryGroups=; with UMask=, no new
  privileges and the environment systemd gives a service;
- creates StateDirectory= and RuntimeDirectory= (owner User:Group, their modes) and runs
  `systemd-tmpfiles --create` on the installed tmpfiles snippet; the user comes from the installed
  sysusers snippet (`systemd-sysusers`, on this machine, only if it is missing);
- ProtectSystem=strict, within the installed tree: the tree is read-only in a mount namespace of
  the daemon's own, except ReadWritePaths=, StateDirectory= and RuntimeDirectory=, which are
  writable. (A socket path the unit does not allow to be written fails here as it would on a server.)

Deviations from a real server, each only to stay private and off the system's Postfix:
- everything is installed under DESTDIR=SCRATCH/sys (tools/install-units), so every path of the
  installed files that starts with /etc/scanmilter, /var/lib/scanmilter, /var/spool/postfix or
  /run/scanmilter is read under that root: in the unit's commands (-c) and in scanmilter.toml
  (milter_socket, policy_file, quarantine_directory); /usr/local/bin/scanmilter is the venv's;
- scanmilter.toml's clamd_socket, spamd_socket, quarantine_release_address and metrics_address
  point at the test stack's clamd, spamd, release smtpd and a free port;
- the private Postfix's queue directory, its chroot, is SCRATCH/sys/var/spool/postfix; its
  main.cf is the stack's (loopback only, relay to the sink, Debian's message_size_limit) plus the
  README's first "Wiring it into Postfix" block as written; master.cf is Debian's packaged one
  with the smtp service on a loopback port and the release service added (a chrooted smtpd
  without milters, as in the README's Quarantine section), and the chroot is filled by Debian's
  own configure-instance.sh; each broken variant is one more chrooted smtpd, added with
  `postconf -M` for its test and removed after;
- the purge runs with --older-than 0s (entries held seconds ago are not 30 days old);
- the quarantine test edits the installed policy.toml as an admin would (inbound
  quarantine_level 7; the stack's rule SCANMILTER_TAG_TEST scores 8) and reloads (ExecReload).
Not emulated: PrivateUsers=, PrivateTmp=, the system call filter and the other options that do
not bear on paths, users or groups.
"""
import contextlib
import grp
import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

import procs
import stack as stacklib
from conftest import ROOT, scratch
from support import GTUBE, OUTSIDE, install_wheel, make, wait_for

SYSTEM_PYTHON = "/usr/bin/python3"   # the README's `python3 -m venv`


def _sandbox_missing() -> str:
    """Why the unit's user, groups and ProtectSystem= cannot be reproduced here ("" if they can)."""
    missing = [t for t in ("unshare", "setpriv", "systemd-tmpfiles", "systemd-sysusers") if not shutil.which(t)]
    if missing:
        return f"{', '.join(missing)} not installed"
    if subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "true"], capture_output=True).returncode:
        return "no mount namespaces here (ProtectSystem= is reproduced in one)"
    return ""


SANDBOX_MISSING = _sandbox_missing() if os.geteuid() == 0 else "runs the daemon as its own user: needs root"
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not stacklib.DEBIAN_MASTER_CF.exists(), reason="not Debian's Postfix"),
              pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="no python3 of the system"),
              pytest.mark.skipif(bool(SANDBOX_MISSING), reason=SANDBOX_MISSING)]

SERVER_PATHS = ("/etc/scanmilter", "/var/lib/scanmilter", "/var/spool/postfix", "/run/scanmilter")
SOCKET_INSIDE = "/scanmilter/scanmilter.sock"      # the shipped socket, as chrooted Postfix names it


def run(*cmd, ok=True, **kw):
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    if ok:
        assert out.returncode == 0, f"{cmd}: {out.stdout}{out.stderr}"
    return out


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Key -> values of a unit's [Service] section, in order."""
    values, section = {}, ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def readme_wiring_block() -> dict[str, str]:
    """main.cf lines of the README's first block under "Wiring it into Postfix"."""
    section = (ROOT / "README.md").read_text().split("## Wiring it into Postfix", 1)[1]
    block = section.split("```\n", 2)[1]
    return dict((k.strip(), v.strip()) for k, _, v in (ln.partition("=") for ln in block.splitlines() if "=" in ln))


class Server:
    """The installed tree, the stack beside it and the daemon run as its unit says."""

    def __init__(self):
        # the README's `python3 -m venv /opt/scanmilter`: Debian's python3, which the service user can run
        work, _ = install_wheel(SYSTEM_PYTHON, "venv-system")
        self.bin = work / "venv-system" / "bin" / "scanmilter"
        self.root = Path(scratch("scanmilter-server-"))
        self.sys = self.root / "sys"
        run(ROOT / "tools" / "install-units", env={**os.environ, "DESTDIR": str(self.sys)})
        self.conf = self.sys / "etc/scanmilter/scanmilter.toml"
        self.policy = self.sys / "etc/scanmilter/policy.toml"
        self.unit = unit_settings(self.sys / "etc/systemd/system/scanmilter.service")
        self.purge_unit = unit_settings(self.sys / "etc/systemd/system/scanmilter-purge.service")
        self._add_user()
        self.stack = stacklib.Stack(
            self.root, smtp_port=stacklib.free_port(), debian_master=True, queue_dir=self.sys / "var/spool/postfix",
            milter_socket=self.sys / "var/spool/postfix/scanmilter/scanmilter.sock", before_start=self._systemd_does,
            postfix_settings={"message_size_limit": "10240000", **readme_wiring_block()},
            milter_cmd=self.command(self.unit, "ExecStart", self.conf, pre=True))
        self._private_config()

    # ---------------------------------------------------------------- as systemd does
    def _add_user(self):
        sysusers = self.sys / "usr/lib/sysusers.d/scanmilter.conf"
        try:
            pwd.getpwnam("scanmilter")
        except KeyError:
            run("systemd-sysusers", sysusers)
        # the installed tree's user database, which systemd-tmpfiles --root reads
        for name, db in (("passwd", "/etc/passwd"), ("group", "/etc/group")):
            lines = [ln for ln in open(db) if ln.split(":")[0] in ("postfix", "scanmilter")]
            (self.sys / "etc" / name).write_text("".join(lines))

    def _systemd_does(self, stack):
        """Boot and unit start-up: tmpfiles, then the unit's own state and runtime directories."""
        run("systemd-tmpfiles", f"--root={self.sys}", "--create")
        for unit in (self.unit, self.purge_unit):
            user, group = pwd.getpwnam(unit["User"][0]), grp.getgrnam(unit["Group"][0])
            for kind, base in (("StateDirectory", "var/lib"), ("RuntimeDirectory", "run")):
                for name in unit.get(kind, []):
                    path = self.sys / base / name
                    path.mkdir(parents=True, exist_ok=True)
                    os.chown(path, user.pw_uid, group.gr_gid)
                    path.chmod(int(unit.get(f"{kind}Mode", ["0755"])[0], 8))

    def writable(self, unit) -> list[Path]:
        """What ProtectSystem=strict leaves writable in the installed tree."""
        paths = [p.lstrip("-") for p in unit.get("ReadWritePaths", [])]
        paths += [f"/var/lib/{n}" for n in unit.get("StateDirectory", [])]
        paths += [f"/run/{n}" for n in unit.get("RuntimeDirectory", [])]
        return [self.sys / p.lstrip("/") for p in paths]

    def command(self, unit, key, conf, pre=False, extra=()):
        """The unit's command line(s) as systemd would run them, with its user, groups, umask and
        sandbox, reading the installed files under the test's root."""
        assert unit["ProtectSystem"] == ["strict"] and unit["NoNewPrivileges"] == ["yes"]
        user, group = unit["User"][0], unit["Group"][0]
        gid = grp.getgrnam(group).gr_gid
        gids = set(os.getgrouplist(user, gid)) | {grp.getgrnam(g).gr_gid for v in unit.get("SupplementaryGroups", [])
                                                  for g in v.split()}

        def here(line, more=()):
            assert line.startswith("/usr/local/bin/scanmilter ") and " -c /etc/scanmilter/scanmilter.toml" in line
            line = line.replace("/usr/local/bin/scanmilter", str(self.bin), 1)
            return shlex.join(shlex.split(line.replace("/etc/scanmilter/scanmilter.toml", str(conf))) + list(more))
        steps = [here(c) for c in unit.get("ExecStartPre", [])] if pre else []
        steps.append("exec " + here(unit[key][0], extra))
        inner = f"umask {unit['UMask'][0]} && " + " && ".join(steps)
        env = ["env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8",
               f"USER={user}", f"LOGNAME={user}", f"HOME={self.sys}/var/lib/scanmilter", "SHELL=/usr/sbin/nologin"]
        become = ["setpriv", f"--reuid={user}", f"--regid={group}", f"--groups={','.join(map(str, sorted(gids)))}",
                  "--no-new-privs", "--"]
        mounts = []
        for path, mode in [(self.sys, "ro")] + [(p, "rw") for p in self.writable(unit)]:
            q = shlex.quote(str(path))
            mounts += [f"mount --bind {q} {q}", f"mount -o remount,bind,{mode} {q}"]
        script = " && ".join(mounts + ["exec " + shlex.join(env + become + ["sh", "-c", inner])])
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script]

    # ---------------------------------------------------------------- private copies of the files
    def _private_config(self):
        st = self.stack
        text = self.conf.read_text()
        text = re.sub(r'"(unix:)?(/(?:%s)\b[^"]*)"' % "|".join(p[1:] for p in SERVER_PATHS),
                      lambda m: f'"{m.group(1) or ""}{self.sys}{m.group(2)}"', text)
        for key, value in (("clamd_socket", f"unix:{st.clamd_socket}"),
                           ("spamd_socket", f"inet:127.0.0.1:{st.spamd_port}"),
                           ("quarantine_release_address", f"inet:127.0.0.1:{st.release_port}"),
                           ("metrics_address", f"127.0.0.1:{st.metrics_port}")):
            text, n = re.subn(rf"^{key} = .*$", f'{key} = "{value}"', text, flags=re.M)
            assert n == 1, key
        self.conf.write_text(text)
        cfg = tomllib.loads(text)
        assert cfg["milter_socket"] == f"unix:{self.sys}/var/spool/postfix{SOCKET_INSIDE}"
        # nothing of this machine's own /etc, /var or /run is used
        assert not [v for v in cfg.values() if isinstance(v, str) and re.search(r"(^|:)/(etc|var|run)/", v)]

    def variant_config(self, **settings) -> Path:
        text = self.conf.read_text()
        for key, value in settings.items():
            text = re.sub(rf"^{key} = .*$", f'{key} = "{value}"', text, flags=re.M)
        path = self.root / f"variant-{len(list(self.root.glob('variant-*')))}.toml"
        path.write_text(text)
        path.chmod(0o644)
        return path

    @contextlib.contextmanager
    def smtpd_with_milters(self, milters):
        """One more smtpd in the live instance, chrooted like Debian's smtp service, whose
        smtpd_milters (-o) is `milters`; removed again afterwards. Yields its port."""
        st, port = self.stack, stacklib.free_port()
        service = f"127.0.0.1:{port}/inet"
        run("postconf", "-c", st.postfix_conf, "-M", f"{service}=127.0.0.1:{port} inet n - y - - smtpd "
            f"-o smtpd_milters={milters}")
        run("postfix", "-c", st.postfix_conf, "reload")
        try:
            wait_for(lambda: procs.accepts(port), f"the smtpd on port {port}")
            yield port
        finally:
            run("postconf", "-c", st.postfix_conf, "-MX", service)
            run("postfix", "-c", st.postfix_conf, "reload")

    # ---------------------------------------------------------------- commands of the admin
    def scanmilter(self, *args, ok=None):
        """The installed command, run by root as the README shows."""
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        return run(self.bin, *args, ok=bool(ok), env=env, cwd=self.root)

    def postfix_check(self, conf=None):
        """postfix-check of the live instance's main.cf and master.cf."""
        return self.scanmilter("postfix-check", "-c", conf or self.conf,
                               "--main-cf", self.stack.postfix_conf / "main.cf",
                               "--clamd-conf", self.stack.root / "clamd/clamd.conf")

    def daemon_pid(self) -> int:
        [(pid, _)] = self.stack.pids("scanmilter")
        return pid


@pytest.fixture(scope="module")
def server():
    s = Server()
    s.stack.start()
    yield s
    s.stack.stop()


def errors(out) -> list[str]:
    return [ln for ln in out.stdout.splitlines() if ln.startswith("error:")]


# ---------------------------------------------------------------- the layout itself

def test_daemon_runs_as_the_unit_says_with_the_socket_in_the_chroot(server):
    pid = server.daemon_pid()
    status = dict(ln.split(":\t", 1) for ln in open(f"/proc/{pid}/status").read().splitlines() if ":\t" in ln)
    scanmilter, postfix = pwd.getpwnam("scanmilter"), grp.getgrnam("postfix")
    assert status["Uid"].split()[0] == str(scanmilter.pw_uid) and status["Gid"].split()[0] == str(postfix.gr_gid)
    assert set(status["Groups"].split()) == {str(postfix.gr_gid), str(grp.getgrnam("scanmilter").gr_gid)}
    assert str(server.bin) in open(f"/proc/{pid}/cmdline").read()
    sock = server.stack.milter_socket
    st, parent = sock.stat(), sock.parent.stat()
    assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o777)) == (scanmilter.pw_uid, postfix.gr_gid, "0o660")
    assert (parent.st_uid, parent.st_gid, oct(parent.st_mode & 0o777)) == (scanmilter.pw_uid, postfix.gr_gid, "0o750")
    # Postfix's user reaches the socket through the directory the tmpfiles snippet made
    probe = ("import socket; s = socket.socket(socket.AF_UNIX); s.connect(%r); print('connected')" % str(sock))
    out = run("setpriv", "--reuid=postfix", "--regid=postfix", "--init-groups", "--", "/usr/bin/python3", "-c", probe)
    assert out.stdout.strip() == "connected"
    main_cf = (server.stack.postfix_conf / "main.cf").read_text()
    assert f"smtpd_milters = unix:{SOCKET_INSIDE}\n" in main_cf and "non_smtpd_milters = $smtpd_milters\n" in main_cf


def test_clean_gtube_and_eicar_from_outside(server):
    st = server.stack
    clean = make("server layout clean", body="Hello,\nan ordinary message through the chroot.\n")
    assert st.send(clean, "alice@outside.test", ["bob@example.com"], xclient_addr=OUTSIDE)["code"] == 250
    r = st.send(make("server layout gtube", body=GTUBE + "\n"), "alice@outside.test", ["bob@example.com"],
                xclient_addr=OUTSIDE)
    assert r["code"] == 550 and "spam" in r["reply"].lower(), r
    r = st.send(make("server layout eicar", attachment=stacklib.eicar()), "alice@outside.test", ["bob@example.com"],
                xclient_addr=OUTSIDE)
    assert r["code"] == 550 and "virus" in r["reply"].lower(), r
    st.wait_drained()
    [d] = [d for d in st.delivered() if b"server layout clean" in d.data]
    assert d.message()["X-Virus-Status"] == "clean" and d.message()["X-Spam-Status"].startswith("No,")
    assert not [d for d in st.delivered() if b"server layout gtube" in d.data or b"server layout eicar" in d.data]


def test_local_submission_goes_through_the_chrooted_cleanup(server):
    """non_smtpd_milters = $smtpd_milters: cleanup is chrooted too and reaches the same name."""
    st = server.stack
    msg = b"From: root@scanmilter.test\nTo: bob@example.com\nSubject: server layout sendmail\n\nfrom cron\n"
    run("sendmail", "-C", st.postfix_conf, "-f", "root@scanmilter.test", "-i", "bob@example.com", input=msg.decode())
    wait_for(lambda: [d for d in st.delivered() if b"server layout sendmail" in d.data], "the local message")
    [d] = [d for d in st.delivered() if b"server layout sendmail" in d.data]
    queue_id = re.search(r"\bid (\w+)", d.message()["Received"]).group(1)
    [line] = st.wait_logged(f"{queue_id}: action=")
    assert "direction=outbound" in line


def test_selftest_passes(server):
    out = server.scanmilter("selftest", "-c", server.conf, ok=True)
    for case in ("clean", "gtube", "eicar"):
        assert re.search(rf"^PASS {case}\b", out.stdout, re.M), out.stdout
    assert "FAIL" not in out.stdout


# ---------------------------------------------------------------- postfix-check and the broken variants

def test_postfix_check_is_ok_for_the_shipped_layout(server):
    out = server.postfix_check()
    assert out.returncode == 0 and not errors(out), out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith("OK"), out.stdout


def test_a_bare_socket_path_tempfails_mail_and_is_named(server):
    st = server.stack
    with server.smtpd_with_milters(SOCKET_INSIDE) as port:
        r = st.send(make("bare path"), "alice@outside.test", ["bob@example.com"], xclient_addr=OUTSIDE, port=port)
        assert r["code"] == 451 and "4.3.5" in r["reply"], r
        out = server.postfix_check()
    assert out.returncode == 1 and any(SOCKET_INSIDE in e and str(port) in e for e in errors(out)), out.stdout
    fixes = [ln for ln in out.stdout.splitlines() if "fix:" in ln and "milters" in ln]
    assert fixes and all(f"unix:{SOCKET_INSIDE}" in f for f in fixes), out.stdout


def test_the_host_path_of_the_socket_tempfails_mail_and_is_named(server):
    """smtpd_milters naming /var/spool/postfix/... from a chrooted smtpd: not there inside the chroot."""
    st = server.stack
    host_path = f"unix:{st.milter_socket}"
    with server.smtpd_with_milters(host_path) as port:
        r = st.send(make("host path"), "alice@outside.test", ["bob@example.com"], xclient_addr=OUTSIDE, port=port)
        assert r["code"] == 451 and "4.7.1" in r["reply"], r
        st.wait_logged(f"connect to Milter service {host_path}: No such file or directory", service="postfix")
        out = server.postfix_check()
    assert out.returncode == 1 and any("chroot" in e and str(port) in e for e in errors(out)), out.stdout


def test_the_old_socket_outside_the_chroot_tempfails_mail_and_is_named(server):
    """The layout shipped before: milter_socket in /run/scanmilter, which a chrooted smtpd cannot
    see even while scanmilter listens there (every message 451 4.7.1)."""
    st = server.stack
    run_socket = server.sys / "run/scanmilter/scanmilter.sock"
    conf = server.variant_config(milter_socket=f"unix:{run_socket}", metrics_address="")
    with open(server.root / "variant-scanmilter.log", "ab") as log:
        proc = subprocess.Popen(server.command(server.unit, "ExecStart", conf), stdout=log, stderr=log,
                                start_new_session=True)
    try:
        wait_for(lambda: procs.accepts(run_socket), "scanmilter on the /run socket")
        with server.smtpd_with_milters(f"unix:{run_socket}") as port:
            r = st.send(make("run socket"), "alice@outside.test", ["bob@example.com"], xclient_addr=OUTSIDE,
                        port=port)
            assert r["code"] == 451 and "4.7.1" in r["reply"], r
            st.wait_logged(f"connect to Milter service unix:{run_socket}: No such file or directory",
                           service="postfix")
            out = server.postfix_check(conf=conf)
        assert out.returncode == 1 and any("chroot" in e and str(port) in e for e in errors(out)), out.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=stacklib.STOP_TIMEOUT + 5)


def test_scanmilter_stopped_tempfails_mail_and_is_named(server):
    st = server.stack
    st.stop_service("scanmilter")
    try:
        r = st.send(make("stopped"), "alice@outside.test", ["bob@example.com"], xclient_addr=OUTSIDE)
        assert r["code"] == 451 and "4.7.1" in r["reply"], r
        out = server.postfix_check()
        assert out.returncode == 1 and errors(out), out.stdout
        assert any(str(st.milter_socket) in e or SOCKET_INSIDE in e for e in errors(out)), out.stdout
    finally:
        st.start_service("scanmilter")
    assert server.postfix_check().returncode == 0


# ---------------------------------------------------------------- quarantine: release by root, purge as scanmilter

def test_release_by_root_then_purge_as_scanmilter(server):
    st = server.stack
    # the admin's edit of the installed policy: hold inbound mail from 7 points (the stack's test
    # rule gives 8), then `systemctl reload scanmilter` (ExecReload)
    text = server.policy.read_text()
    inbound = text.index("[inbound]")
    head, tail = text[:inbound], text[inbound:]
    tail, n = re.subn(r"^quarantine_level = inf$", "quarantine_level = 7.0", tail, count=1, flags=re.M)
    assert n == 1
    server.policy.write_text(head + tail)
    [reload] = server.unit["ExecReload"]
    reloads = st.logs["scanmilter"].read_text().count("reloaded configuration")
    run("sh", "-c", reload, env={**os.environ, "MAINPID": str(server.daemon_pid())})
    st.wait_logged("reloaded configuration", count=reloads + 1)

    r = st.send(make("scanmilter-tag-test server layout"), "alice@outside.test", ["bob@example.com"],
                xclient_addr=OUTSIDE)
    assert r["code"] == 250, r
    st.wait_drained(logged="action=quarantine")
    listed = server.scanmilter("quarantine", "list", "--json", "-c", server.conf, ok=True)
    [entry] = [json.loads(ln) for ln in listed.stdout.splitlines()]
    assert not [d for d in st.delivered() if b"scanmilter-tag-test server layout" in d.data]

    out = server.scanmilter("quarantine", "release", entry["id"], "-c", server.conf, ok=True)
    assert "released to bob@example.com" in out.stdout
    wait_for(lambda: [d for d in st.delivered() if b"scanmilter-tag-test server layout" in d.data],
             "the released message")

    purge = run(*server.command(server.purge_unit, "ExecStart", server.conf, extra=["--older-than", "0s"]), ok=False)
    assert purge.returncode == 0 and "deleted 1 entry" in purge.stdout, purge.stdout + purge.stderr
    listed = server.scanmilter("quarantine", "list", "--json", "-c", server.conf, ok=True)
    assert listed.stdout.strip() == ""
    entries = server.sys / "var/lib/scanmilter/quarantine/entries"
    assert not [p for p in entries.rglob("*") if p.is_file()]
