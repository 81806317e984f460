"""The source tree: milter/ must never become a package that shadows pymilter's extension."""
import re
import subprocess
import sys

from conftest import ROOT
from scanmilter import app, config


def test_no_package_named_milter():
    assert not (ROOT / "milter" / "__init__.py").exists()


def test_import_milter_is_the_extension():
    app.check_milter_extension()          # raises ConfigError otherwise
    import milter
    assert milter.__file__.endswith(".so")


def test_startup_check_catches_a_shadowing_package(tmp_path):
    (tmp_path / "milter").mkdir()
    (tmp_path / "milter" / "__init__.py").write_text("")
    code = ("import sys; sys.path[:0] = [%r, %r]\n"
            "from scanmilter import app, config\n"
            "try:\n    app.check_milter_extension()\nexcept config.ConfigError as e:\n    print('caught', e)\n"
            % (str(tmp_path), str(ROOT / "milter")))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("caught") and "shadowing" in out


def test_readme_settings_tables_match_the_code():
    readme = (ROOT / "README.md").read_text()
    for settings in (config.DAEMON_SETTINGS, config.DIRECTIONS_SETTINGS, config.DIRECTION_SETTINGS,
                     config.LISTS_SETTINGS):
        assert config.markdown_table(settings) in readme


def test_no_module_named_like_pymilter_parts():
    names = {p.stem for p in (ROOT / "milter").rglob("*.py")} | {p.name for p in (ROOT / "milter").rglob("*")}
    assert not names & {"milter", "Milter", "mime"}


def test_version_is_single_sourced():
    setup = (ROOT / "setup.cfg").read_text()
    assert re.search(r"version = attr: scanmilter.__version__", setup)


def test_pip_builds_a_wheel_with_the_package_and_its_command(tmp_path):
    import zipfile
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    [wheel] = tmp_path.glob("scanmilter-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "scanmilter/__init__.py" in names and "scanmilter/scanners/clamd.py" in names
    assert not [n for n in names if n.startswith("milter/")]          # never a package named milter
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt")))
    assert b"scanmilter = scanmilter.cli:main" in entry_points
