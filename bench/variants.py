"""The benchmark's variants (see run.py): the milters it starts beside the stack, Postfix's
smtpd_milters switched between them, one measured run of a variant (variant 13: with a spamd member
killed half-way and started again after) and the memory run, with what they read from /proc (CPU
time of process trees and of the machine, memory, threads, sockets).

Needs tools/ and milter/ on sys.path (bench/run.py puts them there).
"""
from __future__ import annotations

import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import corpus as corpuslib
import procs
import stack as stacklib
from client import BenchError, DirectScan, run_load, smtp_finish, smtp_open, smtp_payload, smtp_send

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {  # number: (JSON key, label)
    "1": ("1_bare_postfix", "bare Postfix, no milter"),
    "2": ("2_scanmilter_engines_off", "scanmilter, engines disabled"),
    "3": ("3_scanmilter", "scanmilter + clamd + spamd"),
    "4": ("4_clamav_milter_spamass_milter", "clamav-milter + spamass-milter"),
    "5": ("5_scanners_direct", "clamd + spamd directly"),
    "6": ("6_trivial_pymilter", "trivial pymilter milter"),
    "7": ("7_scanmilter_engines_off_tcp", "scanmilter, engines disabled, TCP"),
    "8": ("8_trivial_pymilter_tcp", "trivial pymilter milter, TCP"),
    "9": ("9_rspamd_milter", "rspamd's own milter (+ clamd)"),
    "10": ("10_scanmilter_rspamd", "scanmilter + clamd + rspamd"),
    "11": ("11_scanners_direct_rspamd", "clamd + rspamd directly"),
    "12": ("12_scanmilter_spamd_pool", "scanmilter + clamd + 2 spamd (pool)"),
    "13": ("13_scanmilter_spamd_failover", "as 12, one spamd killed mid-run"),
    "14": ("14_scanmilter_attachments_only", "scanmilter, attachment checks only"),
    "15": ("15_scanmilter_no_attachments", "as 3, attachment checks off"),
}
SPAMD_BOUND = ("3", "4", "5", "12", "13", "15")    # --messages per run; the others --fast-repeat times as many
SCANNING = ("3", "4", "5", "9", "10", "11", "12", "13", "15")   # spam and viruses are rejected
# the attachment checks alone refuse the corpus's viruses by their name (invoice-N.com: the
# shipped `executable` rule), with 554 5.7.1, and let spam through
ATTACHMENTS_ONLY = ("14",)
REJECT_CODE = {"9": 554}                           # rspamd's milter rejects with 554 5.7.1, the others with 550
RSPAMD_VARIANTS = ("9", "10", "11")
POOL = ("spamd-2", "spamd-3")                      # the stack's spamd members that make variant 12's pool
FAILOVER_VICTIM = "spamd-3"                        # variant 13 kills this one
DIRECT = {"5": "spamd", "11": "rspamd"}            # no MTA: the scanners driven directly, with this spam engine
# rspamd's antivirus module serves its own milter (9). A request that names a direction in
# Settings-ID (scanmilter's, and variant 11's through scanmilter's client) skips it: scanmilter
# asks clamd itself, and clamd is not to be asked twice for one message.
RSPAMD_BENCH_SETTINGS = """\
inbound { id = "inbound"; apply { symbols_disabled = ["CLAM_VIRUS"]; } }
outbound { id = "outbound"; apply { symbols_disabled = ["CLAM_VIRUS"]; } }
"""
START_TIMEOUT = 60.0                # a milter must accept connections within this
DRAIN_TIMEOUT = 300.0               # Postfix's queue must be empty within this after a run
WARMUP = 16                         # untimed messages before every measured run
STOP_TIMEOUT = 8.0                  # SIGTERM -> SIGKILL for our own processes (C milters ignore SIGTERM for >7 s)

TRIVIAL_MILTER = REPO / "tools" / "trivial_milter.py"    # variant 6, shared with the stack self-test


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- /proc
def tree_cpu(pids) -> float:
    """CPU seconds (user+system, plus reaped children's) of the processes and their live descendants.
    A child that exits moves its time into its parent's cutime/cstime, so the sum is conserved."""
    tck = os.sysconf("SC_CLK_TCK")
    kids, seen, todo, total = procs.children(), set(), list(pids), 0
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        st = procs.stat_fields(pid)
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


# ---------------------------------------------------------------- our own processes
class MilterProcs:
    """Milters started by the benchmark: own session each, "pid starttime name" in DIR/run/bench.pids."""

    def __init__(self, root: Path):
        self.root, self.pidfile = root, procs.PidFile(root / "run" / "bench.pids")
        self.procs: dict[str, subprocess.Popen] = {}

    def stop_leftovers(self):
        """Processes of an earlier benchmark in this directory that was killed before cleaning up."""
        left = procs.stop(self.pidfile.entries(), STOP_TIMEOUT)
        if left:
            raise BenchError(f"leftover pids {left} survived SIGKILL")
        self.pidfile.remove()

    def start(self, name, cmd, socket_path, cwd: Path, env=None):
        """socket_path: a unix socket's Path, or a TCP port on 127.0.0.1."""
        if isinstance(socket_path, Path):
            socket_path.unlink(missing_ok=True)
        logf = cwd / f"{name}.log"
        proc = self.procs[name] = procs.start(cmd, logf, cwd, self.pidfile, label=name, env=env, umask=0)

        def ready():
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with status {proc.returncode}:\n{procs.tail(logf)}")
            return procs.accepts(socket_path)
        if not procs.wait_until(ready, START_TIMEOUT):
            raise BenchError(f"{name} not accepting on {socket_path} after {START_TIMEOUT:.0f}s:\n"
                             f"{procs.tail(logf)}")
        return proc.pid

    def pid(self, name):
        return self.procs[name].pid

    def stop(self, names=None):
        names = list(self.procs) if names is None else names
        entries = [(p.pid, procs.starttime(p.pid)) for p in (self.procs.get(n) for n in names) if p]
        left = procs.stop([e for e in entries if e[1]], STOP_TIMEOUT,
                          reap=[self.procs[n] for n in names if n in self.procs])
        for n in names:
            self.procs.pop(n, None)
        self.pidfile.keep_alive()
        if left:
            raise BenchError(f"pids {left} survived SIGKILL")


# ---------------------------------------------------------------- Postfix
def run_cmd(cmd, timeout=60):
    r = subprocess.run(cmd, capture_output=True, timeout=timeout, text=True)
    if r.returncode != 0:
        raise BenchError(f"{shlex.join(cmd)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def smtpd_pids(stack) -> list:
    master, out = stack.postfix_master_pid(), []
    for pid in procs.children().get(master, []):
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
        run_cmd([procs.binary("postconf"), "-c", self.conf, "-e"] + [f"{k}={v}" for k, v in settings.items()])
        self.reload()

    def reload(self):
        """Reload and wait until every smtpd of the old configuration is gone."""
        old = smtpd_pids(self.stack)
        run_cmd([procs.binary("postfix"), "-c", self.conf, "reload"])
        if not procs.wait_until(lambda: not any(procs.alive(p) for p in old), 30):
            raise BenchError(f"smtpd processes {old} still alive 30 s after postfix reload")
        if not procs.alive(self.stack.postfix_master_pid()):
            raise BenchError("Postfix master died on reload:\n" + procs.tail(self.stack.logs["postfix"]))

    def set_milters(self, milters: list[str]):
        value = ", ".join(milters)
        if value != self.current:
            self.configure(smtpd_milters=value)
            self.current = value

    def drain(self, timeout=DRAIN_TIMEOUT):
        """Wait until the queue is empty, then delete what the sink wrote (bounded disk use)."""
        if not procs.wait_until(self.stack.queue_empty, timeout, interval=0.1):
            raise BenchError(f"Postfix queue not empty {timeout:.0f}s after the run:\n"
                             + procs.tail(self.stack.logs["postfix"]))
        time.sleep(0.2)  # the sink may still be writing the last message
        for p in self.stack.delivered_dir.glob("*"):
            try:
                p.unlink()
            except OSError:
                pass


def expected_code(msg, variant) -> int:
    if variant in ATTACHMENTS_ONLY:
        return 554 if msg.kind == "virus" else 250
    return REJECT_CODE.get(variant, 550) if variant in SCANNING and msg.spam_or_virus else 250


def scrape(port) -> str:
    """A scanmilter's metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def gauge(text, metric, **labels):
    """The value of one labelled sample of a metrics page, or None when it is absent."""
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name == metric and all(f'{k}="{v}"' in rest.partition("}")[0] for k, v in labels.items()):
            return float(rest.rpartition(" ")[2])
    return None


class Failover:
    """Variant 13: one spamd member of the pool killed with SIGKILL, its children too (as a crash
    would), when half of the run's messages have their reply; the times to split the throughput
    into before and after the kill, and the member's CPU until then (its /proc entries go with it)."""

    def __init__(self, stack, victim, after):
        self.stack, self.victim, self.after = stack, victim, after
        self.lock, self.done = threading.Lock(), 0
        self.t_start = self.t_kill = self.t_end = None
        self.victim_cpu = 0.0
        self.failovers = 0       # scans scanmilter moved on to the other member (its metrics)

    def wrap(self, fn):
        def send(i):
            try:
                return fn(i)
            finally:
                with self.lock:
                    self.done += 1
                    if self.done == self.after:
                        self.kill()
        return send

    def kill(self):
        [(pid, _)] = self.stack.pids(self.victim)
        self.victim_cpu = tree_cpu([pid])
        os.killpg(pid, signal.SIGKILL)
        self.t_kill = time.perf_counter()
        log(f"  killed {self.victim} (pid {pid} and its children, SIGKILL) after {self.done} replies")

    def figures(self, n) -> dict:
        out = {"killed": self.victim, "after_replies": self.after if self.t_kill else None,
               "before_msgs_per_s": None, "after_msgs_per_s": None, "failovers": self.failovers}
        if self.t_kill:
            out["before_msgs_per_s"] = self.after / (self.t_kill - self.t_start)
            out["after_msgs_per_s"] = (n - self.after) / max(self.t_end - self.t_kill, 1e-6)
        return out


def pool_children(total) -> int:
    """spamd children of each member of variant 12's pool: the pool splits variant 3's total."""
    return max(1, total // len(POOL))


def write_rspamd_settings(stack) -> None:
    """Stack(before_start=...): the benchmark's own rspamd settings (RSPAMD_BENCH_SETTINGS)."""
    (stack.rspamd_dir / "local.d" / "settings.conf").write_text(RSPAMD_BENCH_SETTINGS)


# ---------------------------------------------------------------- the benchmark
class Bench:
    def __init__(self, args):
        self.args = args
        self.root = Path(args.dir).resolve()
        self.stack = None
        self.processes = None
        self.postfix = None
        self.milters = {}        # variant -> names of its milter processes, in smtpd_milters order
        self.sockets = {}        # milter name -> its address in Postfix's spelling (unix:PATH, inet:HOST:PORT)
        self.external = {}       # variant -> milters that are not our processes (rspamd's own), Postfix's spelling
        self.metrics_ports = {}  # scanmilter name -> its metrics port

    # ------------------------------------------------------------ set-up
    def setup(self, variants):
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "run").mkdir(exist_ok=True)
        self.processes = MilterProcs(self.root)
        self.processes.stop_leftovers()
        a = self.args
        rspamd, pool = any(v in variants for v in RSPAMD_VARIANTS), any(v in variants for v in ("12", "13"))
        self.stack = stacklib.Stack(
            self.root, smtp_port=stacklib.free_port(), with_milter=False, spamd_children=a.spamd_children,
            # clamd keeps the digests of clean content it scanned; every run sends the same corpus
            # (and 9-11 the same attachments), so with that cache a later scan would cost nothing
            clamd_settings={"DisableCache": "yes"},
            rspamd=rspamd, rspamd_milter="9" in variants, rspamd_workers=a.rspamd_workers,
            spamd_members=1 + len(POOL) if pool else 1, spamd_member_children=pool_children(a.spamd_children),
            before_start=write_rspamd_settings if rspamd else None)
        log(f"starting Postfix, clamd, spamd ({a.spamd_children} children), smtp-sink"
            + (f", {len(POOL)} more spamd ({pool_children(a.spamd_children)} children each)" if pool else "")
            + (f", rspamd ({a.rspamd_workers} workers) and its redis" if rspamd else "") + f" under {self.root}")
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
            self.start_scanmilter("scanmilter-noeng", engines=False, files=False)
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
            self.start_scanmilter("scanmilter-noeng-tcp", engines=False, tcp=True, files=False)
            self.milters["7"] = ["scanmilter-noeng-tcp"]
        if "8" in variants:
            self.start_trivial("trivial-tcp", tcp=True)
            self.milters["8"] = ["trivial-tcp"]
        if "9" in variants:
            self.milters["9"], self.external["9"] = [], [f"unix:{self.stack.rspamd_milter_socket}"]
        if "10" in variants:
            self.start_scanmilter("scanmilter-rspamd", spam_engine="rspamd")
            self.milters["10"] = ["scanmilter-rspamd"]
        if "12" in variants:
            self.start_scanmilter("scanmilter-pool", spamd=POOL)
            self.milters["12"] = ["scanmilter-pool"]
        if "13" in variants:
            self.start_scanmilter("scanmilter-failover", spamd=POOL)
            self.milters["13"] = ["scanmilter-failover"]
        if "14" in variants:
            self.start_scanmilter("scanmilter-files", engines=False, files=True)
            self.milters["14"] = ["scanmilter-files"]
        if "15" in variants:
            self.start_scanmilter("scanmilter-nofiles", engines=True, files=False)
            self.milters["15"] = ["scanmilter-nofiles"]

    def listen_address(self, name, tcp):
        """(libmilter's spelling, Postfix's spelling, what MilterProcs.start waits for)."""
        if tcp:
            port = stacklib.free_port()
            return f"inet:{port}@127.0.0.1", f"inet:127.0.0.1:{port}", port
        sock = self.root / "milters" / f"{name}.sock"
        return f"unix:{sock}", f"unix:{sock}", sock

    def start_trivial(self, name, tcp):
        listen, postfix, wait = self.listen_address(name, tcp)
        self.processes.start(name, [sys.executable, str(TRIVIAL_MILTER), listen], wait, self.root / "milters")
        self.sockets[name] = postfix

    def start_scanmilter(self, name, engines=True, tcp=False, spam_engine="spamd", spamd=("spamd",), files=True):
        """spamd: the stack's spamd members it uses (one address, or a pool of several); files:
        the attachment checks (on in the real job, off where scanmilter alone is measured)."""
        mdir = self.root / "milters"
        conf = mdir / f"{name}.toml"
        listen, postfix, wait = self.listen_address(name, tcp)
        st = self.stack
        addresses = [st.member_address(m) for m in spamd]
        self.metrics_ports[name] = stacklib.free_port()
        settings = {"milter_socket": listen, "milter_socket_mode": "0666", **st.engine_settings(),
                    "spamd_socket": addresses[0] if len(addresses) == 1 else addresses,
                    "metrics_address": f"127.0.0.1:{self.metrics_ports[name]}",
                    "clamd_enabled": engines, "spamd_enabled": engines, "spam_engine": spam_engine,
                    "files_enabled": files}
        stacklib.write_settings(conf, settings)
        env = dict(os.environ, PYTHONPATH=str(REPO / "milter"))
        self.processes.start(name, [sys.executable, "-m", "scanmilter", "serve", "-c", str(conf)], wait, mdir, env=env)
        self.sockets[name] = postfix

    def start_peers(self):
        """Debian's clamav-milter and spamass-milter, private configuration, the same clamd and spamd."""
        mdir = self.root / "milters"
        for b in ("clamav-milter", "spamass-milter"):
            procs.binary(b)  # raises if the package is missing: run WITH_PEERS=1 tools/install-deps
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
        self.processes.start("clamav-milter", [procs.binary("clamav-milter"), "-c", str(cfile)], csock, mdir)
        # no -i (Debian's default -i 127.0.0.1 would skip loopback; our mail comes from XCLIENT's outside
        # address anyway), no -u: the same spamd user handling as scanmilter (none)
        self.processes.start("spamass-milter", [procs.binary("spamass-milter"), "-p", str(ssock), "-r", "15",
                                                "-P", str(mdir / "spamass-milter.pid"), "--",
                                                "-d", "127.0.0.1", "-p", str(self.stack.spamd_port)], ssock, mdir)
        self.sockets["clamav-milter"], self.sockets["spamass-milter"] = f"unix:{csock}", f"unix:{ssock}"

    def milter_addresses(self, variant):
        return [self.sockets[n] for n in self.milters.get(variant, [])] + self.external.get(variant, [])

    def empty_scan_caches(self, variant):
        """Every run sends the same corpus: without this, scanmilter would answer the second run
        from its scan cache. A reload (SIGHUP) starts an empty cache; wait until it is done.
        rspamd keeps what its antivirus module learned in redis (nothing else of the benchmark's is
        there): emptied too."""
        if variant in RSPAMD_VARIANTS:
            if b"+OK" not in (procs.chat(self.stack.redis_socket, b"FLUSHALL\r\nQUIT\r\n") or b""):
                raise BenchError("redis did not empty its database (FLUSHALL)")
        for name in self.milters.get(variant, []):
            if not name.startswith("scanmilter"):
                continue
            logf = self.root / "milters" / f"{name}.log"
            before = logf.read_text(errors="replace").count("reloaded configuration")
            os.kill(self.processes.pid(name), signal.SIGHUP)
            if not procs.wait_until(lambda: logf.read_text(errors="replace").count("reloaded configuration") > before,
                                    START_TIMEOUT):
                raise BenchError(f"{name} did not reload:\n{procs.tail(logf)}")

    def teardown(self):
        errors = []
        if self.processes:
            try:
                self.processes.stop()
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
        """{group: [root pids]} whose CPU is measured. spamd: every spamd member of the stack (the
        idle ones cost nothing); rspamd: rspamd (its main process and workers) with its redis."""
        st = self.stack
        g = {name: [p for p, _ in st.pids(name)] for name in ("postfix", "clamd", "sink")}
        g["spamd"] = [p for m in st.members("spamd") for p, _ in st.pids(m)]
        g["rspamd"] = [p for m in stacklib.RSPAMD_SERVICES if st.rspamd for p, _ in st.pids(m)]
        g["milter"] = [self.processes.pid(n) for n in self.milters.get(variant, [])]
        return g

    def spamd_failovers(self, variant) -> float:
        """How many spamd scans the variant's scanmilter has moved on to another member so far."""
        page = scrape(self.metrics_ports[self.milters[variant][0]])
        return gauge(page, "scanmilter_member_failovers_total", engine="spamd") or 0

    def restore_member(self, name):
        """Start a killed spamd member again and wait until every scanmilter with it in its pool
        has it back in the rotation (up, circuit closed), so that later runs find the pool whole."""
        st = self.stack
        st.start_service(name, timeout=START_TIMEOUT)
        address = st.member_address(name)
        users = [n for v in ("12", "13") for n in self.milters.get(v, [])]

        def back():
            for n in users:
                page = scrape(self.metrics_ports[n])
                labels = {"engine": "spamd", "member": address}
                if gauge(page, "scanmilter_member_up", **labels) != 1 \
                        or gauge(page, "scanmilter_member_circuit_open", **labels):
                    return False
            return True
        if not procs.wait_until(back, START_TIMEOUT, interval=0.5):
            raise BenchError(f"{name} started again, but not back in the pool of {', '.join(users)} after "
                             f"{START_TIMEOUT:.0f}s")
        log(f"  {name} started again and back in the pool")

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
        if variant in DIRECT:
            scan = DirectScan(st, DIRECT[variant])
            fn = lambda i: scan(msgs[i].data, msgs[i].sender)   # noqa: E731
        else:
            pf.set_milters(self.milter_addresses(variant))
            fn = lambda i: smtp_send(st.smtp_port, payloads[i], msgs[i].sender)   # noqa: E731
        n = len(msgs)
        warm = [i for i in range(len(msgs)) if msgs[i].kind == "ham"][:WARMUP]
        run_load(warm, sessions, fn, 120)
        pf.drain()
        self.empty_scan_caches(variant)
        failover = Failover(st, FAILOVER_VICTIM, n // 2) if variant == "13" and n >= 2 else None
        groups = self.groups(variant)
        if failover:
            failover.failovers = -self.spamd_failovers("13")
        s0 = self.snapshot(groups)
        if failover:
            fn = failover.wrap(fn)
            failover.t_start = time.perf_counter()
        results, seconds = run_load(list(range(n)), sessions, fn,
                                    timeout=self.args.run_timeout)
        if failover:
            failover.t_end = time.perf_counter()
        s1 = self.snapshot(groups)
        pf.drain()
        s2 = self.snapshot(groups)
        if failover:
            failover.failovers += self.spamd_failovers("13")
        if failover and failover.t_kill:
            for s in (s1, s2):          # the killed member's CPU up to its end
                s["spamd"] += failover.victim_cpu
            self.restore_member(FAILOVER_VICTIM)
        cpu = {k: s2[k] - s0[k] for k in list(groups) + ["client"]}   # the run and Postfix's delivery after it
        # CPU used on the machine during the load by processes that are not ours (another test suite, ...):
        # the machine's user+system time minus everything we account for
        tracked = sum(s1[k] - s0[k] for k in list(groups) + ["client"])
        other = max(0.0, (s1["_system"] - s0["_system"]) - tracked)
        capacity = (s1["_time"] - s0["_time"]) * (os.cpu_count() or 1)
        if variant in DIRECT:
            cpu["postfix"] = None  # Postfix is not involved
        if not groups["milter"]:
            cpu["milter"] = None
        if not st.rspamd:
            cpu["rspamd"] = None
        codes, unexpected = {}, []
        for m, r in zip(msgs, results):
            codes[str(r["code"])] = codes.get(str(r["code"]), 0) + 1
            if r["code"] != expected_code(m, variant):
                unexpected.append(f"{m.kind} {m.mid}: {r['code']} {r['reply']}")
        rss = {name: {"hwm_kib": mem_kib(self.processes.pid(name), "VmHWM"),
                      "rss_kib": mem_kib(self.processes.pid(name), "VmRSS")}
               for name in self.milters.get(variant, [])}
        return {"messages": n, "seconds": seconds, "msgs_per_s": n / seconds, "codes": codes,
                "unexpected": len(unexpected), "unexpected_examples": unexpected[:5],
                "cpu_s": cpu, "rss": rss, "other_cpu_s": other, "other_cpu_share": other / capacity,
                "steal_share": (s1["_steal"] - s0["_steal"]) / capacity,
                "disturbed": other / capacity > self.args.disturbed_share,
                "tempfails": sum(1 for r in results if 400 <= r["code"] < 500),
                **({"failover": failover.figures(n)} if failover else {}),
                "latencies": [(m.kind, r["latency"], r["data_latency"]) for m, r in zip(msgs, results)]}

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
            return self.processes.pid(name)

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
        self.processes.stop(["scanmilter-mem-big"])

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
        self.processes.stop(["scanmilter-mem-sessions"])
        return out

