"""db.py: the connection string and its secrecy, the schema's versions and migrations against a
real PostgreSQL (tools/pg.py, started once for the session)."""
import os
import socket
import threading
from types import SimpleNamespace

import pytest

from scanmilter import config, db

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("dsn, hidden", [
    ("host=db dbname=q user=s password=hunter2", "hunter2"),
    ("host=db password='two words' user=s", "two words"),
    ("PASSWORD = hunter2 host=db", "hunter2"),
    ("postgresql://s:hunter2@db:5432/q", "hunter2"),
    ("postgresql://db/q?user=s&password=hunter2&sslmode=require", "hunter2"),
])
def test_the_password_never_shows(dsn, hidden):
    shown = db.redact_dsn(dsn)
    assert hidden not in shown and "****" in shown
    cfg = config.parse(config.DAEMON_SETTINGS, {"database_dsn": dsn}, "t")
    assert hidden not in config.render(cfg)


def test_the_dsn_file_wins_and_must_be_private(tmp_path):
    f = tmp_path / "dsn"
    f.write_text("host=/run/pg dbname=q\n")
    f.chmod(0o640)
    cfg = SimpleNamespace(database_dsn="host=other", database_dsn_file=str(f))
    assert db.read_dsn(cfg) == "host=/run/pg dbname=q"
    f.chmod(0o644)
    with pytest.raises(db.DatabaseError, match="readable by every user"):
        db.read_dsn(cfg)
    with pytest.raises(db.DatabaseError, match="cannot read"):
        db.read_dsn(SimpleNamespace(database_dsn="", database_dsn_file=str(tmp_path / "none")))
    f.write_bytes(b"host=/run/pg password=\xff\n")
    f.chmod(0o600)
    with pytest.raises(db.DatabaseError, match="not UTF-8 text"):
        db.read_dsn(cfg)
    f.write_text("host=/run/pg\n")
    f.chmod(0o602)                  # writable by others: anyone could point the daemon elsewhere
    with pytest.raises(db.DatabaseError, match="writable by every user"):
        db.read_dsn(cfg)
    with pytest.raises(db.DatabaseError, match="no database"):
        db.read_dsn(SimpleNamespace(database_dsn="", database_dsn_file=""))


def test_shipped_migrations_are_numbered_without_gaps():
    steps = db.migrations()
    assert [s.version for s in steps] == list(range(1, len(steps) + 1))


def test_a_gap_in_the_migrations_is_refused(tmp_path):
    (tmp_path / "0001_a.sql").write_text("SELECT 1")
    (tmp_path / "0003_c.sql").write_text("SELECT 1")
    with pytest.raises(db.DatabaseError, match="0003_c where 0002 was expected"):
        db.migrations(tmp_path)


def steps(directory, n):
    directory.mkdir(exist_ok=True)
    for i in range(1, n + 1):
        (directory / f"{i:04d}_t{i}.sql").write_text(f"CREATE TABLE t{i} (x int)")
    return directory


def test_migrate_applies_each_step_once_and_the_check_says_which_way(tmp_path, database):
    import psycopg
    two = steps(tmp_path / "two", 2)
    with psycopg.connect(database, autocommit=True) as conn:
        assert db.schema_version(conn) == 0
        with pytest.raises(db.SchemaMismatch, match="version 0, this scanmilter needs 2.*quarantine migrate"):
            db.check_schema(conn, two)
        assert [s.version for s in db.migrate(conn, two)] == [1, 2]
        assert db.migrate(conn, two) == []
        assert db.check_schema(conn, two) == 2
        row = conn.execute("SELECT applied_by FROM scanmilter_schema WHERE version = 2").fetchone()
        assert row[0] == socket.getfqdn()
        with pytest.raises(db.SchemaMismatch, match="version 2, newer than this scanmilter knows \\(1\\)"):
            db.check_schema(conn, steps(tmp_path / "one", 1))


def test_two_hosts_migrating_at_once_apply_each_step_once(tmp_path, database):
    import psycopg
    many = steps(tmp_path / "many", 6)
    done, errors = [], []

    def host():
        try:
            with psycopg.connect(database, autocommit=True) as conn:
                done.append([s.version for s in db.migrate(conn, many)])
        except Exception as e:      # the assertion below reports it
            errors.append(e)
    threads = [threading.Thread(target=host) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(v for d in done for v in d) == [1, 2, 3, 4, 5, 6]


def test_a_pool_error_names_the_server_but_not_the_password(postgres):
    postgres.create_role("pw_user", "right")
    pool = db.Database(postgres.dsn("postgres", "pw_user", "wrong-secret"), connect_timeout=2)
    try:
        with pytest.raises(db.DatabaseError) as e:
            pool.ping()
        assert "wrong-secret" not in str(e.value) and "****" in str(e.value)
    finally:
        pool.close()
    good = db.Database(postgres.dsn("postgres", "pw_user", "right"), connect_timeout=5)
    try:
        assert good.ping() < 5
    finally:
        good.close()


def test_a_database_that_is_down_is_an_error_in_time(tmp_path):
    sock = tmp_path / "nothing"
    sock.mkdir()
    pool = db.Database(f"host={sock} dbname=x user=x", connect_timeout=1)
    try:
        with pytest.raises(db.DatabaseError, match="database host="):
            pool.ping()
    finally:
        pool.close()
    assert not os.listdir(sock)
