"""Process supervision for the test stack (tools/stack.py) and the benchmark (bench/).

A process is started in a session of its own, its output appended to a log file, and recorded in
a pid file as "pid starttime [label]": the start time (from /proc/PID/stat) tells a recycled pid
from ours, so a later run can stop what an earlier one left behind without hitting a stranger.
Whether a process runs is read from /proc/PID/stat, never with kill -0: a process that has exited
but not been reaped (a zombie) lingers for seconds and would pass for alive. Stopping is SIGTERM,
a bounded wait, then SIGKILL to the whole session.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

KILL_WAIT = 5.0    # seconds to wait for SIGKILL to take effect


class ProcsError(RuntimeError):
    pass


def stat_fields(pid) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces and ")"
    except (OSError, IndexError):
        return None


def starttime(pid) -> str | None:
    """The process's start time in clock ticks since boot (a string, as in the pid file), or None."""
    st = stat_fields(pid)
    return st[19] if st else None


def alive(pid, start=None) -> bool:
    """True while the process runs (not a zombie); with `start`, only if it is still that process."""
    st = stat_fields(pid)
    return bool(st) and st[0] not in "ZX" and (start is None or st[19] == start)


def children() -> dict[int, list[int]]:
    """{parent pid: [child pids]} of every process on the machine."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = stat_fields(d)
            if st:
                kids.setdefault(int(st[1]), []).append(int(d))
    return kids


class PidFile:
    """Lines of "pid starttime [label]"."""

    def __init__(self, path):
        self.path = Path(path)

    def entries(self) -> list[tuple[int, str]]:
        """[(pid, starttime)] as recorded; [] when there is no file."""
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return []
        return [(int(p), s) for p, s in (ln.split()[:2] for ln in lines if ln.strip())]

    def record(self, pid: int, label: str = "") -> None:
        with open(self.path, "a") as f:
            f.write(f"{pid} {starttime(pid) or 0}{' ' + label if label else ''}\n")

    def keep_alive(self) -> None:
        """Forget the entries whose process has ended (the file goes when none is left)."""
        live = [(p, s) for p, s in self.entries() if alive(p, s)]
        if live:
            self.path.write_text("".join(f"{p} {s}\n" for p, s in live))
        else:
            self.remove()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def start(cmd, log, cwd, pidfile: PidFile, label: str = "", env=None, **popen) -> subprocess.Popen:
    """Run `cmd` in a session of its own (so that it and its children can be stopped together),
    stdin from /dev/null, stdout and stderr appended to `log`; record it in `pidfile`."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True, **popen)
    pidfile.record(proc.pid, label)
    return proc


def wait_until(ready, timeout: float, interval: float = 0.05) -> bool:
    """Call ready() until it returns true (then True) or `timeout` seconds have passed (False).
    ready() may raise to give up early, for instance when the process it waits for has exited."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def stop(entries, timeout: float, reap=()) -> list[int]:
    """SIGTERM every live (pid, starttime), wait up to `timeout` seconds, then SIGKILL the session
    of any left over; `reap`: our own Popen children, reaped while waiting so that they do not stay
    zombies. Returns the pids that survived even SIGKILL."""
    live = [(p, s) for p, s in entries if alive(p, s)]
    leaders = set()
    for pid, _ in live:
        try:
            if os.getpgid(pid) == pid:  # started by start(): the leader of its own session
                leaders.add(pid)
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def gone():
        for proc in reap:
            proc.poll()
        return not any(alive(p, s) for p, s in live)
    if not wait_until(gone, timeout):
        for pid, s in live:
            if alive(pid, s):
                _signal(pid, signal.SIGKILL, pid in leaders)
        wait_until(gone, KILL_WAIT)
    for pid in leaders:  # sweep stragglers (spamd's or Postfix's children) of leaders that are gone
        _signal(pid, signal.SIGKILL, True)
    return [p for p, s in live if alive(p, s)]


def _signal(pid, sig, group):
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def tail(path, lines: int = 25) -> str:
    """The last lines of a log file, for an error message."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def binary(name: str) -> str:
    """The path of a program, looked up in PATH and the sbin directories."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin:/sbin:/bin"
    found = shutil.which(name, path=path)
    if not found:
        raise ProcsError(f"{name} not found in {path}")
    return found


def chat(addr, request: bytes | None = None, read: bool = True, timeout: float = 2.0) -> bytes | None:
    """Connect to a unix socket (path) or 127.0.0.1:addr (int); None if that fails. With a request:
    send it and return the reply up to close; else return the greeting (read) or b"" (not read)."""
    unix = not isinstance(addr, int)
    try:
        with socket.socket(socket.AF_UNIX if unix else socket.AF_INET) as s:
            s.settimeout(timeout)
            s.connect(str(addr) if unix else ("127.0.0.1", addr))
            if request is None:
                return s.recv(4096) if read else b""
            s.sendall(request)
            chunks = []
            while chunk := s.recv(4096):
                chunks.append(chunk)
            return b"".join(chunks)
    except OSError:
        return None


def accepts(addr) -> bool:
    """True when something accepts connections on the unix socket `addr` (path) or 127.0.0.1:addr (int)."""
    return chat(addr, read=False) is not None
