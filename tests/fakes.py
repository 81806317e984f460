"""Stand-ins: servers that stand where clamd or spamd should be and misbehave (fault injection);
libmilter's side of a session and engines with canned results, to drive the handler directly."""
import dataclasses
import os
import socket
import threading

import Milter

from scanmilter import config, policyfile
from scanmilter.handler import Handler, Runtime
from scanmilter.pipeline import Pipeline, scan_pool
from scanmilter.scanners import ScanResult


class Server:
    """Listens on a unix path or 127.0.0.1:port and runs `behave(server, conn)` for each
    connection in a thread of its own; what `read_all` reads is kept in `received`."""

    def __init__(self, behave, unix_path=None, port=None):
        self.behave = behave
        if unix_path:
            if os.path.exists(unix_path):
                os.unlink(unix_path)
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.bind(str(unix_path))
            os.chmod(unix_path, 0o666)
        else:
            self.sock = socket.socket()
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.path = str(unix_path) if unix_path else None
        self.conns, self.received = [], []
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            self.behave(self, conn)
        except OSError:
            pass

    def read_all(self, conn, until=None):
        """Read up to the peer's end of data (or until `until(data)`), and keep it."""
        data = b""
        conn.settimeout(5)
        while chunk := conn.recv(65536):
            data += chunk
            if until and until(data):
                break
        self.received.append(data)
        return data

    def close(self):
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)


def _hang(server, conn):
    """Accept, read, never answer: the connection stays open."""
    conn.settimeout(60)
    conn.recv(65536)


def _garbage(server, conn):
    """Answer nonsense, then close."""
    conn.settimeout(60)
    if conn.recv(65536):
        conn.sendall(b"\x00\xffHELLO? 42 what\r\n\r\n\x1b[2J nonsense\0")
    conn.close()


def BadServer(mode: str, unix_path=None, port=None) -> Server:
    """A server that misbehaves: mode "hang" or "garbage"."""
    return Server({"hang": _hang, "garbage": _garbage}[mode], unix_path=unix_path, port=port)


# ---------------------------------------------------------------- the handler without libmilter
class Ctx:
    """Records what the handler asks of libmilter."""

    def __init__(self, macros):
        self.macros, self.calls, self.reply = macros, [], None

    def setpriv(self, priv):
        self.priv = priv

    def getsymval(self, name):
        return self.macros.get(name)

    def addheader(self, name, value, idx):
        self.calls.append(("add", name, value))

    def chgheader(self, name, idx, value):
        self.calls.append(("chg", name, idx, value))

    def setreply(self, *args):
        self.reply = args

    def delrcpt(self, rcpt):
        self.calls.append(("delrcpt", rcpt))


class Engine:
    def __init__(self, name, result=None, exc=None):
        self.name, self.timeout, self.result, self.exc, self.seen = name, 1.0, result, exc, []

    def scan(self, spool):
        self.seen.append(spool.getvalue())
        if self.exc:
            raise self.exc
        return self.result


POOL = scan_pool(4)


def handler(*engines, daemon=None, **inbound):
    """A handler with canned engines; `daemon` changes daemon settings, `inbound` settings of
    the default [inbound]."""
    cfg = config.parse(config.DAEMON_SETTINGS, daemon or {}, "test")
    pol = policyfile.load("")
    pol = dataclasses.replace(pol, directions={**pol.directions, "inbound": {**pol.directions["inbound"], **inbound}})
    h = Handler(Runtime(cfg, pol, Pipeline(list(engines), POOL)))
    h._setctx(Ctx({"i": "4XQID1", "{daemon_name}": "smtpd"}))
    h._protocol, h._actions = 0, Milter.ADDHDRS | Milter.CHGHDRS
    return h


def feed(h, headers, body=b"hello\r\n", sender="<a@example.org>", rcpts=("<u@example.com>",)):
    assert h.connect("client.example", 2, ("192.0.2.1", 25)) == Milter.CONTINUE
    h.envfrom(sender)
    for r in rcpts:
        h.envrcpt(r)
    for name, value in headers:
        h.header_bytes(name, value)
    h.eoh()
    h.body(body)
    return h.eom()


HAM = ScanResult("spamd", "clean", score=0.1, required=5.0, rules=("NO_RELAYS",))
CLEAN = ScanResult("clamd", "clean")


# ---------------------------------------------------------------- an SMTP server that keeps what it is sent
class Sink(Server):
    """An SMTP server on 127.0.0.1 (a free port) that keeps each message it accepts in `messages`:
    {"mail": the MAIL command, "rcpt": the recipients' addresses, "rcpt_lines": the RCPT commands,
    "data": the content, dots unstuffed}. It offers `extensions` in its EHLO answer; `gate()` runs
    before the final 250 of a message, so that a test can hold a delivery open. Its address:
    `address` (host, port), `port`, or `setting` as a release address setting."""

    def __init__(self, gate=None, extensions=("8BITMIME", "SMTPUTF8")):
        self.gate, self.extensions, self.messages = gate, [e.encode() for e in extensions], []
        # through the attribute, so that a test can wrap `_session`
        super().__init__(lambda server, conn: server._session(conn), port=0)
        self.address = self.sock.getsockname()
        self.port = self.address[1]
        self.setting = f"inet:127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        return len(self.conns)

    def _session(self, conn):
        with conn, conn.makefile("rb") as f:
            conn.sendall(b"220 sink\r\n")
            envelope = {"mail": b"", "rcpt": [], "rcpt_lines": []}
            for line in f:
                verb = line[:4].upper()
                if verb == b"EHLO":
                    lines = [b"sink", *self.extensions]
                    conn.sendall(b"".join(b"250-" + x + b"\r\n" for x in lines[:-1]) + b"250 " + lines[-1] + b"\r\n")
                elif verb == b"MAIL":
                    envelope = {"mail": line.rstrip(), "rcpt": [], "rcpt_lines": []}
                    conn.sendall(b"250 ok\r\n")
                elif verb == b"RCPT":
                    envelope["rcpt"].append(line.partition(b"<")[2].partition(b">")[0].decode("utf-8", "surrogateescape"))
                    envelope["rcpt_lines"].append(line.rstrip())
                    conn.sendall(b"250 ok\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go\r\n")
                    data = []
                    for body_line in f:
                        if body_line == b".\r\n":
                            break
                        data.append(body_line[1:] if body_line.startswith(b".") else body_line)
                    if self.gate:
                        self.gate()
                    self.messages.append({**envelope, "data": b"".join(data)})
                    conn.sendall(b"250 queued\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 ok\r\n" if verb in (b"RSET", b"NOOP", b"HELO") else b"502 no\r\n")
