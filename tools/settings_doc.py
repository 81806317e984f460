"""Rewrite the settings tables of docs/configuration.md from config.py, in place.

Each table is found by its first setting's row and replaced whole; the text around the tables is
left as written. tests/test_layout.py fails when a table differs from what this writes."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"
sys.path.insert(0, str(ROOT / "milter"))
from scanmilter import config  # noqa: E402

HEADER = "| setting | default | unit | meaning |"
TABLES = (config.DAEMON_SETTINGS, config.DIRECTIONS_SETTINGS, config.DIRECTION_SETTINGS, config.LISTS_SETTINGS)


def rewrite(text: str) -> str:
    for settings in TABLES:
        table = config.markdown_table(settings)
        if table in text:
            continue
        # the table that holds a row of any of these settings (a new or renamed one has none yet)
        first_row = min(i for i in (text.find(f"| `{s.name}` |") for s in settings) if i != -1)
        start = text.rindex(HEADER, 0, first_row)
        end = text.find("\n\n", first_row)
        text = text[:start] + table + (text[end:] if end != -1 else "\n")
    return text


if __name__ == "__main__":
    DOC.write_text(rewrite(DOC.read_text()))
