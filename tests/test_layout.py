"""The source tree: milter/ must never become a package that shadows pymilter's extension."""
import importlib.util
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


def _settings_doc():
    spec = importlib.util.spec_from_file_location("settings_doc", ROOT / "tools" / "settings_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_doc_settings_tables_match_the_code():
    """docs/configuration.md carries every settings table as config.py writes it, once, and
    tools/settings_doc.py would change nothing."""
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for settings in (config.DAEMON_SETTINGS, config.DIRECTIONS_SETTINGS, config.DIRECTION_SETTINGS,
                     config.LISTS_SETTINGS):
        assert doc.count(config.markdown_table(settings)) == 1, settings[0].name
    assert _settings_doc().rewrite(doc) == doc


def test_settings_doc_rewrites_a_stale_table():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    first = config.DAEMON_SETTINGS[0]
    stale = re.sub(rf"^\| `{first.name}` \|.*\n", "", doc, count=1, flags=re.M)        # a setting missing
    stale = stale.replace("| `clamd_timeout` |", "| `clamd_timout` |")                  # and a stale name
    assert stale != doc and _settings_doc().rewrite(stale) == doc


DOCS = ("configuration", "commands", "metrics", "design", "security", "failure", "demo", "hold-queue", "shared-lists", "multi-host",
        "webhooks", "web")
MARKDOWN = ["README.md", "policies/README.md", "bench/README.md"] + [f"docs/{d}.md" for d in DOCS]


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _links(text: str) -> list[str]:
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)       # no links inside code blocks
    return re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`\n]*`", "", text))


def test_readme_is_the_admins_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 300
    first_block = readme.split("```sh\n", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in first_block.splitlines()] == [["make", "demo"], ["make", "test"]]
    assert readme.index("```sh\n") < readme.index("\n## ")                # at the top, before any section
    linked = {link.split("#")[0] for link in _links(readme)}
    assert {f"docs/{d}.md" for d in DOCS} <= linked, {f"docs/{d}.md" for d in DOCS} - linked
    assert {"policies/README.md", "bench/README.md"} <= linked
    assert sorted(p.name for p in (ROOT / "docs").iterdir() if p.is_file()) == sorted(f"{d}.md" for d in DOCS)
    for d in DOCS:
        assert any(link.split("#")[0] == "../README.md" for link in _links((ROOT / "docs" / f"{d}.md").read_text())), d


def test_every_test_the_docs_name_exists():
    """The failure and security tables name the tests that prove each row: each name is a test."""
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^\s*def (test_\w+)", path.read_text(), re.M))
    for name in ("failure", "security"):
        named = set(re.findall(r"`(test_\w+)", (ROOT / "docs" / f"{name}.md").read_text()))
        assert len(named) > 20 and named <= defined, (name, named - defined)


def test_relative_links_in_the_docs_resolve():
    """Every relative link of the manual names a file that exists, and an anchor a heading there."""
    for name in MARKDOWN:
        source = ROOT / name
        for link in _links(source.read_text()):
            if re.match(r"[a-z]+:", link):
                continue
            path, _, anchor = link.partition("#")
            target = (source.parent / path).resolve() if path else source
            assert target.is_file(), f"{name}: {link}"
            if anchor:
                text = re.sub(r"^```.*?^```", "", target.read_text(), flags=re.M | re.S)
                headings = {_slug(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}
                assert anchor in headings, f"{name}: {link}"


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
    docs = {n.split("/share/doc/scanmilter/", 1)[1] for n in names if "/share/doc/scanmilter/" in n}
    assert docs == {"README.md"} | {f"docs/{d}.md" for d in DOCS}                # the manual, links intact
    assert not [n for n in names if n.startswith("milter/")]          # never a package named milter
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt")))
    assert b"scanmilter = scanmilter.cli:main" in entry_points
