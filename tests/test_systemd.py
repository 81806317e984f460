"""systemd units: hardened (systemd-analyze security rates them OK), valid (systemd-analyze
verify), and installable into a fresh root with their sysusers and tmpfiles snippets."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
EXPOSURE_LIMIT = 2.0


def run(*cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


@pytest.mark.parametrize("unit", ["scanmilter.service", "scanmilter-purge.service", "scanmilter-notify.service",
                                  "scanmilter-web.service"])
def test_exposure_score_is_ok(unit):
    out = run("systemd-analyze", "security", "--offline=yes", str(ROOT / "systemd" / unit))
    score = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", out.stdout).group(1))
    print(f"{unit}: exposure {score}")
    assert score <= EXPOSURE_LIMIT, out.stdout


def test_units_verify(tmp_path):
    binary = shutil.which("scanmilter") or str(ROOT / ".venv" / "bin" / "scanmilter")
    assert os.access(binary, os.X_OK), binary
    names = ("scanmilter.service", "scanmilter-purge.service", "scanmilter-purge.timer", "scanmilter-notify.service",
             "scanmilter-notify.timer", "scanmilter-web.service")
    for name in names:
        text = (ROOT / "systemd" / name).read_text().replace("/usr/local/bin/scanmilter", binary)
        (tmp_path / name).write_text(text)
    out = run("systemd-analyze", "verify", *(str(tmp_path / n) for n in names))
    assert out.returncode == 0 and "scanmilter" not in out.stderr, out.stderr


def test_install_into_a_fresh_root(tmp_path):
    root = tmp_path / "root"
    assert run(str(ROOT / "tools" / "install-units"), env={**os.environ, "DESTDIR": str(root)}).returncode == 0
    for path in ("etc/systemd/system/scanmilter.service", "etc/systemd/system/scanmilter-purge.timer",
                 "etc/systemd/system/scanmilter-notify.timer", "etc/systemd/system/scanmilter-web.service",
                 "usr/lib/sysusers.d/scanmilter.conf", "usr/lib/tmpfiles.d/scanmilter.conf",
                 "etc/scanmilter/scanmilter.toml", "etc/scanmilter/policy.toml"):
        assert (root / path).is_file(), path
    # the postfix account exists wherever Postfix is installed; copy it into the fresh root
    (root / "etc" / "group").write_text("".join(l for l in open("/etc/group") if l.startswith("postfix:")))
    (root / "etc" / "passwd").write_text("".join(l for l in open("/etc/passwd") if l.startswith("postfix:")))
    assert run("systemd-sysusers", f"--root={root}").returncode == 0
    assert re.search(r"^scanmilter:x:\d+:\d+:.*:/var/lib/scanmilter:/usr/sbin/nologin$",
                     (root / "etc" / "passwd").read_text(), re.M)
    assert run("systemd-tmpfiles", f"--root={root}", "--create").returncode == 0
    spool = root / "var" / "spool" / "postfix" / "scanmilter"
    assert spool.is_dir() and oct(spool.stat().st_mode & 0o777) == "0o750"
    uids = {l.split(":")[0]: int(l.split(":")[2]) for l in (root / "etc" / "passwd").read_text().splitlines()}
    gids = {l.split(":")[0]: int(l.split(":")[2]) for l in (root / "etc" / "group").read_text().splitlines()}
    assert (spool.stat().st_uid, spool.stat().st_gid) == (uids["scanmilter"], gids["postfix"])
    assert oct((root / "etc" / "scanmilter" / "scanmilter.toml").stat().st_mode & 0o777) == "0o640"
    # the installed configuration is valid (its policy file path pointed into the fresh root)
    conf = root / "etc" / "scanmilter" / "scanmilter.toml"
    conf.write_text(conf.read_text().replace('"/etc/scanmilter/policy.toml"', f'"{root}/etc/scanmilter/policy.toml"'))
    out = run(sys.executable, "-m", "scanmilter", "check-config", "-c", str(conf),
              env={**os.environ, "PYTHONPATH": str(ROOT / "milter")})
    assert out.returncode == 0, out.stderr


def _unit(name):
    values = {}
    for line in (ROOT / "systemd" / name).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            values.setdefault(key, []).extend(value.split())
    return values


def _tmpfiles():
    """path -> (type, mode, user, group) of the shipped tmpfiles snippet."""
    rows = [ln.split() for ln in (ROOT / "systemd" / "scanmilter.tmpfiles").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    return {r[1]: (r[0], r[2], r[3], r[4]) for r in rows}


def test_the_shipped_socket_is_inside_debians_postfix_chroot():
    """Debian runs smtpd and cleanup chrooted in /var/spool/postfix: the socket must live there,
    the unit may write there without a drop-in, Postfix's group may enter, and the README's first
    wiring block names it as seen from inside the chroot."""
    import tomllib
    from scanmilter import config
    shipped = tomllib.loads((ROOT / "systemd" / "scanmilter.toml").read_text())["milter_socket"]
    default = next(s.default for s in config.DAEMON_SETTINGS if s.name == "milter_socket")
    assert shipped == default
    queue_dir = "/var/spool/postfix"
    kind, _, path = shipped.partition(":")
    assert kind == "unix" and path.startswith(queue_dir + "/")
    directory = os.path.dirname(path)
    unit = _unit("scanmilter.service")
    assert directory in unit["ReadWritePaths"] and unit["Group"] == ["postfix"]
    kind, mode, user, group = _tmpfiles()[directory]
    assert (kind, user, group) == ("d", "scanmilter", "postfix") and int(mode, 8) & 0o050 == 0o050
    assert int(mode, 8) & 0o007 == 0                   # nobody else reaches the socket
    wiring = (ROOT / "README.md").read_text().split("## Wiring it into Postfix", 1)[1].split("```\n", 2)[1]
    assert f"smtpd_milters = unix:{path[len(queue_dir):]}\n" in wiring
    assert "non_smtpd_milters = $smtpd_milters\n" in wiring
    master = "/usr/share/postfix/master.cf.dist"       # Debian's packaged master.cf
    if os.path.exists(master):
        chroot = {tuple(f[:2]): f[4] for f in (ln.split() for ln in open(master)) if len(f) >= 8 and f[0][0] != "#"}
        assert chroot[("smtp", "inet")] == chroot[("cleanup", "unix")] == "y"


@pytest.mark.parametrize("name", ["scanmilter.service", "scanmilter-purge.service", "scanmilter-notify.service",
                                  "scanmilter-web.service"])
def test_the_units_can_read_the_configuration(name):
    """With Group= set, systemd gives the service that group and the user's memberships, not the
    user's own group: the group of /etc/scanmilter must be named."""
    unit = _unit(name)
    _, mode, _, group = _tmpfiles()["/etc/scanmilter"]
    assert group in unit["Group"] + unit.get("SupplementaryGroups", []) and int(mode, 8) & 0o050 == 0o050
    assert all(_tmpfiles()[f"/etc/scanmilter/{f}"][3] == group for f in ("scanmilter.toml", "policy.toml"))
