"""The MTA side of the milter protocol (version 6), enough to feed one message to a milter the way
Postfix does and collect its answer: used by `scanmilter selftest`, and by `postfix-check` to see
that a milter answers the negotiation."""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

VERSION = 6
ALL_ACTIONS = 0x1FF
ALL_STEPS = 0x1FFFFF          # every protocol step and no-reply option an MTA can offer
CHUNK = 65535                 # largest body chunk in one packet

# protocol flags a milter may set: skip a step (NO*) or send no reply to it (NR_*)
P_NOCONNECT, P_NOHELO, P_NOMAIL, P_NORCPT, P_NOBODY, P_NOHDRS, P_NOEOH = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40
P_NR_HDR, P_NOUNKNOWN, P_NODATA, P_SKIP, P_RCPT_REJ = 0x80, 0x100, 0x200, 0x400, 0x800
P_NR_CONN, P_NR_HELO, P_NR_MAIL, P_NR_RCPT, P_NR_DATA = 0x1000, 0x2000, 0x4000, 0x8000, 0x10000
P_NR_UNKN, P_NR_EOH, P_NR_BODY, P_HDR_LEADSPC = 0x20000, 0x40000, 0x80000, 0x100000

FINAL = {b"a": "accept", b"c": "continue", b"r": "reject", b"t": "tempfail", b"d": "discard", b"y": "reply"}


class MilterError(Exception):
    pass


@dataclass
class Answer:
    action: str                                   # accept, continue, reject, tempfail, discard, reply
    reply: str = ""                               # the text of a SMFIR_REPLYCODE, e.g. "550 5.7.1 ..."
    added: list[tuple[str, str]] = field(default_factory=list)
    changed: list[tuple[int, str, str]] = field(default_factory=list)     # (index, name, value)
    removed_rcpts: list[str] = field(default_factory=list)
    stage: str = "eom"


class Session:
    def __init__(self, address: str, timeout: float = 60.0):
        """address: "unix:/path", or "inet:PORT@HOST" (libmilter's spelling)."""
        kind, _, where = address.partition(":")
        if kind in ("unix", "local"):
            self.sock = socket.socket(socket.AF_UNIX)
            target = where
        elif kind == "inet":
            port, _, host = where.partition("@")
            self.sock = socket.socket(socket.AF_INET)
            target = (host or "127.0.0.1", int(port))
        else:
            raise MilterError(f"unsupported milter address {address!r}")
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(target)
        except OSError as e:
            self.sock.close()
            raise MilterError(f"cannot connect to {address}: {e.strerror or e}") from None
        self.protocol = 0

    def close(self) -> None:
        try:
            self._send(b"Q")
        except OSError:
            pass
        self.sock.close()

    def _send(self, cmd: bytes, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack("!I", len(data) + 1) + cmd + data)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise MilterError("the milter closed the connection")
            buf += chunk
        return buf

    def _recv(self) -> tuple[bytes, bytes]:
        (length,) = struct.unpack("!I", self._recv_exact(4))
        if not 1 <= length <= 1 << 20:
            raise MilterError(f"bad packet length {length}")
        packet = self._recv_exact(length)
        return packet[:1], packet[1:]

    def negotiate(self) -> None:
        self._send(b"O", struct.pack("!III", VERSION, ALL_ACTIONS, ALL_STEPS))
        cmd, data = self._recv()
        if cmd != b"O" or len(data) < 12:
            raise MilterError(f"unexpected negotiation reply {cmd!r}")
        _, _, self.protocol = struct.unpack("!III", data[:12])

    def macros(self, stage: bytes, values: dict[str, str]) -> None:
        self._send(b"D", stage + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in values.items()))

    def _step(self, cmd: bytes, data: bytes, skip: int, noreply: int, stage: str) -> Answer | None:
        """Send one step; None to go on, or the milter's final answer if it ended the message here."""
        if self.protocol & skip:
            return None
        self._send(cmd, data)
        if self.protocol & noreply:
            return None
        return self._answer(stage, final_only=False)

    def _answer(self, stage: str, final_only: bool = True) -> Answer | None:
        answer = Answer("continue", stage=stage)
        while True:
            cmd, data = self._recv()
            if cmd == b"h":
                name, value = data.rstrip(b"\0").split(b"\0", 1)
                answer.added.append((name.decode(), value.decode()))
            elif cmd == b"m":
                (index,) = struct.unpack("!I", data[:4])
                name, value = data[4:].rstrip(b"\0").split(b"\0", 1) if b"\0" in data[4:].rstrip(b"\0") \
                    else (data[4:].rstrip(b"\0"), b"")
                answer.changed.append((index, name.decode(), value.decode()))
            elif cmd == b"-":
                answer.removed_rcpts.append(data.rstrip(b"\0").decode())
            elif cmd == b"p":
                continue                       # progress: the milter is still working
            elif cmd in FINAL:
                answer.action = FINAL[cmd]
                if cmd == b"y":
                    answer.reply = data.rstrip(b"\0").decode("utf-8", "replace")
                if cmd == b"c" and not final_only:
                    return None
                return answer
            else:
                continue                       # other modifications do not matter here

    def message(self, client_ip: str, helo: str, sender: str, recipients: list[str],
                headers: list[tuple[str, str]], body: bytes, macros: dict[str, str] | None = None,
                connect_macros: dict[str, str] | None = None) -> Answer:
        """One SMTP session with one message, as Postfix would present it. connect_macros: more
        macros (name: value, braces included) sent with the connect stage."""
        macros = macros or {}
        self.negotiate()
        self.macros(b"C", {"j": "selftest.localhost", "{daemon_name}": macros.get("daemon_name", "smtpd"),
                           "{client_addr}": client_ip, **(connect_macros or {})})
        family, port = (b"6" if ":" in client_ip else b"4"), struct.pack("!H", 25)
        lead = " " if self.protocol & P_HDR_LEADSPC else ""
        steps = [
            (b"C", b"client.selftest\0" + family + port + client_ip.encode() + b"\0", P_NOCONNECT, P_NR_CONN, "connect"),
            (b"H", helo.encode() + b"\0", P_NOHELO, P_NR_HELO, "helo"),
            (b"M", f"<{sender}>".encode() + b"\0", P_NOMAIL, P_NR_MAIL, "mail"),
        ]
        for stage_cmd, data, skip, noreply, stage in steps:
            if stage_cmd == b"M":
                self.macros(b"M", {"i": macros.get("queue_id", "SELFTEST"),
                                   "{auth_authen}": macros.get("auth_authen", "")})
            answer = self._step(stage_cmd, data, skip, noreply, stage)
            if answer:
                return answer
        for rcpt in recipients:
            answer = self._step(b"R", f"<{rcpt}>".encode() + b"\0", P_NORCPT, P_NR_RCPT, "rcpt")
            if answer:
                return answer
        answer = self._step(b"T", b"", P_NODATA, P_NR_DATA, "data")
        if answer:
            return answer
        for name, value in headers:
            answer = self._step(b"L", name.encode() + b"\0" + (lead + value).encode() + b"\0", P_NOHDRS, P_NR_HDR,
                                "header")
            if answer:
                return answer
        answer = self._step(b"N", b"", P_NOEOH, P_NR_EOH, "eoh")
        if answer:
            return answer
        for i in range(0, len(body), CHUNK):
            answer = self._step(b"B", body[i:i + CHUNK], P_NOBODY, P_NR_BODY, "body")
            if answer:
                return answer
        self.macros(b"E", {"i": macros.get("queue_id", "SELFTEST")})
        self._send(b"E")
        return self._answer("eom")


def connect(address: str, timeout: float) -> socket.socket:
    """A socket connected to a milter address ("unix:/path", "local:/path" or "inet:PORT@HOST"):
    unlike Session, a failed connection raises the OSError itself, errno kept, so that a caller
    can tell "permission denied" from "nobody listens" (postfix-check)."""
    kind, _, where = address.partition(":")
    if kind in ("unix", "local"):
        sock, target = socket.socket(socket.AF_UNIX), where
    elif kind in ("inet", "inet6"):
        port, _, host = where.partition("@")
        sock = socket.socket(socket.AF_INET6 if kind == "inet6" else socket.AF_INET)
        target = (host or ("::1" if kind == "inet6" else "127.0.0.1"), int(port))
    else:
        raise MilterError(f"unsupported milter address {address!r}")
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    return sock


class _Connected(Session):
    """A Session on a socket connected elsewhere (see `connect`)."""

    def __init__(self, sock: socket.socket):
        self.sock, self.protocol = sock, 0


def negotiate_on(sock: socket.socket) -> int:
    """Negotiate on a connected socket as Postfix opens a session, then quit and close it: proof
    that a milter answers there. Returns the protocol flags the milter asked for; raises
    MilterError for an answer that is not a milter's, OSError (TimeoutError) for none."""
    session = _Connected(sock)
    try:
        session.negotiate()
        return session.protocol
    finally:
        session.close()
