"""Timing the walk: how long the attachment checks take on one message, and what they found.
For bench/ (a variant with attachment checks only) and for quick measurements by hand:

    .venv/bin/python -c "from scanmilter.attachments.bench import main; main()" MESSAGE.eml
"""
from __future__ import annotations

import io
import statistics
import sys
import time

from .limits import Limits
from .walker import walk


def time_walk(message: bytes, limits: Limits | None = None, repeat: int = 5,
              directory: str | None = None) -> dict:
    """Walk `message` `repeat` times; the fastest and median seconds, and the facts found once."""
    limits = limits or Limits.defaults()
    walk(io.BytesIO(b"Content-Type: text/plain\r\n\r\nwarm up\r\n"), limits, directory)   # libmagic's database loads once
    seconds = []
    report = None
    for _ in range(max(repeat, 1)):
        start = time.perf_counter()
        report = walk(io.BytesIO(message), limits, directory)
        seconds.append(time.perf_counter() - start)
    return {"bytes": len(message), "best": min(seconds), "median": statistics.median(seconds),
            "files": len(report.files), "parts": report.parts,
            "problems": [str(p) for p in report.all_problems()]}


def main(argv: list[str] | None = None) -> None:
    for path in (argv if argv is not None else sys.argv[1:]):
        with open(path, "rb") as f:
            r = time_walk(f.read())
        print(f"{path}: {r['bytes']} bytes, {r['files']} files, best {r['best'] * 1000:.2f} ms, "
              f"median {r['median'] * 1000:.2f} ms, problems: {', '.join(r['problems']) or 'none'}")
