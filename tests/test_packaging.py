"""The built wheel, installed into a fresh venv outside the checkout, runs on its own: --version,
check-config on the shipped example configuration, and selftest against a stack whose
scanmilter is the installed one."""
import os
import zipfile

import pytest

from conftest import ROOT, new_stack
from support import install_wheel, run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def installed():
    return install_wheel()


def test_wheel_carries_the_shipped_data(installed):
    work, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    share = work / "venv" / "share" / "scanmilter"
    for path in ("policies/default.toml", "policies/examples/small-company.toml", "systemd/scanmilter.service",
                 "systemd/scanmilter.toml", "dashboards/scanmilter.json"):
        assert any(n.endswith("share/scanmilter/" + path) for n in names), path
        assert (share / path).is_file(), path


def test_installed_command_runs_outside_the_checkout(installed):
    work, _ = installed
    bin_ = work / "venv" / "bin"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = run(bin_ / "python", "-c", "import scanmilter; print(scanmilter.__file__)", cwd=work, env=env)
    assert str(work / "venv") in where.stdout and str(ROOT) not in where.stdout
    assert run(bin_ / "scanmilter", "--version", cwd=work, env=env).stdout.startswith("scanmilter ")
    share = work / "venv" / "share" / "scanmilter"
    conf = work / "scanmilter.toml"
    conf.write_text((share / "systemd" / "scanmilter.toml").read_text().replace(
        '"/etc/scanmilter/policy.toml"', f'"{share}/policies/default.toml"'))
    out = run(bin_ / "scanmilter", "check-config", "-c", conf, cwd=work, env=env)
    assert "OK" in out.stdout


def test_selftest_against_a_stack_running_the_installed_package(installed):
    work, _ = installed
    bin_ = work / "venv" / "bin"
    with new_stack("pkg-stack", milter_cmd=[str(bin_ / "scanmilter"), "serve", "-c", "{config}"]) as st:
        [(pid, _)] = st.pids("scanmilter")
        assert str(bin_ / "scanmilter") in open(f"/proc/{pid}/cmdline").read()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        out = run(bin_ / "scanmilter", "selftest", "-c", st.milter_config, cwd=work, env=env)
        assert [line.split(":")[0] for line in out.stdout.splitlines()] == ["PASS clean", "PASS gtube", "PASS eicar"]
