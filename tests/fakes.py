"""Fault injection: servers that stand where clamd or spamd should be and misbehave."""
import os
import socket
import threading


class BadServer:
    """Listens on a unix path or a TCP port; `mode` is "hang" (accept, read, never answer)
    or "garbage" (answer nonsense, then close)."""

    def __init__(self, mode: str, unix_path=None, port=None):
        self.mode = mode
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
        self.unix_path = unix_path
        self.conns = []
        self.accepted = 0
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            conn.settimeout(60)
            data = conn.recv(65536)
            if self.mode == "garbage" and data:
                conn.sendall(b"\x00\xffHELLO? 42 what\r\n\r\n\x1b[2J nonsense\0")
                conn.close()
            # "hang": keep the connection open and say nothing
        except OSError:
            pass

    def close(self):
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass
        if self.unix_path and os.path.exists(self.unix_path):
            os.unlink(self.unix_path)
