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


@pytest.mark.parametrize("unit", ["scanmilter.service", "scanmilter-purge.service"])
def test_exposure_score_is_ok(unit):
    out = run("systemd-analyze", "security", "--offline=yes", str(ROOT / "systemd" / unit))
    score = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", out.stdout).group(1))
    print(f"{unit}: exposure {score}")
    assert score <= EXPOSURE_LIMIT, out.stdout


def test_units_verify(tmp_path):
    binary = shutil.which("scanmilter") or str(ROOT / ".venv" / "bin" / "scanmilter")
    assert os.access(binary, os.X_OK), binary
    for name in ("scanmilter.service", "scanmilter-purge.service", "scanmilter-purge.timer"):
        text = (ROOT / "systemd" / name).read_text().replace("/usr/local/bin/scanmilter", binary)
        (tmp_path / name).write_text(text)
    out = run("systemd-analyze", "verify", *(str(tmp_path / n) for n in ("scanmilter.service",
                                                                        "scanmilter-purge.service",
                                                                        "scanmilter-purge.timer")))
    assert out.returncode == 0 and "scanmilter" not in out.stderr, out.stderr


def test_install_into_a_fresh_root(tmp_path):
    root = tmp_path / "root"
    assert run(str(ROOT / "tools" / "install-units"), env={**os.environ, "DESTDIR": str(root)}).returncode == 0
    for path in ("etc/systemd/system/scanmilter.service", "etc/systemd/system/scanmilter-purge.timer",
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
    assert oct((root / "etc" / "scanmilter" / "scanmilter.toml").stat().st_mode & 0o777) == "0o640"
    # the installed configuration is valid (its policy file path pointed into the fresh root)
    conf = root / "etc" / "scanmilter" / "scanmilter.toml"
    conf.write_text(conf.read_text().replace('"/etc/scanmilter/policy.toml"', f'"{root}/etc/scanmilter/policy.toml"'))
    out = run(sys.executable, "-m", "scanmilter", "check-config", "-c", str(conf),
              env={**os.environ, "PYTHONPATH": str(ROOT / "milter")})
    assert out.returncode == 0, out.stderr
