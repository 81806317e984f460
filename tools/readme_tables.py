"""Rewrite the settings tables in README.md from config.py (the test in test_layout.py checks them)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "milter"))
from scanmilter import config  # noqa: E402

HEADER = "| setting | default | unit | meaning |"

readme = (ROOT / "README.md").read_text()
for settings in (config.DAEMON_SETTINGS, config.DIRECTIONS_SETTINGS, config.DIRECTION_SETTINGS,
                 config.LISTS_SETTINGS):
    table = config.markdown_table(settings)
    if table in readme:
        continue
    first_row = readme.index(f"| `{settings[0].name}` |")
    start = readme.rindex(HEADER, 0, first_row)
    end = readme.find("\n\n", first_row)
    readme = readme[:start] + table + (readme[end:] if end != -1 else "\n")
(ROOT / "README.md").write_text(readme)
