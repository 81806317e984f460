"""Fault injection: servers that stand where clamd or spamd should be and misbehave."""
import os
import socket
import threading


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
