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


# -- the fast tier ---------------------------------------------------------------------------------------------------
# `./run.sh test --fast` runs every test but the slow ones, in well under a minute; `./run.sh test` runs them all.
# Slow: every test marked `network` or `browser`, and these (each about a second or more here), which start the app's
# processes or run long simulations. The rule lives here only; a name that no longer matches a test is an error.
SLOW_MARKS = ("network", "browser")
SLOW = {
    "tests/test_lifecycle.py::test_supervised_app_": "starts the app through run.sh",
    "tests/test_lifecycle.py::test_sigint_is_a_deliberate_stop": "starts the app through run.sh",
    "tests/test_lifecycle.py::test_a_second_start_waits": "starts the app through run.sh, twice",
    "tests/test_lifecycle.py::test_a_changed_settings_file_reaches": "starts the app through run.sh",
    "tests/test_package.py": "builds the wheel and a fresh venv",
    "tests/test_supervisor.py::test_a_worker_imports_only_the_roles_it_runs": "a real worker through a window",
    "tests/test_settings_app.py::test_once_publishes_a_report": "a real process through one window",
    "tests/test_faults.py::test_aggregator_survives_sigkill_anywhere": "kills real processes, many times",
    "tests/test_faults.py::test_member_survives_sigkill_anywhere": "kills real processes, many times",
    "tests/test_faults.py::test_readers_never_see_a_partial_report": "real writer and reader processes",
    "tests/test_faults.py::test_two_instances_never_overspend_together": "two real member processes",
    "tests/test_publish.py::test_a_day_of_ticks_never_rewrites_a_closed_segment": "a day of ticks",
    "tests/test_secnoise.py::test_calibrate_round_trips": "calibrations over a grid",
    "tests/test_secnoise.py::test_fleet_intervals_cover": "coverage over many simulated fleets",
    "tests/test_hostile.py::test_time_and_memory_stay_bounded": "thousands of junk files",
    "tests/test_hostile.py::test_junk_files_beside_a_report_cost_nothing": "thousands of junk files",
    "tests/test_secure_protocol.py::test_members_vanishing_mid_round": "many simulated rounds",
    "tests/test_secure_protocol.py::test_wrap_around_is_negligible": "the largest sums over many members",
    "tests/test_validate.py::test_arbitrary_json_only_raises_rejected": "hundreds of generated inputs",
    "tests/test_validate.py::test_arbitrary_legacy_shaped_objects": "hundreds of generated inputs",
    "tests/test_settings_property.py": "hundreds of generated settings, each run for a window and a tick",
    "tests/test_privacy.py::test_mechanism_is_unbiased_with_declared_variance": "a million noise draws",
    "tests/test_ledger.py::test_worst_span_equals_brute_force": "a brute force over many generated ledgers",
    "tests/test_local_users.py": "real processes of a second local user, under three umasks",
    "tests/test_adversary.py": "real members against a lying aggregator, rings of 40, many signed rounds",
    "tests/test_relay_perms.py::test_random_histories_of_permission_files": "random histories, six seeds",
    "tests/test_adversary_coordinator.py::test_one_member_flagging_every_epoch": "many epochs of flags",
    "tests/test_adversary_coordinator.py::test_a_new_generation_each_time": "generations until the cap",
    "tests/test_secure_protocol.py::test_a_sparse_ring_of_40_unmasks_exactly": "a ring of 40 real members",
    "tests/test_adversary_coordinator.py::test_losing_its_state_every_few_windows_for_a_day": "a day of windows",
    "tests/test_secnoise.py::test_honest_rounds_at_the_defaults_are_not_refused": "many simulated honest rounds",
    "tests/test_settings_app.py::test_any_toml_document_gets_settings_or_a_sentence": "hundreds of generated documents",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long", action="store_true", default=False,
        help="longer randomized runs of the fault and hostile-input tests (more kills, rewrites, examples)",
    )
    parser.addoption("--fast", action="store_true", default=False,
                     help="leave out the slow tests (tests/conftest.py: SLOW_MARKS and SLOW): feedback within a minute")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: left out by --fast (tests/conftest.py says which tests are slow)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    files = {item.nodeid.split("::")[0] for item in items}
    stale = [k for k in SLOW if k.split("::")[0] in files and not any(i.nodeid.startswith(k) for i in items)]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py SLOW names tests that do not exist (renamed?): {stale}")
    slow = [i for i in items if any(i.get_closest_marker(m) for m in SLOW_MARKS)
            or any(i.nodeid.startswith(k) for k in SLOW)]
    for item in slow:
        item.add_marker(pytest.mark.slow)
    if config.getoption("--fast"):
        chosen = set(map(id, slow))
        config.hook.pytest_deselected(items=slow)
        items[:] = [i for i in items if id(i) not in chosen]


@pytest.fixture
def long_run(request: pytest.FixtureRequest) -> bool:
    """True under ``--long``: randomized fault tests run 10x more iterations (same seeds)."""
    return bool(request.config.getoption("--long"))
