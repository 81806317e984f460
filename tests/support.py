"""What the tests share: test mail, sending it through the test stack (tools/stack.py) and looking
at what arrived, logs and metrics, always by waiting on a condition; header-value checks; running
code as another user; the built wheel. Test modules import from here, never from each other."""
import email.header
import email.policy
import email.utils
import functools
import os
import pwd
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from email.message import EmailMessage
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import procs
from conftest import ROOT, scratch
from scanmilter.scanners import EngineError
from scanmilter.scanners.spamd import GTUBE  # noqa: F401  (the tests' GTUBE is the product's)

OUTSIDE = "203.0.113.7"          # XCLIENT makes the client look like this host


# ---------------------------------------------------------------- test mail
def make(subject, body="Hello,\nthis is an ordinary message.\n", attachment=None, extra=(), msgid=None):
    m = EmailMessage()
    m["From"] = "Alice <alice@outside.test>"
    m["To"] = "bob@example.com"
    m["Subject"] = subject
    m["Message-ID"] = msgid or email.utils.make_msgid(domain="outside.test")
    m["Date"] = email.utils.formatdate()
    for name, value in extra:
        m[name] = value
    m.set_content(body)
    if attachment:
        m.add_attachment(attachment, maintype="application", subtype="octet-stream", filename="file.com")
    return m.as_bytes(policy=email.policy.SMTP)     # CRLF line ends, as on the wire


def raw_message(headers, body: bytes) -> bytes:
    """A message exactly as given, CRLF line ends: no library rewrites its MIME structure."""
    head = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return head.encode() + b"\r\n" + body


def body_of(data: bytes) -> bytes:
    """The body as the sink stores it (LF line ends)."""
    return data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1]


def header_lines(data: bytes, name: str):
    head = data.split(b"\n\n", 1)[0].decode("utf-8", "replace")
    return re.findall(rf"(?im)^{re.escape(name)}:[^\n]*(?:\n[ \t][^\n]*)*", head)


# ---------------------------------------------------------------- through the stack
def send(stack, data, rcpt="bob@example.com", outside=True):
    return stack.send(data, "alice@outside.test", [rcpt], xclient_addr=OUTSIDE if outside else None)


def delivered_with(stack, marker, timeout=30):
    """The one delivered message containing `marker`, waiting for it; counted once Postfix has
    nothing left to deliver, so that a second copy still on its way is caught too."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(marker.encode() in d.data for d in stack.delivered()):
            stack.wait_drained()
            found = [d for d in stack.delivered() if marker.encode() in d.data]
            assert len(found) == 1, f"{marker} delivered {len(found)} times"
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"{marker} not delivered; postfix log:\n{stack.postfix_log()[-3000:]}")


def not_delivered(stack, marker):
    """True when no copy of `marker` reached the sink once Postfix has nothing left to deliver."""
    stack.wait_drained()
    return not [d for d in stack.delivered() if marker.encode() in d.data]


def parsed_or_protocol_error(parse, reply):
    """`parse(reply)`, or None when it raised a protocol error: the only two things a parser of an
    engine's reply may do with anything it is sent."""
    try:
        return parse(reply)
    except EngineError as e:
        assert e.kind == "protocol"
        return None


def tempfails_in_time(stack, send_marker, limit):
    """While an engine is at fault: a new message sent with `send_marker(stack, marker)` is
    tempfailed (451 4.7.1) within `limit` seconds and never delivered. Its marker, for the
    sender's retry once the engine is back."""
    marker = uuid.uuid4().hex
    start = time.monotonic()
    r = send_marker(stack, marker)
    took = time.monotonic() - start
    assert r["code"] == 451 and "4.7.1" in r["reply"], r
    assert took < limit, took
    assert not_delivered(stack, marker)
    return marker


def wait_for(predicate, what, timeout=30):
    """Wait until predicate() is true; fail the test after `timeout` seconds."""
    assert procs.wait_until(predicate, timeout), f"timed out waiting for {what}"
    return True


# ---------------------------------------------------------------- logs
def summary_lines(stack, marker):
    """(queue id, scanmilter's lines starting with it) of the message whose Message-ID is
    <marker@outside.test>."""
    qid = re.search(rf"cleanup\[\d+\]: ([0-9A-Za-z]+): message-id=<{marker}@", stack.postfix_log()).group(1)
    return qid, [line for line in stack.logs["scanmilter"].read_text().splitlines() if line.startswith(qid + ":")]


def summary_line(stack, marker):
    [line] = summary_lines(stack, marker)[1]
    return line


def wait_summary(stack, marker):
    """scanmilter's summary line for the message whose Message-ID is <marker@outside.test>,
    waiting for it."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            qid, lines = summary_lines(stack, marker)
        except AttributeError:          # Postfix has not logged the message yet
            lines = []
        if lines:
            return lines[-1]
        time.sleep(0.1)
    raise AssertionError(f"no summary line for {marker}")


def spamd_saw(stack, msgid_marker):
    return f"mid=<{msgid_marker}@outside.test>" in stack.logs["spamd"].read_text(errors="replace")


def spamd_result(stack, msgid_marker):
    """spamd's own log line for a message: its score and the rules that hit."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in stack.logs["spamd"].read_text(errors="replace").splitlines():
            if "result:" in line and f"mid=<{msgid_marker}@outside.test>" in line:
                return line
        time.sleep(0.1)
    raise AssertionError(f"no spamd result for {msgid_marker}")


# ---------------------------------------------------------------- the daemon from outside
def scrape(stack) -> dict:
    """The daemon's metrics: {(name, ((label, value), ...)): value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def get(values, name, **labels):
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def scanmilter(stack, *args, timeout=60):
    """`python -m scanmilter ARGS -c CONFIG` of the checkout, against the stack's configuration."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "milter"))
    return subprocess.run([sys.executable, "-m", "scanmilter", *args, "-c", str(stack.milter_config)],
                          capture_output=True, text=True, env=env, timeout=timeout)


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1))


# ---------------------------------------------------------------- header values
def decoded(value: str) -> bytes:
    """A header value as a reader gets it: unfolded (RFC 5322: a line break before white space
    goes), then its encoded words decoded, as the bytes they carry."""
    unfolded = re.sub(r"\r?\n(?=[ \t])", "", value)
    return b"".join(p if isinstance(p, bytes) else p.encode("ascii")
                    for p, _ in email.header.decode_header(unfolded))


def assert_safe(value: str):
    """What pymilter and Postfix can take: ASCII (valid UTF-8 for chgheader), no CR, no control
    character but tab, and every line after the first a continuation (starts with white space)."""
    assert value.isascii() and "\r" not in value
    assert all(ch in "\t\n" or 32 <= ord(ch) < 127 for ch in value)
    assert all(line[:1] in (" ", "\t") for line in value.split("\n")[1:])


# ---------------------------------------------------------------- as another user
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")


def as_user(name, func):
    """Run func() in a child process as user `name` (its primary group only): (its return value as the
    exit status, what it printed to stdout and stderr). As root, permission checks are bypassed, so
    a test of what other users meet must drop privileges."""
    from scanmilter.commands.postfix_check import in_child_as

    def child(fd):
        sys.stdout = sys.stderr = os.fdopen(fd, "w")
        try:
            status = func()
        except BaseException as e:         # shown to the test through the pipe
            print(f"child failed: {e!r}", file=sys.stderr)
            status = 255
        sys.stdout.flush()
        return status
    status, out = in_child_as(pwd.getpwnam(name), child)
    return status, out.decode(errors="replace")


# ---------------------------------------------------------------- the built wheel
def run(*cmd, **kw):
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


@functools.cache
def build_wheel():
    """The wheel and sdist, built once per session in a scratch directory: (work directory, wheel)."""
    work = Path(scratch("scanmilter-pkg-"))
    work.chmod(0o755)
    run(sys.executable, "-m", "build", "-o", work / "dist", ROOT)
    [wheel] = (work / "dist").glob("scanmilter-*.whl")
    assert list((work / "dist").glob("scanmilter-*.tar.gz")), "no sdist"
    return work, wheel


@functools.cache
def install_wheel(python=sys.executable, name="venv"):
    """A venv WORK/NAME made by `python`, outside the checkout, with only the built wheel (and its
    dependencies) in it; once per session (test_e2e_server.py uses one of Debian's python3, as
    the README does). Returns (work directory, wheel)."""
    work, wheel = build_wheel()
    run(python, "-m", "venv", work / name)
    run(work / name / "bin" / "pip", "install", "-q", "--disable-pip-version-check", wheel, cwd=work)
    return work, wheel
