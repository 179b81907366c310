"""Logging: one line per event, problems said once, a summary an hour, nothing per window at the default level.

``Problems.report(key, message)`` logs a problem the first time it appears (or when its message
changes) and ``Problems.clear(key)`` logs once that it is resolved, so a fault that lasts hours costs
two lines, not thousands. ``Hourly`` adds up what a loop did and logs it once an hour.

Lines go to stdout (SyftBox saves it in the app's log) or, when several datasites share the app folder, to a
``LogSink`` file of the datasite's own, capped at ``max_bytes`` with one older generation beside it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from collections.abc import Callable  # not typing: the supervisor imports this module

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
HOUR_S = 3600.0


class LogSink:
    """Bytes to ``sys.stdout``, or appended to ``path`` (renamed to ``path.1`` once it passes ``max_bytes``)."""

    def __init__(self, path: Path | None = None, max_bytes: int = 1_000_000):
        self.path, self.max_bytes = (Path(path) if path else None), max_bytes
        self._lock = threading.Lock()
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._file is None:
                out = sys.stdout.buffer
                out.write(data)
                out.flush()
                return
            self._file.write(data)
            self._file.flush()
            if self._file.tell() > self.max_bytes:
                self._file.close()
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                self._file = open(self.path, "ab")


    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class _SinkHandler(logging.Handler):
    def __init__(self, sink: LogSink):
        super().__init__()
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.write((self.format(record) + "\n").encode("utf-8", "backslashreplace"))
        except Exception:  # noqa: BLE001  logging must never take the app down
            self.handleError(record)


_sink = LogSink()


def setup_logging(level: int = logging.INFO, sink: LogSink | None = None) -> None:
    """Log at ``level`` to ``sink`` (default: stdout). Calling it again replaces the sink."""
    global _sink
    root = logging.getLogger()
    if sink is not None:
        _sink = sink
        for h in [h for h in root.handlers if getattr(h, "_cpu_tracker", False)]:
            root.removeHandler(h)
    if not any(getattr(h, "_cpu_tracker", False) for h in root.handlers):
        handler = _SinkHandler(_sink)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._cpu_tracker = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)


def write_raw(line: bytes) -> None:
    """Write an already formatted line (a child process's output) where this process logs."""
    _sink.write(line)


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


class Hourly:
    """Counts and sums, logged as one line per ``period_s`` of the given clock (the loop's own, so tests and the
    soak benchmark drive it), then reset. ``describe(totals, now)`` returns the line's text."""

    def __init__(self, log: logging.Logger, describe: Callable[[dict[str, float], float], str], *,
                 period_s: float = HOUR_S):
        self.log, self.describe, self.period_s = log, describe, period_s
        self.totals: dict[str, float] = {}
        self._since: float | None = None

    def add(self, now: float, **amounts: float) -> None:
        """Add ``amounts`` at time ``now`` (seconds); logs and resets once ``period_s`` has passed."""
        if self._since is None:
            self._since = now
        for key, value in amounts.items():
            self.totals[key] = self.totals.get(key, 0) + value
        if now - self._since >= self.period_s:
            self.log.info(self.describe(self.totals, now))
            self.totals, self._since = {}, now
