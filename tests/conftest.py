import logging
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "milter"))
sys.path.insert(0, str(ROOT / "tools"))

_SCRATCH: list[str] = []


def scratch(prefix: str) -> str:
    """A directory for a test stack under $TMPDIR (mkdtemp: its parents are world-searchable,
    which Postfix's and spamd's users need). Removed at the end of a session that passed; kept,
    with every log in it, when something failed."""
    path = tempfile.mkdtemp(prefix=prefix)
    _SCRATCH.append(path)
    return path


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0:
        for path in _SCRATCH:
            shutil.rmtree(path, ignore_errors=True)


def new_stack(name: str, **settings):
    """A tools/stack.py Stack, not started, in a scratch directory of its own with Postfix on a
    free port; `settings` are Stack's keyword arguments. Start it with `with new_stack(...) as stack:`."""
    import stack as stacklib     # imported here: the unit tests do without the stack
    return stacklib.Stack(scratch(f"scanmilter-{name}-"), smtp_port=stacklib.free_port(), **settings)


@pytest.fixture(scope="module")
def stack_with(request):
    """stack_with(**settings): a started Stack (see new_stack) for the test module; every stack it
    started is stopped when the module's tests are done. A module's own `stack` fixture is

        @pytest.fixture(scope="module")
        def stack(stack_with):
            return stack_with(policy_text=POLICY)
    """
    started = []

    def start(**settings):
        s = new_stack(request.module.__name__.replace("_", "-"), **settings)
        started.append(s)
        s.start()
        return s
    yield start
    for s in started:
        s.stop()


@pytest.fixture
def logged(caplog):
    """caplog with the scanmilter logger's records, whatever earlier tests left that logger like
    (logs.setup() cuts it off from the root; a reload sets its level)."""
    logger = logging.getLogger("scanmilter")
    saved = logger.propagate, logger.level
    logger.addHandler(caplog.handler)
    logger.propagate = False                # each record once, through caplog's handler
    logger.setLevel(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.propagate = saved[0]
    logger.setLevel(saved[1])               # not .level =: setLevel clears the logging module's cache


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL (tools/pg.py) for the whole session: a unix socket in its directory,
    and 127.0.0.1 on a free port where a password is required. A test that stops or restarts
    the server starts one of its own instead."""
    import pg
    server = pg.PgServer(Path(scratch("scanmilter-pg-")) / "pg", tcp=True)
    server.start()
    yield server
    server.stop()


_DATABASES = iter(range(1, 1_000_000))


@pytest.fixture
def database(postgres):
    """The DSN of a new, empty database on the session's PostgreSQL (superuser, unix socket)."""
    return postgres.create_database(f"t{next(_DATABASES)}")
