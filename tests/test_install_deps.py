"""tools/install-deps on a minimal Debian: what it asks apt-get for, with dpkg-query and apt-get
replaced by shims on PATH (the test machine has every package installed, and removing them
would break the other tests). The build dependencies are the point: pymilter is source-only on
PyPI, so pip compiles it (gcc, python3-dev, libmilter-dev) inside a venv (python3-venv)."""
import os
import re
import subprocess
from pathlib import Path

from conftest import ROOT

INSTALL_DEPS = ROOT / "tools" / "install-deps"
BUILD = ["gcc", "python3-dev", "python3-venv", "libmilter-dev"]

SHIMS = {
    # installed unless named in $MISSING
    "dpkg-query": """#!/bin/sh
for pkg; do :; done
for p in $MISSING; do [ "$p" = "$pkg" ] && exit 1; done
printf 'install ok installed'
""",
    # records its arguments; the first install fails when $FAIL_FIRST is set (a stale package list)
    "apt-get": """#!/bin/sh
echo "$*" >> "$LOG"
if [ -n "${FAIL_FIRST:-}" ] && [ ! -e "$LOG.failed" ] && [ "$1" = install ]; then touch "$LOG.failed"; exit 100; fi
""",
    "debconf-set-selections": "#!/bin/sh\ncat > /dev/null\n",
    "sudo": '#!/bin/sh\nexec "$@"\n',
}


def run(tmp_path: Path, missing: list[str], **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    shims = tmp_path / "bin"
    shims.mkdir(exist_ok=True)
    for name, text in SHIMS.items():
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    log = tmp_path / "apt.log"
    log.unlink(missing_ok=True)
    environ = {"PATH": f"{shims}:/usr/bin:/bin", "MISSING": " ".join(missing), "LOG": str(log), **env}
    r = subprocess.run([str(INSTALL_DEPS)], capture_output=True, text=True, env=environ, timeout=30)
    return r, log.read_text().splitlines() if log.exists() else []


def requested(calls: list[str]) -> list[str]:
    [install] = {c for c in calls if c.startswith("install ")}
    return [w for w in install.split()[1:] if not w.startswith("-")]


def test_a_minimal_debian_gets_the_build_dependencies(tmp_path):
    r, calls = run(tmp_path, BUILD)
    assert r.returncode == 0, r.stderr
    assert requested(calls) == BUILD
    assert all(c.startswith("install -y -q --no-install-recommends ") for c in calls)


def test_everything_missing_is_asked_for_at_once(tmp_path):
    everything = ["postfix", "clamav-daemon", "clamdscan", "clamav", "spamassassin", "spamd", "spamc", "swaks", *BUILD]
    r, calls = run(tmp_path, everything)
    assert r.returncode == 0, r.stderr
    assert sorted(requested(calls)) == sorted(everything)


def test_nothing_is_installed_when_nothing_is_missing(tmp_path):
    r, calls = run(tmp_path, [])
    assert (r.returncode, calls) == (0, [])


def test_a_stale_package_list_is_updated_once_and_the_install_retried(tmp_path):
    r, calls = run(tmp_path, ["gcc"], FAIL_FIRST="1")
    assert r.returncode == 0, r.stderr
    assert [c.split()[0] for c in calls] == ["install", "update", "install"]


def test_the_server_install_steps_name_the_build_dependencies():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Installing on a server", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh", 1)[1].split("```", 1)[0]
    [apt] = [line for line in block.splitlines() if re.match(r"\s*apt(-get)? install", line)]
    assert all(re.search(rf"(?<![\w-]){re.escape(p)}(?![\w-])", apt) for p in BUILD), apt
    # and before anything that builds or installs pymilter
    lines = block.splitlines()
    builds = [i for i, line in enumerate(lines) if line != apt and re.search(r"make venv|-m venv|pip install", line)]
    assert builds and lines.index(apt) < min(builds)
