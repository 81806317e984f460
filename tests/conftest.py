import shutil
import sys
import tempfile
from pathlib import Path

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
