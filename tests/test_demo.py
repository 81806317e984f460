"""`make demo` (tools/demo.py): four messages through the real stack, one of them held in the demo's
quarantine; the review commands it prints work as printed; docs/demo.md shows its real output."""
import os
import re
import shlex
import subprocess
import sys

import pytest

import stack as stacklib
from conftest import ROOT, scratch

pytestmark = pytest.mark.integration


def masked(text: str) -> list[str]:
    """Output lines with what differs from run to run (ids, times, sizes, ports) masked."""
    text = re.sub(r"delivered/\d+\.[0-9a-f]+", "delivered/FILE", text)
    text = re.sub(r"\b[0-9a-f]{24}\b", "ID", text)
    text = re.sub(r"\b[0-9A-F]{9,12}\b", "QID", text)
    text = re.sub(r"\b(Mon|Tue|Wed|Thu|Fri|Sat|Sun) \w{3} +\d+ \d\d:\d\d\b", "DATE", text)
    text = re.sub(r"\d+(\.\d+)?", "0", text)
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def demo():
    root = scratch("scanmilter-demo-")
    smtp_port, metrics_port = stacklib.free_port(), stacklib.free_port()
    command = [sys.executable, "tools/demo.py", "--dir", root, "--smtp-port", str(smtp_port),
               "--metrics-port", str(metrics_port)]
    # twice: `make demo` run again over a running demo starts afresh (one held message, not two)
    subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    r = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    try:
        yield r, root, smtp_port, metrics_port
    finally:
        stacklib.Stack(root).stop()


def test_the_demo_holds_one_message_and_lists_it(demo):
    r, root, _, _ = demo
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "GTUBE (spam test string): 550 5.7.1 Message rejected as spam" in out
    assert "EICAR as an attachment: 550 5.7.1 Message rejected: virus Eicar-Test-Signature" in out
    [held] = re.findall(r"held in the quarantine as ([0-9a-f]{24}), not delivered", out)
    listing = out.split("$ scanmilter quarantine list -c ", 1)[1].split("\n\n", 1)[0]
    assert held in listing and "-- 0 Kbytes in 1 entry." in listing and "spam" in listing
    assert os.listdir(f"{root}/quarantine")                     # under the demo's directory
    assert len(os.listdir(f"{root}/delivered")) == 1            # only the clean message went through


def test_the_printed_review_commands_work_as_printed(demo):
    r, root, _, _ = demo
    [held] = re.findall(r"held in the quarantine as ([0-9a-f]{24})", r.stdout)
    commands = {}
    for line in r.stdout.splitlines():
        m = re.search(r"(\.venv/bin/scanmilter quarantine (list|show|release) .*?)(\s+#.*)?$", line)
        if m:
            commands[m[2]] = shlex.split(m[1])
    assert set(commands) == {"list", "show", "release"}
    assert commands["show"][3] == held and commands["release"][3] == held
    assert f"{root}/scanmilter/scanmilter.toml" in commands["list"]
    run = {k: subprocess.run([str(ROOT / c[0]), *c[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
           for k, c in commands.items()}
    assert run["list"].returncode == 0 and held in run["list"].stdout
    assert run["show"].returncode == 0 and "Subject: Cheap watches scanmilter-tag-test" in run["show"].stdout
    assert (run["release"].returncode, run["release"].stdout.strip()) == (0, f"{held}: released to bob@example.com")
    stack = stacklib.Stack(root)
    released = [d for d in stack.wait_delivered(2) if b"scanmilter-tag-test" in d.data]
    assert len(released) == 1 and released[0].recipients == ["bob@example.com"]


def test_the_docs_show_the_demos_real_output(demo):
    r, root, smtp_port, metrics_port = demo
    readme = (ROOT / "docs" / "demo.md").read_text()
    block = readme.split("## What `make demo` shows\n\n```\n", 1)[1].split("```", 1)[0]
    shown = [line for line in block.splitlines() if line not in ("$ make demo", "...")]
    out = r.stdout.replace(f"{root}/", ".demo/").replace(str(root), ".demo")
    out = out.replace(f"127.0.0.1:{smtp_port}", "127.0.0.1:2525").replace(f"127.0.0.1:{metrics_port}", "127.0.0.1:9925")
    assert masked(out) == masked("\n".join(shown))
