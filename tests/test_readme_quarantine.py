"""The README's way of turning the quarantine on works on the files as installed: its edits, made
to policies/default.toml (installed as /etc/scanmilter/policy.toml), give a valid policy that
holds what the README says; appending a second [inbound] table instead is refused."""
import re
import tomllib

import pytest

from conftest import ROOT
from scanmilter import config, policyfile

README = (ROOT / "README.md").read_text()
SECTION = README.split("\n## Quarantine\n", 1)[1].split("\n## ", 1)[0]
SHIPPED = (ROOT / "policies" / "default.toml").read_text()


def edits() -> dict[str, list[str]]:
    """{table: ["key = value", ...]} from the README's block of edited lines."""
    block = SECTION.split("```toml\n", 1)[1].split("```", 1)[0]
    tables, table = {}, None
    for line in block.splitlines():
        line = line.strip()
        if line.startswith("["):
            table = line.strip("[]")
            tables[table] = []
        elif line and line != "...":
            tables[table].append(line)
    return tables


def apply(text: str, table: str, line: str) -> str:
    """Set `line` (key = value # comment) in `table` of a TOML text: replace the key's line
    there, or add the line right after the table's header."""
    key = line.split("=", 1)[0].strip()
    lines = text.splitlines()
    start = lines.index(f"[{table}]")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    found = [i for i in range(start + 1, end) if re.match(rf"{re.escape(key)}\s*=", lines[i])]
    assert len(found) <= 1
    if found:
        lines[found[0]] = line
    else:
        lines.insert(start + 1, line)
    return "\n".join(lines) + "\n"


def test_the_readme_edits_give_a_valid_policy_that_holds(tmp_path):
    tables = edits()
    assert set(tables) == {"inbound", "virus_classes"}
    text = SHIPPED
    for table, lines in tables.items():
        for line in lines:
            if table == "inbound":      # the README says these keys are in the shipped file already
                key = line.split("=", 1)[0].strip()
                assert re.search(rf"^{re.escape(key)} = ", SHIPPED, re.M), key
            text = apply(text, table, line)
    path = tmp_path / "policy.toml"
    path.write_text(text)
    policy, warnings = policyfile.check(str(path), quarantine_available=True)
    assert policy.directions["inbound"]["quarantine_level"] == 8.0
    assert policy.directions["inbound"]["quarantine_action"] == "discard"
    assert policy.virus_classes == (("Heuristics.*", "quarantine"),)
    assert policy.directions["outbound"]["quarantine_level"] == float("inf")     # untouched
    assert warnings == []


def test_appending_a_second_inbound_table_is_refused(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(SHIPPED + "\n[inbound]\nquarantine_level = 8.0\n")
    with pytest.raises(config.ConfigError, match=r"Cannot declare \('inbound',\) twice"):
        policyfile.check(str(path))
    assert "Cannot declare ('inbound',) twice" in SECTION          # the README warns in those words


def test_the_installed_configuration_already_has_the_store_the_readme_names():
    installed = tomllib.loads((ROOT / "systemd" / "scanmilter.toml").read_text())
    for key in ("quarantine_directory", "quarantine_release_address"):
        assert f'`{key} = "{installed[key]}"`' in SECTION, key
