"""The quarantine commands as an operator meets them: run as a user who may not read the
configuration, piped into `head`, showing a client Postfix had no name for."""
import fcntl
import io
import os
import subprocess
import sys

import pytest

from conftest import ROOT, scratch
from scanmilter import cli
from scanmilter import quarantine as Q
from scanmilter.commands import quarantine as QC
from support import as_user, needs_root


def config_dir(mode, file_mode=0o644, quarantine_mode=0o700):
    """A directory (open to all) holding etc/scanmilter.toml, the etc directory with `mode`, the file
    with `file_mode`, and a quarantine with `quarantine_mode`, all owned by root."""
    d = scratch("scanmilter-qcli-")
    os.chmod(d, 0o755)
    os.mkdir(f"{d}/q", quarantine_mode)
    os.chmod(f"{d}/q", quarantine_mode)
    os.mkdir(f"{d}/etc")
    conf = f"{d}/etc/scanmilter.toml"
    with open(conf, "w") as f:
        f.write(f'quarantine_directory = "{d}/q"\nmilter_socket = "unix:{d}/s.sock"\n')
    os.chmod(conf, file_mode)
    os.chmod(f"{d}/etc", mode)
    return d, conf


@needs_root
@pytest.mark.parametrize("dir_mode, file_mode", [(0o750, 0o640), (0o755, 0o000)],
                         ids=["directory-closed", "file-closed"])
@pytest.mark.parametrize("argv", [["quarantine", "list"], ["quarantine", "list", "--json"], ["selftest"],
                                  ["postfix-check", "--no-connect"]])
def test_an_unreadable_installed_configuration_is_named_not_replaced_by_defaults(monkeypatch, dir_mode, file_mode,
                                                                                 argv):
    """/etc/scanmilter is 0750 root:scanmilter: another user cannot even see that the file exists. It
    used to fall back to the defaults and say "quarantine_directory is not set; there is no quarantine"."""
    d, conf = config_dir(dir_mode, file_mode)
    monkeypatch.setattr(QC, "DEFAULT_CONFIG", conf)
    monkeypatch.delenv("SCANMILTER_CONFIG", raising=False)
    rc, out = as_user("nobody", lambda: cli.main(argv))
    assert f"{conf}: cannot read: Permission denied" in out, out
    assert "quarantine_directory is not set" not in out and "Traceback" not in out, out
    assert rc != 0


@needs_root
def test_a_quarantine_closed_to_the_user_is_named(monkeypatch):
    d, conf = config_dir(0o755)
    monkeypatch.setattr(QC, "DEFAULT_CONFIG", conf)
    monkeypatch.delenv("SCANMILTER_CONFIG", raising=False)
    rc, out = as_user("nobody", lambda: cli.main(["quarantine", "list"]))
    assert rc == QC.EXIT_USAGE and f"{d}/q: cannot open the quarantine: Permission denied" in out, out
    # as root (the README's way), the same configuration works
    assert cli.main(["quarantine", "list"]) == 0


def test_without_an_installed_configuration_the_defaults_apply(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(QC, "DEFAULT_CONFIG", str(tmp_path / "absent" / "scanmilter.toml"))
    monkeypatch.delenv("SCANMILTER_CONFIG", raising=False)
    assert QC.config_path(None) is None
    assert cli.main(["quarantine", "list"]) == QC.EXIT_USAGE
    assert "defaults: quarantine_directory is not set; there is no quarantine" in capsys.readouterr().err


# ---------------------------------------------------------------- output closed early

def put(store, data=b"Subject: x\r\n\r\nbody\r\n", **meta):
    return store.put(io.BytesIO(data), {"sender": "a@b.test", "recipients": ["c@d.test"], "reason": "spam",
                                        "score": 9.0, **meta})


@pytest.fixture(scope="module")
def busy_quarantine(tmp_path_factory):
    """A quarantine whose listings and messages are many pipe buffers long."""
    d = tmp_path_factory.mktemp("busy")
    store = Q.FileStore(str(d / "q"))
    rcpts = [f"user{i:03d}@example.com" for i in range(40)]
    for _ in range(12):
        put(store, recipients=rcpts)
    headers = b"".join(b"To: " + b", ".join(r.encode() for r in rcpts[:8]) + b"\r\n" for _ in range(60))
    big = put(store, data=b"Subject: big\r\n" + headers + b"\r\n" + b"a line of the body\r\n" * 5000)
    conf = d / "scanmilter.toml"
    conf.write_text(f'quarantine_directory = "{d / "q"}"\n')
    return conf, big


@pytest.mark.parametrize("argv", [["quarantine", "list"], ["quarantine", "list", "--json"],
                                  ["quarantine", "show", "{id}"], ["quarantine", "show", "{id}", "--raw"],
                                  ["quarantine", "show", "{id}", "--headers"], ["check-config"]])
def test_a_reader_that_stops_early_gets_no_traceback(busy_quarantine, argv):
    """`scanmilter quarantine list --json | head -1`: read one line, then close the pipe as head does.
    The pipe is one page (4 KiB), so the command is still writing when it closes."""
    conf, big = busy_quarantine
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    proc = subprocess.Popen([sys.executable, "-m", "scanmilter", *[a.format(id=big) for a in argv], "-c", str(conf)],
                            stdout=w, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT / "milter")))
    os.close(w)
    with os.fdopen(r, "rb", buffering=0) as reader:
        line = b""
        while not line.endswith(b"\n"):
            byte = reader.read(1)
            assert byte, "the command ended before writing a line"
            line += byte
    _, err = proc.communicate(timeout=60)
    assert err == b"", err.decode()
    assert proc.returncode == 141           # as a Unix tool killed by SIGPIPE (128 + 13)


def test_output_closed_in_process_returns_141(monkeypatch, capsys):
    def closed(args):
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(QC, "run", closed)
    assert cli.main(["quarantine", "list"]) == 141
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- the client, as Postfix names it

@pytest.mark.parametrize("name, address, shown", [
    ("[203.0.113.9]", "203.0.113.9", "unknown[203.0.113.9]"),          # what Postfix's milter client sends
    ("[IPv6:2001:db8::9]", "2001:db8::9", "unknown[2001:db8::9]"),
    ("unknown", "203.0.113.9", "unknown[203.0.113.9]"),
    ("", "203.0.113.9", "unknown[203.0.113.9]"),
    ("mail.outside.test", "203.0.113.7", "mail.outside.test[203.0.113.7]"),
])
def test_show_prints_the_client_as_postfix_logs_it(tmp_path, capsys, name, address, shown):
    store = Q.FileStore(str(tmp_path / "q"))
    entry_id = put(store, client_name=name, client_address=address)
    (tmp_path / "s.toml").write_text(f'quarantine_directory = "{tmp_path / "q"}"\n')
    assert cli.main(["quarantine", "show", entry_id, "-c", str(tmp_path / "s.toml")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("client:")]
    assert lines == [f"client:      {shown}"]
