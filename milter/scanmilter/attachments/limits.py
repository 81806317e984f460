"""The limits of one walk (named settings in config.py) and the budget that spends them.

Each field of Limits is the setting of the same name, so a limit that stops the walk is
reported by that name ("limit: archive_expansion_limit") and the operator finds it in
docs/configuration.md.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Callable



@dataclass(frozen=True)
class Limits:
    mime_nesting_limit: int          # multipart / message/rfc822 levels looked into
    mime_part_limit: int             # MIME entities walked per message
    mime_header_limit: int           # bytes of Content-* header kept per entity
    archive_depth_limit: int         # archives inside archives opened
    archive_member_limit: int        # members listed across all archives of a message
    archive_expansion_limit: int     # bytes unpacked from all archives of a message
    archive_ratio_limit: int         # unpacked bytes per byte of archive, once past archive_ratio_floor
    archive_ratio_floor: int         # bytes an archive may unpack before its ratio is judged
    attachment_timeout: float        # seconds for the whole walk

    @classmethod
    def from_settings(cls, cfg) -> "Limits":
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})

    @classmethod
    def defaults(cls) -> "Limits":
        from ..config import DAEMON_SETTINGS
        values = {s.name: s.default for s in DAEMON_SETTINGS}
        return cls(**{f.name: values[f.name] for f in fields(cls)})


class Stop(Exception):
    """A limit of the whole walk was reached: nothing more is read."""

    def __init__(self, setting: str):
        super().__init__(setting)
        self.setting = setting


class Budget:
    """What one walk may still spend: time, MIME parts, archive members and unpacked bytes."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.clock = clock
        self.start = clock()
        self.deadline = self.start + limits.attachment_timeout
        self.parts = 0
        self.members = 0
        self.expanded = 0
        self.closed = ""                    # a limit that keeps any further archive from being opened
        self.hit: dict[str, None] = {}      # settings reached, in order

    def reached(self, setting: str) -> str:
        """Note that the limit `setting` was reached; returns its name."""
        self.hit[setting] = None
        return setting

    def check_time(self) -> None:
        if self.clock() > self.deadline:
            self.reached("attachment_timeout")
            raise Stop("attachment_timeout")

    def seconds(self) -> float:
        return self.clock() - self.start
