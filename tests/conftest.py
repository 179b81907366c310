"""Fixtures: a fake multi-datasite workspace under tmp_path (syft-core's temp_workspace idea)."""

from __future__ import annotations

import itertools
import logging
from datetime import datetime, timedelta, timezone

import pytest

from pathlib import Path

from shared.logs import Problems
from shared.paths import Paths
from shared.settings import Settings

AGG = "agg@example.org"


def is_synced(path: Path, data_dir: Path) -> bool:
    """True when ``path`` lies in the tree SyftBox uploads (everything under ``datasites/``)."""
    try:
        Path(path).resolve().relative_to((Path(data_dir) / "datasites").resolve())
        return True
    except ValueError:
        return False


@pytest.fixture
def settings() -> Settings:
    return Settings(aggregator=AGG, interval_s=1.0, sample_period_s=0.1)


@pytest.fixture
def paths_for(tmp_path):
    """Paths of datasite ``email`` in one shared fake workspace (as if the relay had synced everything)."""
    return lambda email: Paths(data_dir=tmp_path, email=email)


@pytest.fixture
def problems() -> Problems:
    return Problems(logging.getLogger("test"))


class FakeClock:
    """A monotonic clock that jumps forward by ``step`` on every reading: sampling loops never wait."""

    def __init__(self, step: float = 1.0):
        self.ticks = itertools.count(step=step)

    def __call__(self) -> float:
        return float(next(self.ticks))


class FakeWall:
    """UTC wall clock advancing ``step`` seconds per reading from a fixed start."""

    def __init__(self, start: datetime = datetime(2026, 1, 1, tzinfo=timezone.utc), step: float = 1.0):
        self.now, self.step = start, timedelta(seconds=step)

    def __call__(self) -> datetime:
        self.now += self.step
        return self.now


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long", action="store_true", default=False,
        help="longer randomized runs of the fault and hostile-input tests (more kills, rewrites, examples)",
    )


@pytest.fixture
def long_run(request: pytest.FixtureRequest) -> bool:
    """True under ``--long``: randomized fault tests run 10x more iterations (same seeds)."""
    return bool(request.config.getoption("--long"))
