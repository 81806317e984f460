"""The benchmark's load generator: SMTP sessions timed per message, the scanners driven directly
(variants 5 and 11, through scanmilter's own engine clients), and a thread pool that runs either
over a corpus.

Needs tools/ and milter/ on sys.path (bench/run.py puts them there).
"""
from __future__ import annotations

import re
import socket
import threading
import time

from scanmilter import config
from scanmilter.message import Spool
from scanmilter.scanners import ERROR, FOUND, Origin, Submission, clamd, rspamd, spamd

OUTSIDE_ADDR = "203.0.113.25"       # XCLIENT: every message is inbound from an outside host
SENDER, RECIPIENT = "alice@outside.test", "bob@example.com"
REJECT_LEVEL = 15.0                 # scanmilter's default reject_level, spamass-milter -r 15
SPAMD_SIZE_LIMIT = 512 * 1024       # scanmilter's spamd_size_limit (spamc skips over 500 KB too)
CLAMD_SIZE_LIMIT = 25 * 1024 * 1024
RSPAMD_SIZE_LIMIT = 25 * 1024 * 1024   # scanmilter's rspamd_size_limit
CLIENT_NAME, HELO, OUR_HOSTNAME = "mail.outside.test", "client.bench.test", "scanmilter.test"
SOCKET_TIMEOUT = 120.0              # per socket operation of the client


class BenchError(RuntimeError):
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
        s.sendall(f"EHLO {HELO}\r\n".encode())
        _expect(f, 250, "ehlo")
        s.sendall(f"XCLIENT ADDR={client_addr} NAME={CLIENT_NAME}\r\n".encode())
        _expect(f, 220, "xclient")
        s.sendall(f"EHLO {HELO}\r\n".encode())
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


# ---------------------------------------------------------------- clamd + spamd (or rspamd) directly
def received_header() -> bytes:
    """A Received line like the one Postfix writes for this hop, so that variants 5 and 11 scan
    about the bytes the milters' engines see."""
    return (f"Received: from {CLIENT_NAME} ({CLIENT_NAME} [{OUTSIDE_ADDR}])\r\n"
            f"\tby {OUR_HOSTNAME} (Postfix) with ESMTP id 4ABCDEF0123\r\n"
            f"\tfor <{RECIPIENT}>; {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n").encode()


class DirectScan:
    """clamd and the spam engine (spamd, or rspamd's normal worker) in parallel for one message, as
    scanmilter does, through scanmilter's own engine clients (spamd skips what is over its size
    limit, as spamc does); 550 when either would reject. rspamd is told the client, HELO and
    envelope as scanmilter tells it (with Settings-ID: inbound)."""

    def __init__(self, stack, spam_engine: str = "spamd"):
        settings = {
            "clamd_socket": f"unix:{stack.clamd_socket}", "spamd_socket": f"inet:127.0.0.1:{stack.spamd_port}",
            "clamd_connect_timeout": SOCKET_TIMEOUT, "clamd_timeout": SOCKET_TIMEOUT,
            "spamd_connect_timeout": SOCKET_TIMEOUT, "spamd_timeout": SOCKET_TIMEOUT,
            "clamd_size_limit": CLAMD_SIZE_LIMIT, "spamd_size_limit": SPAMD_SIZE_LIMIT,
            "spamd_oversize_action": "skip"}
        if spam_engine == "rspamd":
            settings.update({"rspamd_socket": f"unix:{stack.rspamd_socket}", "rspamd_connect_timeout": SOCKET_TIMEOUT,
                             "rspamd_timeout": SOCKET_TIMEOUT, "rspamd_size_limit": RSPAMD_SIZE_LIMIT})
        cfg = config.parse(config.DAEMON_SETTINGS, settings, "bench")
        self.clamd = clamd.from_settings(cfg)
        self.spam = rspamd.from_settings(cfg) if spam_engine == "rspamd" else spamd.from_settings(cfg)
        self.told = spam_engine == "rspamd"

    def __call__(self, data: bytes, sender: str = SENDER) -> dict:
        data = received_header() + data
        spool = Spool(memory_limit=len(data), size_limit=len(data))
        spool.write(data)
        scanned = spool
        if self.told:
            scanned = Submission(spool, Origin(client_address=OUTSIDE_ADDR, client_name=CLIENT_NAME, helo=HELO,
                                               hostname=OUR_HOSTNAME, sender=sender, recipients=(RECIPIENT,),
                                               direction="inbound"))
        t0 = time.perf_counter()
        virus = {}
        t = threading.Thread(target=lambda: virus.update(result=self.clamd.scan(spool)), daemon=True)
        t.start()
        spam = self.spam.scan(scanned)
        t.join(SOCKET_TIMEOUT)
        lat = time.perf_counter() - t0
        if "result" not in virus:
            raise ConnectionError("clamd: no result")
        for result in (virus["result"], spam):
            if result.outcome == ERROR:
                raise ConnectionError(f"{result.engine}: {result.detail}")
        found = virus["result"].outcome == FOUND or bool(spam.viruses)
        score = spam.score or 0.0          # None: skipped for its size
        code = 550 if found or score >= REJECT_LEVEL else 250
        reply = f"clamd {virus['result'].outcome} {','.join(virus['result'].viruses)}; score {score}"
        return {"code": code, "reply": reply, "latency": lat, "data_latency": lat}


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
