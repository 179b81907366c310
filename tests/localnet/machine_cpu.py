"""The machine's CPU as the members of a test network read it, set by the test: a busy machine cannot move it.

Every member of a local network measures the same machine, so a test that needs the members' CPU above or below a
threshold cannot rely on the machine (other work on it, or a load generator that must outrun it). ``CpuLevel``
writes a step function of time to a file; ``sitecustomize()`` is the text of a ``sitecustomize.py`` that the test
places in each member's copy of the app (``install_app(..., files=...)``; run.sh puts the app folder on
``PYTHONPATH``, so Python imports it at start). In the worker (``--worker`` or ``--once`` on its command line) it
replaces ``psutil.cpu_percent`` by the mean of that step function since the previous call, which is what psutil
reports for the real counters: the first call says 0.0, as psutil's does. The supervisor and the tools run.sh calls
are left alone. Nothing of this is in the app: the double lives only in the test's copies.
"""

from __future__ import annotations

import time
from pathlib import Path

SITECUSTOMIZE = '''"""Test double written by tests/localnet/machine_cpu.py: psutil.cpu_percent follows {levels!r}."""
import sys
import time

LEVELS = {levels!r}


def _mean_since(start, end):
    """The mean over [start, end] of the step function in LEVELS: "<unix time> <percent>" lines in time order, each
    level holding from its time to the next one's (the first one also before its time)."""
    with open(LEVELS) as f:
        steps = [tuple(map(float, line.split())) for line in f if line.strip()]
    if end <= start:
        return next((v for t, v in reversed(steps) if t <= end), steps[0][1])
    total = 0.0
    for i, (t, level) in enumerate(steps):
        lo = start if i == 0 else max(start, t)
        hi = min(end, steps[i + 1][0]) if i + 1 < len(steps) else end
        total += level * max(0.0, hi - lo)
    return total / (end - start)


def _install():
    try:
        import psutil
    except ImportError:  # a Python without psutil (run.sh's own checks): nothing to replace
        return
    last = []

    def cpu_percent(interval=None, percpu=False):
        now = time.time()
        start = last[-1] if last else None
        last[:] = [now]
        return 0.0 if start is None else _mean_since(start, now)

    psutil.cpu_percent = cpu_percent


if "--worker" in sys.orig_argv or "--once" in sys.orig_argv:
    _install()
'''


class CpuLevel:
    """The members' CPU level, ``level`` percent from now on (``set``), kept in ``path``."""

    def __init__(self, path: Path, level: float):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self.set(level)

    def set(self, level: float) -> float:
        """The members read ``level`` from now on; returns the unix time of the change."""
        now = time.time()
        with open(self.path, "a") as f:
            f.write(f"{now!r} {float(level)!r}\n")
        return now

    def sitecustomize(self) -> str:
        """The text of the ``sitecustomize.py`` that makes a copy of the app read this level."""
        return SITECUSTOMIZE.format(levels=str(self.path))
