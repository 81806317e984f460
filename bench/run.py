#!/usr/bin/env python3
"""scanmilter benchmark: one Postfix, one clamd, one spamd, eight ways of putting mail through them.

    1 bare      Postfix without a milter: the ceiling
    2 noeng     scanmilter with clamd_enabled = spamd_enabled = false: the cost of scanmilter itself
    3 scan      scanmilter with clamd and spamd: the real job
    4 peers     clamav-milter + spamass-milter chained (-r 15, no -i): the pair scanmilter replaces
    5 direct    clamd INSTREAM + spamd SYMBOLS in parallel per message, no MTA: the scanners' own limit
    6 trivial   a pymilter milter that accepts everything and adds one header: the Python floor
    7 noeng-tcp variant 2 on a TCP milter socket
    8 trivial-tcp variant 6 on a TCP milter socket: the ~90 ms per message TCP stall of plain libmilter

Every variant uses the same private stack (tools/stack.py: Postfix -> smtp-sink, clamd, spamd with
4 children); only Postfix's smtpd_milters changes (postconf + postfix reload). Milters listen on
unix sockets, except in variants 7 and 8 (TCP on 127.0.0.1). Runs are interleaved (round r runs
every variant once) so drift hits all variants alike.
The client is a thread pool of --sessions SMTP sessions, one message per session (connect, EHLO,
XCLIENT from an outside address, EHLO, MAIL, RCPT, DATA, QUIT), timing every message.
A memory run follows: one 50 MB message, then 100 concurrent sessions held in DATA, each against a
freshly started scanmilter. See bench/README.md for how to read the output.

    .venv/bin/python bench/run.py [--quick] [--messages N] [--sessions N] [--runs N] [--only 1,3,4]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(HERE))
import stack as stacklib  # noqa: E402
import corpus as corpuslib  # noqa: E402

VARIANTS = {  # number: (JSON key, label)
    "1": ("1_bare_postfix", "bare Postfix, no milter"),
    "2": ("2_scanmilter_engines_off", "scanmilter, engines disabled"),
    "3": ("3_scanmilter", "scanmilter + clamd + spamd"),
    "4": ("4_clamav_milter_spamass_milter", "clamav-milter + spamass-milter"),
    "5": ("5_scanners_direct", "clamd + spamd directly"),
    "6": ("6_trivial_pymilter", "trivial pymilter milter"),
    "7": ("7_scanmilter_engines_off_tcp", "scanmilter, engines disabled, TCP"),
    "8": ("8_trivial_pymilter_tcp", "trivial pymilter milter, TCP"),
}
SPAMD_BOUND = ("3", "4", "5")
RATIOS = [("2/1", "scanmilter without engines vs bare Postfix"),
          ("2/6", "scanmilter without engines vs trivial pymilter milter (same unix socket)"),
          ("3/4", "scanmilter vs clamav-milter + spamass-milter"),
          ("3/5", "scanmilter vs clamd + spamd driven directly"),
          ("7/8", "scanmilter without engines vs trivial pymilter milter (same TCP socket)")]
TCP_P50_LIMIT_MS = 10.0             # variant 7's p50: no per-message TCP stall

OUTSIDE_ADDR = "203.0.113.25"       # XCLIENT: every message is inbound from an outside host
SENDER, RECIPIENT = "alice@outside.test", "bob@example.com"
REJECT_LEVEL = 15.0                 # scanmilter's default reject_level, spamass-milter -r 15
SPAMD_SIZE_LIMIT = 512 * 1024       # scanmilter's spamd_size_limit (spamc skips over 500 KB too)
CLAMD_SIZE_LIMIT = 25 * 1024 * 1024
SOCKET_TIMEOUT = 120.0              # per socket operation of the client
START_TIMEOUT = 60.0                # a milter must accept connections within this
DRAIN_TIMEOUT = 300.0               # Postfix's queue must be empty within this after a run
WARMUP = 16                         # untimed messages before every measured run
STOP_TIMEOUT = 8.0                  # SIGTERM -> SIGKILL for our own processes (C milters ignore SIGTERM for >7 s)

TRIVIAL_MILTER = REPO / "tools" / "trivial_milter.py"    # variant 6, shared with the stack self-test


class BenchError(RuntimeError):
    pass


class BenchTimeout(BaseException):
    """The whole benchmark ran out of its time budget (--max-minutes)."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- /proc
def _stat_fields(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _children():
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat_fields(d)
            if st:
                kids.setdefault(int(st[1]), []).append(int(d))
    return kids


def tree_cpu(pids) -> float:
    """CPU seconds (user+system, plus reaped children's) of the processes and their live descendants.
    A child that exits moves its time into its parent's cutime/cstime, so the sum is conserved."""
    tck = os.sysconf("SC_CLK_TCK")
    kids, seen, todo, total = _children(), set(), list(pids), 0
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        st = _stat_fields(pid)
        if st and st[0] not in "ZX":
            total += sum(int(x) for x in st[11:15])
            todo.extend(kids.get(pid, []))
    return total / tck


def mem_kib(pid, field="VmRSS") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) if m else 0
    except OSError:
        return 0


def system_cpu() -> tuple[float, float]:
    """(user+nice+system, steal) CPU seconds of the whole machine so far, from /proc/stat.
    irq and softirq time are left out: the kernel charges them to no process."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    tck = os.sysconf("SC_CLK_TCK")
    return (v[0] + v[1] + v[2]) / tck, v[7] / tck


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------- our own processes
class Procs:
    """Milters started by the benchmark: own session each, "pid starttime" in DIR/run/bench.pids."""

    def __init__(self, root: Path):
        self.root, self.file = root, root / "run" / "bench.pids"
        self.procs: dict[str, subprocess.Popen] = {}

    def _entries(self):
        try:
            return [(int(p), s) for p, s in (ln.split()[:2] for ln in self.file.read_text().splitlines() if ln.strip())]
        except OSError:
            return []

    def stop_leftovers(self):
        """Processes of an earlier benchmark in this directory that was killed before cleaning up."""
        left = stacklib._stop_pids(self._entries(), STOP_TIMEOUT)
        if left:
            raise BenchError(f"leftover pids {left} survived SIGKILL")
        self.file.unlink(missing_ok=True)

    def start(self, name, cmd, socket_path, cwd: Path, env=None):
        """socket_path: a unix socket's Path, or a TCP port on 127.0.0.1."""
        if isinstance(socket_path, Path):
            socket_path.unlink(missing_ok=True)
        logf = cwd / f"{name}.log"
        with open(logf, "ab") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=cwd, env=env, start_new_session=True, umask=0)
        self.procs[name] = proc
        st = _stat_fields(proc.pid)
        with open(self.file, "a") as f:
            f.write(f"{proc.pid} {st[19] if st else 0} {name}\n")
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with status {proc.returncode}:\n{stacklib._tail(logf)}")
            if stacklib._chat(socket_path, read=False) is not None:
                return proc.pid
            if time.monotonic() > deadline:
                raise BenchError(f"{name} not accepting on {socket_path} after {START_TIMEOUT:.0f}s:\n"
                                 f"{stacklib._tail(logf)}")
            time.sleep(0.05)

    def pid(self, name):
        return self.procs[name].pid

    def stop(self, names=None):
        names = list(self.procs) if names is None else names
        entries = []
        for n in names:
            p = self.procs.get(n)
            if p:
                st = _stat_fields(p.pid)
                entries.append((p.pid, st[19] if st else None))
        left = stacklib._stop_pids([e for e in entries if e[1]], STOP_TIMEOUT,
                                   reap=[self.procs[n] for n in names if n in self.procs])
        for n in names:
            self.procs.pop(n, None)
        alive = {(p, s) for p, s in self._entries() if stacklib._alive(p, s)}
        if alive:
            self.file.write_text("".join(f"{p} {s}\n" for p, s in alive))
        else:
            self.file.unlink(missing_ok=True)
        if left:
            raise BenchError(f"pids {left} survived SIGKILL")


# ---------------------------------------------------------------- Postfix
def run_cmd(cmd, timeout=60):
    r = subprocess.run(cmd, capture_output=True, timeout=timeout, text=True)
    if r.returncode != 0:
        raise BenchError(f"{shlex.join(cmd)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def master_pid(stack) -> int:
    return int((stack.queue_dir / "pid/master.pid").read_text().split()[0])


def smtpd_pids(stack) -> list:
    master, out = master_pid(stack), []
    for pid in _children().get(master, []):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "smtpd":
                out.append(pid)
        except OSError:
            pass
    return out


class Postfix:
    def __init__(self, stack):
        self.stack, self.current = stack, None
        self.conf = str(stack.postfix_conf)

    def configure(self, **settings):
        run_cmd([stacklib._bin("postconf"), "-c", self.conf, "-e"] + [f"{k}={v}" for k, v in settings.items()])
        self.reload()

    def reload(self):
        """Reload and wait until every smtpd of the old configuration is gone."""
        old = smtpd_pids(self.stack)
        run_cmd([stacklib._bin("postfix"), "-c", self.conf, "reload"])
        deadline = time.monotonic() + 30
        while any(stacklib._alive(p) for p in old):
            if time.monotonic() > deadline:
                raise BenchError(f"smtpd processes {old} still alive 30 s after postfix reload")
            time.sleep(0.05)
        if not stacklib._alive(master_pid(self.stack)):
            raise BenchError("Postfix master died on reload:\n" + stacklib._tail(self.stack.logs["postfix"]))

    def set_milters(self, milters: list[str]):
        value = ", ".join(milters)
        if value != self.current:
            self.configure(smtpd_milters=value)
            self.current = value

    def drain(self, timeout=DRAIN_TIMEOUT):
        """Wait until the queue is empty, then delete what the sink wrote (bounded disk use)."""
        deadline = time.monotonic() + timeout
        while not self.stack.queue_empty():
            if time.monotonic() > deadline:
                raise BenchError(f"Postfix queue not empty {timeout:.0f}s after the run:\n"
                                 + stacklib._tail(self.stack.logs["postfix"]))
            time.sleep(0.1)
        time.sleep(0.2)  # the sink may still be writing the last message
        for p in self.stack.delivered_dir.glob("*"):
            try:
                p.unlink()
            except OSError:
                pass


# ---------------------------------------------------------------- the SMTP client
def smtp_payload(data: bytes) -> bytes:
    """DATA content: dot-stuffed, CRLF, ending with CRLF.CRLF."""
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return re.sub(rb"(?m)^\.", b"..", data) + b".\r\n"


def _reply(f):
    lines = []
    while True:
        line = f.readline(8192)
        if not line:
            raise ConnectionError("connection closed by server")
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            break
    try:
        return int(lines[-1][:3]), b"".join(lines).decode("utf-8", "replace").strip()
    except ValueError:
        raise ConnectionError(f"bad reply {lines[-1][:80]!r}") from None


def _expect(f, want, stage):
    code, text = _reply(f)
    if code != want:
        raise _Refused(code, f"{stage}: {text}")
    return code


class _Refused(Exception):
    def __init__(self, code, text):
        super().__init__(text)
        self.code = code


def smtp_open(port: int, timeout: float = SOCKET_TIMEOUT, client_addr: str = OUTSIDE_ADDR, sender: str = SENDER):
    """A session up to the 354 of DATA: (socket, reader)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rb")
        _expect(f, 220, "greeting")
        s.sendall(b"EHLO client.bench.test\r\n")
        _expect(f, 250, "ehlo")
        s.sendall(f"XCLIENT ADDR={client_addr} NAME=mail.outside.test\r\n".encode())
        _expect(f, 220, "xclient")
        s.sendall(b"EHLO client.bench.test\r\n")
        _expect(f, 250, "ehlo")
        s.sendall(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode())  # PIPELINING
        replies = [_reply(f) for _ in range(3)]
        for (code, text), want in zip(replies, (250, 250, 354)):
            if code != want:
                raise _Refused(code, text)
        return s, f
    except BaseException:
        s.close()
        raise


def smtp_finish(s, f, rest: bytes):
    try:
        s.sendall(rest)
        code, text = _reply(f)
        try:
            s.sendall(b"QUIT\r\n")
        except OSError:
            pass
        return code, text
    finally:
        s.close()


def smtp_send(port: int, payload: bytes, sender: str = SENDER) -> dict:
    t0 = time.perf_counter()
    try:
        s, f = smtp_open(port, sender=sender)
    except _Refused as e:
        return {"code": e.code, "reply": str(e), "latency": time.perf_counter() - t0, "data_latency": None}
    t1 = time.perf_counter()
    code, text = smtp_finish(s, f, payload)
    t2 = time.perf_counter()
    return {"code": code, "reply": text[:200], "latency": t2 - t0, "data_latency": t2 - t1}


# ---------------------------------------------------------------- clamd + spamd directly
def received_header() -> bytes:
    """What Postfix prepends (and passes to milters), so variant 5 scans the same bytes."""
    return (f"Received: from mail.outside.test (mail.outside.test [{OUTSIDE_ADDR}])\r\n"
            f"\tby scanmilter.test (Postfix) with ESMTP id 4ABCDEF0123\r\n"
            f"\tfor <{RECIPIENT}>; {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n").encode()


def clamd_instream(path: str, data: bytes) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(SOCKET_TIMEOUT)
        s.connect(path)
        s.sendall(b"zINSTREAM\0")
        for i in range(0, len(data), 65536):
            chunk = data[i:i + 65536]
            s.sendall(struct.pack("!L", len(chunk)) + chunk)
        s.sendall(struct.pack("!L", 0))
        reply = b""
        while not reply.endswith(b"\0"):
            d = s.recv(4096)
            if not d:
                break
            reply += d
    return reply.rstrip(b"\0").decode("utf-8", "replace")


def spamd_symbols(port: int, data: bytes) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as s:
        s.sendall(b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(data) + data)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while d := s.recv(65536):
            reply += d
    m = re.search(rb"(?im)^Spam: *\w+ *; *(-?[\d.]+) */", reply)
    if not m:
        raise ConnectionError(f"spamd: unexpected reply {reply[:100]!r}")
    return float(m.group(1))


def direct_scan(stack, data: bytes) -> dict:
    """Both engines in parallel for one message, as scanmilter does; 550 when either would reject."""
    data = received_header() + data
    t0 = time.perf_counter()
    virus = {}

    def clam():
        try:
            virus["reply"] = clamd_instream(str(stack.clamd_socket), data) if len(data) <= CLAMD_SIZE_LIMIT \
                else "stream: OK"
        except Exception as e:  # noqa: BLE001 - reported as an error of this message
            virus["error"] = f"clamd: {e}"
    t = threading.Thread(target=clam, daemon=True)
    t.start()
    score = spamd_symbols(stack.spamd_port, data) if len(data) <= SPAMD_SIZE_LIMIT else 0.0
    t.join(SOCKET_TIMEOUT)
    if "error" in virus or "reply" not in virus:
        raise ConnectionError(virus.get("error", "clamd: no reply"))
    lat = time.perf_counter() - t0
    found = virus["reply"].endswith("FOUND")
    if not found and virus["reply"] != "stream: OK":
        raise ConnectionError(f"clamd: {virus['reply'][:100]}")
    code = 550 if found or score >= REJECT_LEVEL else 250
    return {"code": code, "reply": f"{virus['reply']}; score {score}", "latency": lat, "data_latency": lat}


# ---------------------------------------------------------------- one load run
def run_load(items: list, sessions: int, fn, timeout: float) -> tuple[list, float]:
    """fn(item) in `sessions` threads; (results in item order, wall seconds). Bounded by `timeout`."""
    results = [None] * len(items)
    lock, nxt, stop = threading.Lock(), [0], threading.Event()

    def worker():
        while not stop.is_set():
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(items):
                return
            try:
                results[i] = fn(items[i])
            except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the run
                results[i] = {"code": 0, "reply": f"{type(e).__name__}: {e}"[:200], "latency": None,
                              "data_latency": None}

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(sessions, len(items)))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        stop.set()  # no new messages; the ones in flight end within SOCKET_TIMEOUT
        for t in threads:
            t.join(SOCKET_TIMEOUT + 5)
        raise BenchError(f"run not finished after {timeout:.0f}s ({sum(r is not None for r in results)} of "
                         f"{len(items)} messages done)")
    return results, time.perf_counter() - t0


def expected_code(msg, variant) -> int:
    return 550 if variant in ("3", "4", "5") and msg.spam_or_virus else 250


# ---------------------------------------------------------------- the benchmark
class Bench:
    def __init__(self, args):
        self.args = args
        self.root = Path(args.dir).resolve()
        self.stack = None
        self.procs = None
        self.postfix = None
        self.milters = {}        # variant -> names of its milter processes, in smtpd_milters order
        self.sockets = {}        # milter name -> its address in Postfix's spelling (unix:PATH, inet:HOST:PORT)

    # ------------------------------------------------------------ set-up
    def setup(self, variants):
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "run").mkdir(exist_ok=True)
        self.procs = Procs(self.root)
        self.procs.stop_leftovers()
        self.stack = stacklib.Stack(self.root, smtp_port=stacklib.free_port(), with_milter=False,
                                    spamd_children=self.args.spamd_children)
        log(f"starting Postfix, clamd, spamd ({self.args.spamd_children} children), smtp-sink under {self.root}")
        self.stack.start()
        self.postfix = Postfix(self.stack)
        # 100 concurrent sessions in the memory run need more than the default 100 smtpd processes
        self.postfix.configure(default_process_limit=300, smtpd_milters="")
        self.postfix.current = ""
        mdir = self.root / "milters"
        shutil.rmtree(mdir, ignore_errors=True)   # configurations, sockets and logs of an earlier run
        mdir.mkdir()
        os.chmod(mdir, 0o755)
        if "2" in variants:
            self.start_scanmilter("scanmilter-noeng", engines=False)
            self.milters["2"] = ["scanmilter-noeng"]
        if "3" in variants:
            self.start_scanmilter("scanmilter", engines=True)
            self.milters["3"] = ["scanmilter"]
        if "4" in variants:
            self.start_peers()
            self.milters["4"] = ["clamav-milter", "spamass-milter"]
        if "6" in variants:
            self.start_trivial("trivial", tcp=False)
            self.milters["6"] = ["trivial"]
        if "7" in variants:
            self.start_scanmilter("scanmilter-noeng-tcp", engines=False, tcp=True)
            self.milters["7"] = ["scanmilter-noeng-tcp"]
        if "8" in variants:
            self.start_trivial("trivial-tcp", tcp=True)
            self.milters["8"] = ["trivial-tcp"]

    def listen_address(self, name, tcp):
        """(libmilter's spelling, Postfix's spelling, what Procs.start waits for)."""
        if tcp:
            port = stacklib.free_port()
            return f"inet:{port}@127.0.0.1", f"inet:127.0.0.1:{port}", port
        sock = self.root / "milters" / f"{name}.sock"
        return f"unix:{sock}", f"unix:{sock}", sock

    def start_trivial(self, name, tcp):
        listen, postfix, wait = self.listen_address(name, tcp)
        self.procs.start(name, [sys.executable, str(TRIVIAL_MILTER), listen], wait, self.root / "milters")
        self.sockets[name] = postfix

    def start_scanmilter(self, name, engines=True, tcp=False):
        mdir = self.root / "milters"
        conf = mdir / f"{name}.toml"
        listen, postfix, wait = self.listen_address(name, tcp)
        st = self.stack
        settings = {"milter_socket": listen, "milter_socket_mode": "0666",
                    "clamd_socket": f"unix:{st.clamd_socket}", "spamd_socket": f"inet:127.0.0.1:{st.spamd_port}",
                    "quarantine_release_address": f"inet:127.0.0.1:{st.release_port}",
                    "metrics_address": f"127.0.0.1:{stacklib.free_port()}",
                    "clamd_enabled": engines, "spamd_enabled": engines}
        conf.write_text("".join(f"{k} = {stacklib._toml(v)}\n" for k, v in settings.items()))
        env = dict(os.environ, PYTHONPATH=str(REPO / "milter"))
        self.procs.start(name, [sys.executable, "-m", "scanmilter", "serve", "-c", str(conf)], wait, mdir, env=env)
        self.sockets[name] = postfix

    def start_peers(self):
        """Debian's clamav-milter and spamass-milter, private configuration, the same clamd and spamd."""
        mdir = self.root / "milters"
        for b in ("clamav-milter", "spamass-milter"):
            stacklib._bin(b)  # raises if the package is missing: run WITH_PEERS=1 tools/install-deps
        csock, ssock = mdir / "clamav-milter.sock", mdir / "spamass-milter.sock"
        (mdir / "clamav-milter-tmp").mkdir(exist_ok=True)
        conf = {"MilterSocket": csock, "MilterSocketMode": "666", "FixStaleSocket": "true",
                "Foreground": "true", "PidFile": mdir / "clamav-milter.pid",
                "ClamdSocket": f"unix:{self.stack.clamd_socket}", "ReadTimeout": 120,
                "OnClean": "Accept", "OnInfected": "Reject", "OnFail": "Defer", "AddHeader": "Replace",
                "LogFile": mdir / "clamav-milter.log", "LogTime": "true", "LogInfected": "Basic",
                "LogClean": "Off", "MaxFileSize": "25M", "TemporaryDirectory": mdir / "clamav-milter-tmp"}
        cfile = mdir / "clamav-milter.conf"
        cfile.write_text("".join(f"{k} {v}\n" for k, v in conf.items()))
        self.procs.start("clamav-milter", [stacklib._bin("clamav-milter"), "-c", str(cfile)], csock, mdir)
        # no -i (Debian's default -i 127.0.0.1 would skip loopback; our mail comes from XCLIENT's outside
        # address anyway), no -u: the same spamd user handling as scanmilter (none)
        self.procs.start("spamass-milter", [stacklib._bin("spamass-milter"), "-p", str(ssock), "-r", "15",
                                            "-P", str(mdir / "spamass-milter.pid"), "--",
                                            "-d", "127.0.0.1", "-p", str(self.stack.spamd_port)], ssock, mdir)
        self.sockets["clamav-milter"], self.sockets["spamass-milter"] = f"unix:{csock}", f"unix:{ssock}"

    def empty_scan_caches(self, variant):
        """Every run sends the same corpus: without this, scanmilter would answer the second run
        from its scan cache. A reload (SIGHUP) starts an empty cache; wait until it is done."""
        for name in self.milters.get(variant, []):
            if not name.startswith("scanmilter"):
                continue
            logf = self.root / "milters" / f"{name}.log"
            before = logf.read_text(errors="replace").count("reloaded configuration")
            os.kill(self.procs.pid(name), signal.SIGHUP)
            deadline = time.monotonic() + START_TIMEOUT
            while logf.read_text(errors="replace").count("reloaded configuration") == before:
                if time.monotonic() > deadline:
                    raise BenchError(f"{name} did not reload:\n{stacklib._tail(logf)}")
                time.sleep(0.05)

    def teardown(self):
        errors = []
        if self.procs:
            try:
                self.procs.stop()
            except Exception as e:  # noqa: BLE001
                errors.append(str(e))
        if self.stack:
            try:
                self.stack.stop()
            except Exception as e:  # noqa: BLE001
                errors.append(str(e))
        return errors

    # ------------------------------------------------------------ measuring
    def groups(self, variant):
        """{group: [root pids]} whose CPU is measured."""
        st = self.stack
        g = {"postfix": [p for p, _ in st._pids("postfix")], "clamd": [p for p, _ in st._pids("clamd")],
             "spamd": [p for p, _ in st._pids("spamd")], "sink": [p for p, _ in st._pids("sink")]}
        g["milter"] = [self.procs.pid(n) for n in self.milters.get(variant, [])]
        return g

    def snapshot(self, groups):
        snap = {k: tree_cpu(v) for k, v in groups.items()}
        snap["client"] = self_cpu()
        snap["_system"], snap["_steal"] = system_cpu()
        snap["_time"] = time.monotonic()
        return snap

    def one_run(self, variant, msgs, payloads, sessions=None):
        """One measured run of a variant: dict of raw figures."""
        sessions = sessions or self.args.sessions
        st, pf = self.stack, self.postfix
        if variant == "5":
            fn = lambda i: direct_scan(st, msgs[i].data)   # noqa: E731
        else:
            pf.set_milters([self.sockets[n] for n in self.milters.get(variant, [])])
            fn = lambda i: smtp_send(st.smtp_port, payloads[i], msgs[i].sender)   # noqa: E731
        n = len(msgs)
        warm = [i for i in range(len(msgs)) if msgs[i].kind == "ham"][:WARMUP]
        run_load(warm, sessions, fn, 120)
        pf.drain()
        self.empty_scan_caches(variant)
        groups = self.groups(variant)
        s0 = self.snapshot(groups)
        results, seconds = run_load(list(range(n)), sessions, fn,
                                    timeout=self.args.run_timeout)
        s1 = self.snapshot(groups)
        pf.drain()
        s2 = self.snapshot(groups)
        cpu = {k: s2[k] - s0[k] for k in list(groups) + ["client"]}   # the run and Postfix's delivery after it
        # CPU used on the machine during the load by processes that are not ours (another test suite, ...):
        # the machine's user+system time minus everything we account for
        tracked = sum(s1[k] - s0[k] for k in list(groups) + ["client"])
        other = max(0.0, (s1["_system"] - s0["_system"]) - tracked)
        capacity = (s1["_time"] - s0["_time"]) * (os.cpu_count() or 1)
        if variant == "5":
            cpu["postfix"] = None  # Postfix is not involved
        if not groups["milter"]:
            cpu["milter"] = None
        codes, unexpected = {}, []
        for m, r in zip(msgs, results):
            codes[str(r["code"])] = codes.get(str(r["code"]), 0) + 1
            if r["code"] != expected_code(m, variant):
                unexpected.append(f"{m.kind} {m.mid}: {r['code']} {r['reply']}")
        rss = {name: {"hwm_kib": mem_kib(self.procs.pid(name), "VmHWM"),
                      "rss_kib": mem_kib(self.procs.pid(name), "VmRSS")}
               for name in self.milters.get(variant, [])}
        return {"messages": n, "seconds": seconds, "msgs_per_s": n / seconds, "codes": codes,
                "unexpected": len(unexpected), "unexpected_examples": unexpected[:5],
                "cpu_s": cpu, "rss": rss, "other_cpu_s": other, "other_cpu_share": other / capacity,
                "steal_share": (s1["_steal"] - s0["_steal"]) / capacity,
                "disturbed": other / capacity > self.args.disturbed_share,
                "latencies": [(m.kind, r["latency"], r["data_latency"]) for m, r in zip(msgs, results)]}

    def summarize(self, variant, runs):
        lat = [x[1] for r in runs for x in r["latencies"] if x[1] is not None]
        dlat = [x[2] for r in runs for x in r["latencies"] if x[2] is not None]
        ham = [x[1] for r in runs for x in r["latencies"] if x[1] is not None and x[0] == "ham"]
        total = sum(r["messages"] for r in runs)
        rates = [r["msgs_per_s"] for r in runs]
        cpu = {}
        for k in runs[0]["cpu_s"]:
            vals = [r["cpu_s"][k] for r in runs]
            cpu[k] = None if any(v is None for v in vals) else sum(vals) / total
        rss = {name: max(r["rss"][name]["hwm_kib"] for r in runs) / 1024 for name in runs[0]["rss"]}
        key, label = VARIANTS[variant]
        return {"label": label, "messages_per_run": runs[0]["messages"], "runs": len(runs),
                "msgs_per_s": {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
                               "each": rates},
                "latency_ms_each_run": [{"p50": pct([x[1] for x in r["latencies"] if x[1] is not None], 50),
                                         "p99": pct([x[1] for x in r["latencies"] if x[1] is not None], 99)}
                                        for r in runs],
                "latency_ms": {"p50": pct(lat, 50), "p99": pct(lat, 99), "max": max(lat) * 1000 if lat else None,
                               "p50_ham": pct(ham, 50), "p99_ham": pct(ham, 99),
                               "p50_data": pct(dlat, 50), "p99_data": pct(dlat, 99)},
                "cpu_s_per_msg": cpu,
                "peak_rss_mib": rss or None,
                "peak_rss_mib_total": sum(rss.values()) if rss else None,
                "codes": [r["codes"] for r in runs],
                "other_cpu_share_max": max(r["other_cpu_share"] for r in runs),
                "disturbed_runs": sum(r["disturbed"] for r in runs),
                "unexpected": sum(r["unexpected"] for r in runs),
                "unexpected_examples": [e for r in runs for e in r["unexpected_examples"]][:5]}

    # ------------------------------------------------------------ memory run
    def memory_run(self, msgs, payloads):
        out = {}
        pf, st = self.postfix, self.stack
        ham = [p for m, p in zip(msgs, payloads) if m.kind == "ham"][:8]

        def fresh(name):
            self.start_scanmilter(name, engines=True)
            pf.set_milters([self.sockets[name]])
            for p in ham:  # warm up: imports, pools, engine connections
                smtp_send(st.smtp_port, p)
            pf.drain()
            return self.procs.pid(name)

        # one 50 MB message (over clamd_size_limit and spamd_size_limit: spooled, not scanned), then one
        # of 20 MB that clamd does scan (streamed from the spool), in the same fresh scanmilter
        pid = fresh("scanmilter-mem-big")
        for key, size in (("big_message", self.args.big_bytes), ("scanned_message", self.args.scanned_bytes)):
            if not size:
                continue
            big = corpuslib.big_message(size, seed=size)
            base, hwm0 = mem_kib(pid), mem_kib(pid, "VmHWM")
            sampler = Sampler(pid)
            t0 = time.perf_counter()
            r = smtp_send(st.smtp_port, smtp_payload(big.data), big.sender)
            secs = time.perf_counter() - t0
            peak = sampler.stop()
            hwm1 = mem_kib(pid, "VmHWM")
            # growth: the highest RSS seen (sampled every 20 ms, or the high-water mark if it rose) minus before
            top = max(peak, hwm1 if hwm1 > hwm0 else 0)
            out[key] = {"bytes": len(big.data), "code": r["code"], "reply": r["reply"], "seconds": secs,
                        "rss_before_mib": base / 1024, "rss_peak_sampled_mib": peak / 1024,
                        "hwm_before_mib": hwm0 / 1024, "hwm_after_mib": hwm1 / 1024,
                        "growth_mib": (top - base) / 1024}
            log(f"memory: {len(big.data) / 1e6:.0f} MB message: {r['code']} in {secs:.1f}s, scanmilter RSS "
                f"{base / 1024:.1f} -> peak {top / 1024:.1f} MiB")
            del big
            pf.drain()
        self.procs.stop(["scanmilter-mem-big"])

        # 100 concurrent sessions, each held in DATA for a few seconds
        n, hold = self.args.idle_sessions, self.args.hold_seconds
        pid = fresh("scanmilter-mem-sessions")
        base = mem_kib(pid)
        body = [p for m, p in zip(msgs, payloads) if m.kind == "ham"]
        opened, results, lock = [], [], threading.Lock()
        barrier = threading.Event()

        def session(i):
            p = body[i % len(body)]
            try:
                # one outside address per session: Postfix allows 50 concurrent sessions per client
                s, f = smtp_open(st.smtp_port, client_addr=f"203.0.113.{1 + i % 250}")
            except Exception as e:  # noqa: BLE001
                with lock:
                    results.append({"code": 0, "reply": f"open: {e}"})
                return
            try:
                cut = p.find(b"\r\n\r\n") + 4 + 512   # the header and a little of the body
                s.sendall(p[:cut])
                with lock:
                    opened.append(i)
                barrier.wait(hold + 60)
                code, text = smtp_finish(s, f, p[cut:])
                with lock:
                    results.append({"code": code, "reply": text[:100]})
            except Exception as e:  # noqa: BLE001
                s.close()
                with lock:
                    results.append({"code": 0, "reply": f"{type(e).__name__}: {e}"[:100]})

        sampler = Sampler(pid)
        threads = [threading.Thread(target=session, args=(i,), daemon=True) for i in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(opened) + len(results) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        open_secs = time.perf_counter() - t0
        conns = count_connections(pid)
        time.sleep(hold)
        held_peak = sampler.peak
        threads_in_milter = thread_count(pid)
        barrier.set()
        for t in threads:
            t.join(max(1.0, 240 - (time.perf_counter() - t0)))
        peak = sampler.stop()
        codes = {}
        for r in results:
            codes[str(r["code"])] = codes.get(str(r["code"]), 0) + 1
        hwm = mem_kib(pid, "VmHWM")
        out["concurrent_sessions"] = {
            "sessions": n, "held_in_data": len(opened), "hold_seconds": hold, "open_seconds": open_secs,
            "milter_connections": conns, "milter_threads_while_held": threads_in_milter,
            "codes": codes, "errors": [r["reply"] for r in results if r["code"] != 250][:5],
            "rss_before_mib": base / 1024, "rss_peak_while_held_mib": held_peak / 1024,
            "rss_peak_mib": max(peak, hwm) / 1024, "growth_mib": (max(peak, hwm) - base) / 1024}
        log(f"memory: {len(opened)} of {n} sessions held in DATA for {hold:.0f}s; scanmilter RSS {base / 1024:.1f} "
            f"-> {held_peak / 1024:.1f} MiB while held, peak {max(peak, hwm) / 1024:.1f} MiB; codes {codes}")
        pf.drain()
        self.procs.stop(["scanmilter-mem-sessions"])
        return out


class Sampler:
    """VmRSS of a process every 20 ms in a thread; stop() returns the peak in KiB."""

    def __init__(self, pid):
        self.pid, self.peak, self._stop = pid, mem_kib(pid), threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, mem_kib(self.pid))

    def stop(self):
        self._stop.set()
        self.t.join(2)
        return max(self.peak, mem_kib(self.pid))


def count_connections(pid) -> int:
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    n += 1
            except OSError:
                pass
    except OSError:
        pass
    return n


def thread_count(pid) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(re.search(r"^Threads:\s+(\d+)", f.read(), re.M).group(1))
    except (OSError, AttributeError):
        return 0


def pct(values, p):
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return (v[lo] + (v[hi] - v[lo]) * (k - lo)) * 1000


# ---------------------------------------------------------------- report
def fmt(v, spec=".1f", none="-"):
    return none if v is None else format(v, spec)


def table(summary) -> str:
    head = (f"{'variant':37} {'msgs/s median (min-max)':>25} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'1-session p50':>13} {'milter CPU ms/msg':>17} {'postfix':>7} {'clamd':>6} {'spamd':>6} {'client':>6} "
            f"{'peak RSS MiB':>12} {'other%':>6} {'unexp':>5}")
    lines = [head, "-" * len(head)]
    for v, (key, label) in VARIANTS.items():
        s = summary.get(key)
        if not s:
            continue
        r, lat, cpu = s["msgs_per_s"], s["latency_ms"], s["cpu_s_per_msg"]
        ms = lambda k: fmt(cpu[k] * 1000 if cpu.get(k) is not None else None, ".2f")  # noqa: E731
        rate = f"{r['median']:.1f} ({r['min']:.1f}-{r['max']:.1f})"
        one = s.get("latency_ms_one_session", {}).get("p50")
        lines.append(f"{v} {label:35} {rate:>25} {fmt(lat['p50']):>7} {fmt(lat['p99']):>7} {fmt(one):>13} "
                     f"{ms('milter'):>17} "
                     f"{ms('postfix'):>7} {ms('clamd'):>6} {ms('spamd'):>6} {ms('client'):>6} "
                     f"{fmt(s['peak_rss_mib_total']):>12} {100 * s['other_cpu_share_max']:>6.1f} {s['unexpected']:>5}")
    return "\n".join(lines)


def ratios(summary) -> dict:
    out = {}
    for name, desc in RATIOS:
        a, b = name.split("/")
        sa, sb = summary.get(VARIANTS[a][0]), summary.get(VARIANTS[b][0])
        if sa and sb:
            out[name] = {"value": sa["msgs_per_s"]["median"] / sb["msgs_per_s"]["median"], "meaning": desc}
    return out


def targets(summary, rat, memory) -> list:
    out = []

    def add(name, value, limit, ok, unit=""):
        out.append({"target": name, "value": value, "limit": limit, "met": ok, "unit": unit})
    if "3/4" in rat:
        add("throughput 3/4 >= 1.0", rat["3/4"]["value"], 1.0, rat["3/4"]["value"] >= 1.0, "x")
    if "3/5" in rat:
        add("throughput 3/5 >= 0.95", rat["3/5"]["value"], 0.95, rat["3/5"]["value"] >= 0.95, "x")
    if "2/6" in rat:
        add("throughput 2/6 >= 0.9", rat["2/6"]["value"], 0.9, rat["2/6"]["value"] >= 0.9, "x")
    if "7/8" in rat:
        add("throughput 7/8 >= 0.9", rat["7/8"]["value"], 0.9, rat["7/8"]["value"] >= 0.9, "x")
    s7 = summary.get(VARIANTS["7"][0], {}).get("latency_ms_one_session")
    if s7:
        add(f"p50 latency 7 (TCP, one session) < {TCP_P50_LIMIT_MS:.0f} ms", s7["p50"], TCP_P50_LIMIT_MS,
            s7["p50"] < TCP_P50_LIMIT_MS, "ms")
    s3, s4 = summary.get(VARIANTS["3"][0]), summary.get(VARIANTS["4"][0])
    if s3 and s4:
        add("p50 latency 3 <= p50 latency 4", s3["latency_ms"]["p50"], s4["latency_ms"]["p50"],
            s3["latency_ms"]["p50"] <= s4["latency_ms"]["p50"], "ms")
    if s3:
        add("p99 latency 3 <= 1.5 x its p50", s3["latency_ms"]["p99"], 1.5 * s3["latency_ms"]["p50"],
            s3["latency_ms"]["p99"] <= 1.5 * s3["latency_ms"]["p50"], "ms")
    if memory.get("big_message"):
        g = memory["big_message"]["growth_mib"]
        add("RSS growth for a 50 MB message <= 10 MiB", g, 10.0, g <= 10.0, "MiB")
    if memory.get("concurrent_sessions"):
        c = memory["concurrent_sessions"]
        add(f"{c['sessions']} concurrent sessions: total RSS < 150 MiB", c["rss_peak_mib"], 150.0,
            c["rss_peak_mib"] < 150.0, "MiB")
    return out


def versions(stack) -> dict:
    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:  # noqa: BLE001
            return None
    try:
        import Milter
        pym = Milter.__version__
    except Exception:  # noqa: BLE001
        pym = None
    sys.path.insert(0, str(REPO / "milter"))
    import scanmilter
    dirty = out(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return {"postfix": out([stacklib._bin("postconf"), "-c", str(stack.postfix_conf), "-h", "mail_version"]),
            "clamd": out([stacklib._bin("clamd"), "--version"]), "spamd": out([stacklib._bin("spamd"), "--version"]),
            "clamav-milter": out(["clamav-milter", "--version"]), "pymilter": pym, "python": platform.python_version(),
            "scanmilter": scanmilter.__version__,
            "git": (out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or "?") + ("+dirty" if dirty else "")}


def machine() -> dict:
    osr = {}
    try:
        for ln in Path("/etc/os-release").read_text().splitlines():
            k, _, v = ln.partition("=")
            osr[k] = v.strip('"')
    except OSError:
        pass
    cpu = ""
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    return {"os": osr.get("PRETTY_NAME"), "cpus": os.cpu_count(), "cpu_model": cpu, "kernel": platform.release(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


# ---------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="smoke run: 100 messages, 1 run each (a few minutes)")
    ap.add_argument("--messages", type=int, help="messages per run of the spamd-bound variants 3, 4, 5 "
                    "(default 600; --quick 100)")
    ap.add_argument("--fast-repeat", type=int, default=6,
                    help="variants 1, 2, 6, 7, 8 send the corpus this many times per run (default 6)")
    ap.add_argument("--sessions", type=int, default=8, help="concurrent SMTP sessions / scans (default 8)")
    ap.add_argument("--runs", type=int, help="runs per variant; the median is reported (default 3; --quick 1)")
    ap.add_argument("--only", default="".join(VARIANTS), help="variants to run, e.g. 1,3,4 (default all)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory run")
    ap.add_argument("--serial-messages", type=int, default=200,
                    help="ham messages sent one at a time per variant for the idle latency, a fifth of "
                    "that for variants 3, 4, 5 (default 200; 0: none)")
    ap.add_argument("--big-bytes", type=int, default=50_000_000, help="size of the memory run's big message")
    ap.add_argument("--scanned-bytes", type=int, default=20_000_000,
                    help="size of a second big message, under clamd_size_limit (0: none)")
    ap.add_argument("--idle-sessions", type=int, default=100, help="concurrent sessions in the memory run")
    ap.add_argument("--hold-seconds", type=float, default=5.0, help="how long they are held in DATA")
    ap.add_argument("--spamd-children", type=int, default=4)
    ap.add_argument("--disturbed-share", type=float, default=0.10,
                    help="a run during which other processes used more than this share of the CPU is "
                    "disturbed (default 0.10)")
    ap.add_argument("--retries", type=int, default=1, help="how often a disturbed run is repeated (default 1)")
    ap.add_argument("--run-timeout", type=float, default=600.0, help="seconds one measured run may take")
    ap.add_argument("--max-minutes", type=float, default=45.0, help="the whole benchmark's time budget")
    ap.add_argument("--dir", default="/tmp/scanmilter-bench",
                    help="private directory of the stack (its parents must be world-searchable)")
    ap.add_argument("--results", default=str(HERE / "results"), help="where the JSON goes")
    args = ap.parse_args(argv)
    args.messages = args.messages or (100 if args.quick else 600)
    args.runs = args.runs or (1 if args.quick else 3)
    args.only = "".join(dict.fromkeys(c for c in args.only if c in VARIANTS))
    if not args.only:
        ap.error(f"--only: no known variant ({min(VARIANTS)}-{max(VARIANTS)})")
    return args


def main(argv=None):
    args = parse_args(argv)
    exe, script = Path(sys.executable), Path(__file__).resolve()
    exe = os.path.relpath(exe, REPO) if str(exe).startswith(str(REPO)) else str(exe)
    command = shlex.join([exe, os.path.relpath(script, REPO)] + list(sys.argv[1:] if argv is None else argv))

    def on_signal(signum, frame):
        if signum == signal.SIGALRM:
            raise BenchTimeout(f"time budget of {args.max_minutes:.0f} minutes used up")
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)   # also when started with SIGINT ignored (a background job)
    signal.signal(signal.SIGALRM, on_signal)
    signal.alarm(int(args.max_minutes * 60))

    t_start = time.monotonic()
    started = datetime.datetime.now(datetime.timezone.utc)
    log(f"generating the corpus: {args.messages} messages")
    msgs = corpuslib.generate(args.messages)
    payloads = [smtp_payload(m.data) for m in msgs]
    fast_msgs, fast_payloads = msgs * args.fast_repeat, payloads * args.fast_repeat
    log(f"corpus: {json.dumps(corpuslib.describe(msgs))}")

    bench = Bench(args)
    raw = {v: [] for v in args.only}
    memory, failed, discarded, serial = {}, None, {}, {}
    try:
        bench.setup(args.only)
        log(f"stack up: {json.dumps(bench.stack.describe()['smtp'])}; milters: "
            + ", ".join(f"{n} pid {bench.procs.pid(n)}" for n in bench.procs.procs))
        for rnd in range(args.runs):
            for v in args.only:
                m, p = (msgs, payloads) if v in SPAMD_BOUND else (fast_msgs, fast_payloads)
                for attempt in range(args.retries + 1):
                    r = bench.one_run(v, m, p)
                    log(f"run {rnd + 1}/{args.runs} variant {v} ({VARIANTS[v][1]}): {r['messages']} msgs in "
                        f"{r['seconds']:.1f}s = {r['msgs_per_s']:.1f}/s; codes {r['codes']}; other processes "
                        f"{100 * r['other_cpu_share']:.1f}% of the CPU"
                        + (f"; {r['unexpected']} UNEXPECTED e.g. {r['unexpected_examples'][:2]}"
                           if r["unexpected"] else ""))
                    if not r["disturbed"] or attempt == args.retries:
                        break
                    log(f"  disturbed (other processes over {100 * args.disturbed_share:.0f}% of the CPU): repeating")
                    discarded.setdefault(VARIANTS[v][0], []).append(
                        {k: r[k] for k in ("msgs_per_s", "seconds", "other_cpu_share")})
                raw[v].append(r)
        for v in args.only if args.serial_messages else ():
            # one session, ham only: the latency of a message on an idle system, where a transport
            # stall is not hidden behind queueing
            n = args.serial_messages // (5 if v in SPAMD_BOUND else 1)
            m = [x for x in msgs if x.kind == "ham"][:n]
            r = bench.one_run(v, m, [smtp_payload(x.data) for x in m], sessions=1)
            lat = [x[1] for x in r["latencies"] if x[1] is not None]
            serial[v] = {"messages": len(m), "p50": pct(lat, 50), "p99": pct(lat, 99)}
            log(f"one session, variant {v} ({VARIANTS[v][1]}): {len(m)} ham messages, p50 "
                f"{fmt(serial[v]['p50'])} ms, p99 {fmt(serial[v]['p99'])} ms")
        if not args.no_memory:
            memory = bench.memory_run(msgs, payloads)
        info = {"versions": versions(bench.stack)}
    except (Exception, KeyboardInterrupt, BenchTimeout) as e:
        failed = f"{type(e).__name__}: {e}"
        info = {}
        log(f"FAILED: {failed}")
    finally:
        # a second Ctrl-C or SIGTERM must not interrupt the clean-up (it is bounded: ~20 s at most)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.alarm(0)
        log("stopping everything the benchmark started")
        errs = bench.teardown()
        for e in errs:
            log(f"clean-up problem: {e}")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    summary = {VARIANTS[v][0]: bench.summarize(v, runs) for v, runs in raw.items() if runs}
    for v, figures in serial.items():
        if VARIANTS[v][0] in summary:
            summary[VARIANTS[v][0]]["latency_ms_one_session"] = figures
    rat = ratios(summary)
    tg = targets(summary, rat, memory)
    warnings = []
    for key, sm in summary.items():
        if sm["unexpected"]:
            warnings.append(f"{key}: {sm['unexpected']} unexpected replies (e.g. {sm['unexpected_examples'][:1]}): "
                            "this variant did not do the whole job, its figures do not compare")
        if sm["disturbed_runs"]:
            warnings.append(f"{key}: {sm['disturbed_runs']} run(s) disturbed by other processes even after "
                            f"{args.retries} repetition(s) (up to {100 * sm['other_cpu_share_max']:.0f}% of the CPU)")
    result = {"date": started.strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": machine(), "command": command,
              "minutes": round((time.monotonic() - t_start) / 60, 1), "failed": failed,
              "settings": {"messages": args.messages, "fast_repeat": args.fast_repeat, "sessions": args.sessions,
                           "runs": args.runs, "spamd_children": args.spamd_children, "warmup": WARMUP,
                           "disturbed_share": args.disturbed_share, "retries": args.retries,
                           "socket": "unix (variants 7, 8: TCP)", "client": "python thread pool, one message per SMTP session, XCLIENT "
                           f"ADDR={OUTSIDE_ADDR}"},
              "corpus": corpuslib.describe(msgs), **info,
              "variants": summary, "ratios": rat, "targets": tg, "memory": memory,
              "discarded_disturbed_runs": discarded, "warnings": warnings}
    print()
    print(table(summary))
    print()
    for name, r in rat.items():
        print(f"ratio {name} = {r['value']:.3f}   ({r['meaning']})")
    if memory:
        c = memory.get("concurrent_sessions")
        for b in (memory.get("big_message"), memory.get("scanned_message")):
            if b:
                print(f"memory: {b['bytes'] / 1e6:.0f} MB message -> {b['code']} in {b['seconds']:.1f}s; scanmilter "
                      f"RSS growth {b['growth_mib']:.1f} MiB ({b['rss_before_mib']:.1f} -> "
                      f"{b['rss_before_mib'] + b['growth_mib']:.1f})")
        if c:
            print(f"memory: {c['held_in_data']}/{c['sessions']} sessions held in DATA; scanmilter RSS "
                  f"{c['rss_before_mib']:.1f} -> {c['rss_peak_while_held_mib']:.1f} MiB while held, "
                  f"peak {c['rss_peak_mib']:.1f} MiB; codes {c['codes']}")
    print()
    for t in tg:
        v, lim = t["value"], t["limit"]
        spec = ".3f" if t["unit"] == "x" else ".1f"
        print(f"{'MET   ' if t['met'] else 'MISSED'} {t['target']}: {v:{spec}}{t['unit']} "
              f"(limit {lim:{spec}}{t['unit']})")
    for w in warnings:
        print(f"WARNING {w}")
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nresults: {path}  ({result['minutes']} minutes)")
    if failed:
        print(f"benchmark FAILED: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
