"""Files that are not regular files, and a deadline for reads that must never block on them: shared by the tests of
non-blocking reads, hostile reports and permission files."""

from __future__ import annotations

import os
import signal
import socket
from contextlib import contextmanager
from pathlib import Path


class Blocked(BaseException):
    """Not an OSError (nor any Exception): no ``except OSError`` on the way can mistake it for a read error."""


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) if the block blocks, e.g. on a FIFO."""
    def boom(*_):
        raise Blocked(f"blocked for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def make_fifo(path: Path) -> Path:
    """A FIFO at ``path`` (its folder made first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def make_socket(path: Path) -> Path:
    """A Unix socket at ``path`` (its folder made first), bound by its short name: AF_UNIX paths are limited to
    108 bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        s = socket.socket(socket.AF_UNIX)
        s.bind(path.name)
        s.close()
    finally:
        os.chdir(cwd)
    return path
