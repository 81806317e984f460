"""PostgreSQL, shared by every host of a site: the connection pool and the schema's versions.

The quarantine (quarantine_backend = "postgresql") and the shared lists keep their tables in one
database named by `database_dsn` or, better, `database_dsn_file` (a file readable by scanmilter
only: the password never appears in the settings printout, a log line or `ps`).

The schema is versioned: schema/NNNN_name.sql are applied in order by `scanmilter quarantine
migrate`, each in a transaction of its own, under an advisory lock so that two hosts migrating
at once apply each step once. Table scanmilter_schema records what was applied, when and from
which host. A daemon checks the version at start-up and refuses a database that is behind
(migrate first) or ahead (this host runs an older scanmilter) with a message that says which.

psycopg (3) is imported only when a database is used: a site without one needs none of it.
"""
from __future__ import annotations

import contextlib
import logging
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from .privatefile import PrivateFileError, first_line

SCHEMA_DIR = Path(__file__).resolve().parent / "schema"
MIGRATION_LOCK = 0x5CA7_0001      # pg_advisory_xact_lock key: one migrating host at a time
_FILE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


class DatabaseError(Exception):
    """The database cannot be reached or refused what was asked; the text is for the operator."""


class SchemaMismatch(DatabaseError):
    pass


# ------------------------------------------------------------------ the connection string
_URI_PASSWORD = re.compile(r"(://[^:/@?#]*:)[^@/?#]*(@)")
_KV_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def redact_dsn(dsn: str) -> str:
    """The connection string with its password (URI or key=value form) replaced by ****."""
    dsn = _URI_PASSWORD.sub(r"\1****\2", dsn)
    dsn = _QUERY_PASSWORD.sub(r"\1****", dsn)
    return _KV_PASSWORD.sub(r"\1****", dsn)


def read_dsn(cfg) -> str:
    """The connection string of the settings: database_dsn_file's first line, or database_dsn.
    DatabaseError when neither is set or the file cannot be read, or is readable by others."""
    if cfg.database_dsn_file:
        try:
            return first_line(cfg.database_dsn_file)
        except PrivateFileError as e:
            raise DatabaseError(f"database_dsn_file {cfg.database_dsn_file}: {e}") from None
    if cfg.database_dsn:
        return cfg.database_dsn
    raise DatabaseError("no database: set database_dsn_file (or database_dsn)")


# ------------------------------------------------------------------ schema versions
@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations(directory: Path = SCHEMA_DIR) -> list[Migration]:
    """The schema's steps, in order. Numbers run 1, 2, 3... without a gap or a repeat."""
    found = []
    for path in sorted(Path(directory).glob("*.sql")):
        m = _FILE.fullmatch(path.name)
        if not m:
            raise DatabaseError(f"{path}: a migration is named NNNN_name.sql")
        found.append(Migration(int(m.group(1)), m.group(2), path.read_text(encoding="utf-8")))
    for expected, step in enumerate(found, 1):
        if step.version != expected:
            raise DatabaseError(f"schema step {step.version:04d}_{step.name} where {expected:04d} was expected")
    return found


_SCHEMA_TABLE = """CREATE TABLE IF NOT EXISTS scanmilter_schema (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    applied_by text NOT NULL
)"""


def schema_version(conn) -> int:
    """The newest step applied to the database; 0 for a database scanmilter never used."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('scanmilter_schema') IS NOT NULL")
        if not cur.fetchone()[0]:
            return 0
        cur.execute("SELECT coalesce(max(version), 0) FROM scanmilter_schema")
        return cur.fetchone()[0]


def migrate(conn, directory: Path = SCHEMA_DIR) -> list[Migration]:
    """Apply the steps the database lacks, each in a transaction of its own; returns them. Safe
    from several hosts at once: the advisory lock orders them, and the version is read under it."""
    applied = []
    for step in migrations(directory):
        with conn.transaction():
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                cur.execute(_SCHEMA_TABLE)
            if schema_version(conn) >= step.version:
                continue
            with conn.cursor() as cur:
                cur.execute(step.sql)
                cur.execute("INSERT INTO scanmilter_schema (version, name, applied_by) VALUES (%s, %s, %s)",
                            (step.version, step.name, socket.getfqdn()))
            applied.append(step)
    return applied


def check_schema(conn, directory: Path = SCHEMA_DIR) -> int:
    """The version, when it is the one this scanmilter was built for; SchemaMismatch otherwise."""
    have, want = schema_version(conn), len(migrations(directory))
    if have < want:
        raise SchemaMismatch(f"the database schema is at version {have}, this scanmilter needs {want}: "
                             "run `scanmilter quarantine migrate` (once, from any host)")
    if have > want:
        raise SchemaMismatch(f"the database schema is at version {have}, newer than this scanmilter knows "
                             f"({want}): another host runs a newer scanmilter; upgrade this one")
    return have


# ------------------------------------------------------------------ connections
def connect(dsn: str, connect_timeout: float = 5.0):
    """One connection of its own, outside any pool, in autocommit: for `migrate`, whose steps are
    transactions of their own. DatabaseError, without the password, when it cannot be made."""
    psycopg, _ = _psycopg()
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=max(1, int(round(connect_timeout))))
    except psycopg.Error as e:
        raise DatabaseError(_described(dsn, e)) from None


def apply_migrations(conn) -> tuple[list[Migration], int]:
    """migrate(conn) and the version it leaves; psycopg's errors as DatabaseError without the password."""
    psycopg, _ = _psycopg()
    try:
        return migrate(conn), schema_version(conn)
    except psycopg.Error as e:
        raise DatabaseError(_described(conn.info.dsn, e)) from None


def _described(dsn: str, error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"database {redact_dsn(dsn)}: {redact_dsn(text)}"


def _psycopg():
    try:
        import psycopg
        import psycopg_pool
    except ImportError:
        raise DatabaseError("PostgreSQL needs psycopg 3 and psycopg_pool "
                            "(pip install 'scanmilter[postgresql]', or Debian's python3-psycopg)") from None
    return psycopg, psycopg_pool


class Database:
    """A pool of connections to one database. The pool reconnects by itself: a connection that
    broke (a restarted server) is replaced when it is next asked for. Errors of psycopg come out
    as DatabaseError, with the password never in their text."""

    def __init__(self, dsn: str, pool_size: int = 4, connect_timeout: float = 5.0,
                 statement_timeout: float = 10.0, name: str = "scanmilter"):
        psycopg, psycopg_pool = _psycopg()
        # the pool warns of every failed attempt to connect, raw on stderr, again and again while the
        # server is down; the pool's users log each change of state once, in scanmilter's own format
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
        self._errors = (psycopg.Error, psycopg_pool.PoolTimeout)
        self.redacted = redact_dsn(dsn)
        self.connect_timeout = connect_timeout
        self.pool = psycopg_pool.ConnectionPool(
            dsn, min_size=1, max_size=max(1, pool_size), timeout=connect_timeout, open=False, name=name,
            # give up on a dead server quickly; the pool keeps trying in the background
            reconnect_timeout=max(connect_timeout, 1.0),
            check=psycopg_pool.ConnectionPool.check_connection,
            kwargs={"connect_timeout": max(1, int(round(connect_timeout))), "application_name": name,
                    "options": f"-c statement_timeout={int(statement_timeout * 1000)}"})
        # opening does not wait: a host whose database is down still starts (and tempfails or
        # falls back, as quarantine_fallback says) instead of failing to boot
        self.pool.open(wait=False)

    @classmethod
    def from_settings(cls, cfg, name: str = "scanmilter") -> "Database":
        return cls(read_dsn(cfg), cfg.database_pool_size, cfg.database_connect_timeout,
                   cfg.database_statement_timeout, name)

    @contextlib.contextmanager
    def connection(self):
        """A connection from the pool, in a transaction committed when the block ends normally."""
        try:
            with self.pool.connection(timeout=self.connect_timeout) as conn:
                yield conn
        except self._errors as e:
            raise DatabaseError(self.describe(e)) from None

    def describe(self, error: Exception) -> str:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"database {self.redacted}: {redact_dsn(text)}"

    def ping(self) -> float:
        """Round-trip time of a trivial query, in seconds; DatabaseError when down."""
        import time
        start = time.monotonic()
        with self.connection() as conn:
            conn.execute("SELECT 1")
        return time.monotonic() - start

    def close(self) -> None:
        self.pool.close(timeout=self.connect_timeout)
