"""A private PostgreSQL for the tests, the demo and the benchmark: Debian's server binaries, a
data directory of its own, a unix socket in that directory and, on request, 127.0.0.1 on a free
port. Nothing of the packaged cluster is touched (it stays stopped).

PostgreSQL refuses to run as root, so as root every server command runs as the `postgres` user
(created by Debian's package); as any other user, as that user. Local (unix socket) connections
are trusted; TCP connections need a password (scram-sha-256), so a test can prove that one is sent.

    server = PgServer("/tmp/x/pg", tcp=True)
    server.start()
    dsn = server.create_database("quarantine")          # host=/tmp/x/pg dbname=quarantine user=postgres
    server.create_role("scanmilter", "secret")
    server.stop()
"""
from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
from pathlib import Path

import procs

START_TIMEOUT = 60      # seconds pg_ctl waits for the server to accept connections
OWNER = "postgres"      # the server's system user (and its superuser role)
NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")   # database and role names this helper creates


class PgError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bindir() -> Path:
    """Debian's server binaries: /usr/lib/postgresql/<newest version>/bin."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parent.parent.name))
    if not found:
        raise PgError("PostgreSQL's server is not installed (apt install postgresql)")
    return Path(found[-1]).parent


class PgServer:
    def __init__(self, root, tcp: bool = False):
        self.root = Path(root)
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.tcp = tcp
        self.port = free_port() if tcp else 5432
        self.bin = bindir()

    # -------------------------------------------------------------- running as postgres
    def _as_owner(self, argv: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return [procs.binary("runuser"), "-u", OWNER, "--", *argv]
        return argv

    def _run(self, argv: list[str], check=True, timeout=START_TIMEOUT + 30) -> subprocess.CompletedProcess:
        r = subprocess.run(self._as_owner(argv), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode:
            raise PgError(f"{' '.join(argv[:2])} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-2000:]}"
                          f"\n--- {self.log}:\n{self.log_tail()}")
        return r

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -------------------------------------------------------------- life cycle
    def init(self) -> None:
        """Create the data directory (once): local connections trusted, TCP by password."""
        if (self.data / "PG_VERSION").exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            owner = pwd.getpwnam(OWNER)
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            # the parents must let postgres through; the scratch directories are 0700
            parent = self.root.parent
            parent.chmod(parent.stat().st_mode | 0o711)
        self.root.chmod(0o700)
        self._run([str(self.bin / "initdb"), "-D", str(self.data), "--auth-local=trust",
                   "--auth-host=scram-sha-256", "-U", OWNER, "--no-sync", "-E", "UTF8", "--locale=C"])

    def start(self) -> None:
        self.init()
        listen = f"-c listen_addresses=127.0.0.1 -p {self.port}" if self.tcp else "-c listen_addresses=''"
        # fsync off: a test server that loses its data in a machine crash loses nothing of value
        options = f"-k {self.root} {listen} -c fsync=off -c max_connections=200"
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.log),
                   "-w", "-t", str(START_TIMEOUT), "start"])

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (fast: sessions are ended, as at a real restart; immediate: as at a crash)."""
        if self.running():
            self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def running(self) -> bool:
        return self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "status"], check=False).returncode == 0

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # -------------------------------------------------------------- clients
    def dsn(self, dbname: str = "postgres", user: str = OWNER, password: str | None = None) -> str:
        """A libpq connection string: over the unix socket, or over TCP when a password is given."""
        if password is not None:
            if not self.tcp:
                raise PgError("a password is only checked over TCP: PgServer(..., tcp=True)")
            return f"host=127.0.0.1 port={self.port} dbname={dbname} user={user} password={password}"
        return f"host={self.root} port={self.port} dbname={dbname} user={user}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL as the superuser over the socket; the output, unaligned and without headers."""
        psql = self.bin / "psql" if (self.bin / "psql").exists() else procs.binary("psql")
        r = self._run([str(psql), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", str(self.root), "-p", str(self.port),
                       "-U", OWNER, "-d", dbname, "-c", sql])
        return r.stdout.strip()

    def create_database(self, name: str, owner: str = OWNER) -> str:
        """A new, empty database (dropped first if it exists); its DSN for the superuser."""
        if not NAME.fullmatch(name) or not NAME.fullmatch(owner):
            raise PgError(f"not a plain name: {name!r} / {owner!r}")
        self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self.psql(f"CREATE DATABASE {name} OWNER {owner}")
        return self.dsn(name)

    def create_role(self, name: str, password: str) -> None:
        if not NAME.fullmatch(name) or "'" in password:
            raise PgError(f"not a plain role name or password: {name!r}")
        self.psql(f"DROP ROLE IF EXISTS {name}")
        self.psql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
