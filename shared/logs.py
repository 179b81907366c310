"""Logging: one line per event to stdout (SyftBox saves it in the app's log), problems said once.

``Problems.report(key, message)`` logs a problem the first time it appears (or when its message
changes) and ``Problems.clear(key)`` logs once that it is resolved, so a fault that lasts hours costs
two lines, not thousands.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_cpu_tracker", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._cpu_tracker = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)


class Problems:
    """Log each distinct ongoing problem once, and its end once."""

    def __init__(self, log: logging.Logger):
        self.log = log
        self.active: dict[str, str] = {}

    def report(self, key: str, message: str, level: int = logging.WARNING) -> None:
        if self.active.get(key) != message:
            self.active[key] = message
            self.log.log(level, message)

    def clear(self, key: str, message: str | None = None) -> None:
        if self.active.pop(key, None) is not None:
            self.log.info(message or f"resolved: {key}")
