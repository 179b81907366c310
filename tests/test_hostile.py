"""Hostile input at the aggregator, through the real ``Aggregator.tick`` on a fake workspace.

The bytes of a report are covered by ``tests/test_validate.py`` and the committed corpus (``tests/corpus/``,
which this work extended: negative and zero privacy numbers, absurd noise scales, NaN / Infinity inside the
release, values far outside the plausible range, ancient and year-9999 times, every wrong type of
``schema_version``, duplicate keys that parsers disagree on, nesting inside a valid report, overlong and
surrogate UTF-8). Here: what only the file system can do (symlinks, FIFOs, sockets, sparse giant files, files
where folders should be, folder names that are not emails), thousands of junk files, and the influence of
one hostile member on the network mean.

Influence bound: a report is accepted only if its noise scale b <= max_noise_scale and its value lies within
[-30 b, 100 + 30 b] (``validate.PLAUSIBLE_SCALES``). A member's true mean m lies in [0, 100], so replacing its
honest report by the most extreme accepted one moves the unweighted mean of k fresh members by at most

    (100 + 30 * max_noise_scale) / k        (400 / k with the defaults: 133 points for k = 3, 4 for k = 100)

and that bound is reached (tested both ways, with a real tick). A legacy (tutorial) report moves it by 0.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
import tracemalloc
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from cpu_tracker_aggregator.aggregator import Aggregator
from cpu_tracker_aggregator.validate import PLAUSIBLE_SCALES, Rejected, parse_report
from cpu_tracker_member.member import build_report
from shared.atomic import atomic_write_json
from shared.logs import Problems
from shared.paths import Paths
from shared.wire.schema import Dashboard
from shared.settings import Settings
from tests.special_files import deadline, make_fifo, make_socket

AGG = "agg@example.org"
HONEST = [f"m{i}@example.org" for i in range(4)]
END = datetime(2026, 1, 1, 12, 0, 20, tzinfo=timezone.utc)
NOW = END + timedelta(seconds=5)
SETTINGS = Settings(aggregator=AGG)


def report_obj(level: float, seed: int, end: datetime = END) -> dict:
    _, report = build_report(level, SETTINGS.samples_per_window, end - timedelta(seconds=20), end, SETTINGS,
                             random_state=seed)
    return report.model_dump(mode="json")


def extreme_obj(value: float, *, n_samples: int = 10, epsilon: float = 1.0, end: datetime = END) -> dict:
    """A report whose privacy numbers agree (n = 10 samples at epsilon 1: noise scale 10, the default cap),
    carrying ``value``: the most a hostile member can claim."""
    obj = report_obj(50.0, 0, end)
    r = obj["release"]
    obj["window"]["n_samples"] = n_samples
    r["epsilon"] = epsilon
    r["sensitivity"] = 100.0 / n_samples
    r["noise_scale"] = r["sensitivity"] / epsilon
    r["noise_std"] = math.sqrt(2) * r["noise_scale"]
    r["value"] = obj["cpu"] = value
    return obj


class Workspace:
    def __init__(self, root: Path):
        self.root = root
        self.paths = Paths(data_dir=root / "workspace", email=AGG)
        self.datasites = self.paths.datasites
        self.values: dict[str, float] = {}
        for i, m in enumerate(HONEST):
            self.write(m, report_obj(10.0 + 20 * i, seed=i))

    def write(self, member: str, obj: dict) -> Path:
        path = self.paths.report_file(member)
        atomic_write_json(path, obj)
        self.values[member] = obj["release"]["value"] if "release" in obj else obj.get("cpu")
        return path

    def report_dir(self, member: str) -> Path:
        return self.paths.report_dir(member)

    def aggregator(self, **kw) -> Aggregator:
        return Aggregator(self.paths, Settings(aggregator=AGG, **kw), Problems(logging.getLogger("test.hostile")))

    def honest_mean(self) -> float:
        return statistics.fmean(self.values[m] for m in HONEST)


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


def tick(ws: Workspace, now: datetime = NOW, **kw) -> Dashboard:
    with deadline(20):
        dash = ws.aggregator(**kw).tick(now)
    assert Dashboard.model_validate_json(ws.paths.dashboard_file.read_bytes()) == dash
    status = ws.paths.members_status_file.read_bytes()
    json.loads(status.decode("utf-8"))  # the private status stays valid UTF-8 JSON, whatever the folder names
    return dash


# ---------------------------------------------------------------------------------------------------
# What only the file system can do
# ---------------------------------------------------------------------------------------------------
def _symlink_inside_own_folder(ws: Workspace, evil: str) -> None:
    real = ws.report_dir(evil) / "real.json"
    ws.write(evil, report_obj(90.0, 50))
    os.replace(ws.paths.report_file(evil), real)
    ws.paths.report_file(evil).symlink_to(real)


def _symlink_to(target: str) -> Callable[[Workspace, str], None]:
    def build(ws: Workspace, evil: str) -> None:
        ws.report_dir(evil).mkdir(parents=True)
        ws.paths.report_file(evil).symlink_to(target)
    return build


def _symlink_to_honest_report(ws: Workspace, evil: str) -> None:
    ws.report_dir(evil).mkdir(parents=True)
    ws.paths.report_file(evil).symlink_to(ws.paths.report_file(HONEST[0]))


def _app_data_symlink_to_honest(ws: Workspace, evil: str) -> None:
    (ws.datasites / evil).mkdir()
    (ws.datasites / evil / "app_data").symlink_to(ws.datasites / HONEST[0] / "app_data", target_is_directory=True)


def _relative_dotdot_folder_symlink(ws: Workspace, evil: str) -> None:
    (ws.datasites / evil / "app_data").mkdir(parents=True)
    (ws.report_dir(evil)).symlink_to(Path("..", "..", HONEST[1], "app_data", "cpu_tracker"), target_is_directory=True)


def _fifo(ws: Workspace, evil: str) -> None:
    make_fifo(ws.paths.report_file(evil))


def _socket(ws: Workspace, evil: str) -> None:
    make_socket(ws.paths.report_file(evil))


def _directory_with_entries(ws: Workspace, evil: str) -> None:
    folder = ws.paths.report_file(evil)
    folder.mkdir(parents=True)
    for i in range(2000):
        (folder / f"{i}.json").write_bytes(b"{}")


def _sparse_giant(ws: Workspace, evil: str) -> None:
    ws.report_dir(evil).mkdir(parents=True)
    with open(ws.paths.report_file(evil), "wb") as f:
        f.truncate(50 * 2**30)  # 50 GiB that take no disk space: never to be read


def _datasite_is_a_file(ws: Workspace, evil: str) -> None:
    (ws.datasites / evil).write_text("not a folder")


def _app_data_is_a_file(ws: Workspace, evil: str) -> None:
    (ws.datasites / evil).mkdir()
    (ws.datasites / evil / "app_data").write_text("not a folder")


def _report_folder_is_a_file(ws: Workspace, evil: str) -> None:
    (ws.datasites / evil / "app_data").mkdir(parents=True)
    ws.report_dir(evil).write_text("not a folder")


def _datasite_symlink_to_root(ws: Workspace, evil: str) -> None:
    (ws.datasites / evil).symlink_to("/", target_is_directory=True)


def _unreadable_loop(ws: Workspace, evil: str) -> None:
    ws.report_dir(evil).mkdir(parents=True)
    ws.paths.report_file(evil).symlink_to(ws.paths.report_file(evil))  # a symlink to itself


FS_CASES = {
    # name: (builder, expected rejection reason, or None: not a member at all)
    "report_symlink_inside_own_folder": (_symlink_inside_own_folder, "symlink"),
    "report_symlink_to_dev_zero": (_symlink_to("/dev/zero"), "symlink"),
    "report_symlink_to_etc_passwd": (_symlink_to("/etc/passwd"), "symlink"),
    "report_symlink_to_an_honest_report": (_symlink_to_honest_report, "symlink"),
    "report_symlink_to_itself": (_unreadable_loop, "symlink"),
    "app_data_symlink_to_an_honest_member": (_app_data_symlink_to_honest, "symlink"),
    "report_folder_symlink_dotdot_to_an_honest_member": (_relative_dotdot_folder_symlink, "symlink"),
    "report_is_a_fifo": (_fifo, "not_a_file"),
    "report_is_a_socket": (_socket, ("not_a_file", "unreadable")),  # open() of a socket fails with ENXIO
    "report_is_a_folder_of_2000_files": (_directory_with_entries, "not_a_file"),
    "report_is_a_sparse_50_GiB_file": (_sparse_giant, "too_large"),
    "datasite_is_a_file": (_datasite_is_a_file, None),
    "app_data_is_a_file": (_app_data_is_a_file, None),
    "report_folder_is_a_file": (_report_folder_is_a_file, None),
    "datasite_symlink_to_root": (_datasite_symlink_to_root, None),
}


@pytest.mark.parametrize("case", sorted(FS_CASES))
def test_file_system_tricks_never_count_and_never_stop_a_tick(ws: Workspace, case: str) -> None:
    """Each trick: the tick completes quickly (a FIFO cannot block it, a 50 GiB file is never read), the
    hostile member is rejected with its reason (or not a member at all), and the network figure is exactly
    the honest members' mean: nothing counted twice, nothing read from outside the member's folder."""
    build, reason = FS_CASES[case]
    build(ws, "evil@example.org")
    tracemalloc.start()
    try:
        started = time.monotonic()
        dash = tick(ws, min_members=1)
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 10 and peak < 64 * 2**20
    assert dash.counts.fresh == len(HONEST)
    assert dash.estimate is not None and dash.estimate.mean == pytest.approx(ws.honest_mean(), rel=1e-12)
    reasons = (reason,) if isinstance(reason, str) else reason or ()
    assert dash.counts.rejected_by_reason in [{r: 1} for r in reasons] or (not reasons and
                                                                          dash.counts.rejected_by_reason == {})


NOT_EMAILS = ["no-at-sign", "two@at@example.org", "space here@example.org", "tab\t@example.org",
              "@example.org", "trailing@", "new\nline@example.org", "back\\slash@example.org"]


@pytest.mark.parametrize("name", NOT_EMAILS, ids=[repr(n) for n in NOT_EMAILS])
def test_folder_names_that_are_not_emails_are_rejected(ws: Workspace, name: str) -> None:
    """A valid report in a folder whose name is not an email is rejected, never averaged."""
    ws.write(name, extreme_obj(400.0))
    dash = tick(ws, min_members=1)
    assert dash.counts.rejected_by_reason == {"bad_folder_name": 1}
    assert dash.estimate.mean == pytest.approx(ws.honest_mean(), rel=1e-12)


@pytest.mark.parametrize("raw_name", [
    b"evil\xff@example.org",
    b"evil\xc0\xaf@example.org",
    b"ctl\x01@example.org",
    b"\xed\xa0\x80@example.org",
])
def test_undecodable_folder_names_never_break_a_tick(ws: Workspace, raw_name: bytes) -> None:
    """Folder names that are not valid UTF-8 (or carry control characters) reach the aggregator as the
    relay or a local user made them: every tick completes and the private status stays valid UTF-8 JSON.
    They are rejected as bad folder names."""
    folder = os.fsencode(ws.datasites) + b"/" + raw_name + b"/app_data/cpu_tracker"
    os.makedirs(folder)
    with open(folder + b"/cpu_tracker.json", "wb") as f:
        f.write(json.dumps(report_obj(55.0, 77)).encode())
    for i in range(2):
        dash = tick(ws, NOW + timedelta(seconds=10 * i), min_members=1)
        assert dash.counts.fresh == len(HONEST) and dash.counts.rejected_by_reason == {"bad_folder_name": 1}


# ---------------------------------------------------------------------------------------------------
# Thousands of junk files
# ---------------------------------------------------------------------------------------------------
def _junk(ws: Workspace, files_per_folder: int, junk_folders: int, junk_members: int) -> None:
    for member in HONEST[:2]:  # junk beside honest reports, in the very folder the aggregator reads
        for i in range(files_per_folder):
            (ws.report_dir(member) / f"junk-{i}.json").write_bytes(b'{"cpu": 1e308}' * 10)
    for i in range(junk_folders):  # datasites that do not run the app, full of files
        (ws.datasites / f"bystander{i}@example.org" / "public").mkdir(parents=True)
    for i in range(junk_members):  # members whose report is garbage of every kind
        kind = i % 4
        data = [b"\xff\xfe", b"{" * 20000, b'{"schema_version": 1}', b"[" + b"1," * 5000 + b"1]"][kind]
        path = ws.paths.report_file(f"junk{i}@example.org")
        path.parent.mkdir(parents=True)
        path.write_bytes(data)


def _measure(fn: Callable[[], object]) -> tuple[float, int]:
    tracemalloc.start()
    try:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_time_and_memory_stay_bounded_with_thousands_of_junk_files(ws: Workspace, long_run: bool) -> None:
    """20,000 junk files beside two honest reports, 2,000 datasites without the app and 1,000 members with
    garbage reports (invalid UTF-8, 20,000-deep nesting, schema-less, 10 KB arrays): the first tick reads each
    report once and stays within seconds and tens of MB; later ticks re-read nothing; the junk beside a
    report is never even listed; the figure is the honest members' mean."""
    scale = 5 if long_run else 1
    agg = ws.aggregator(min_members=1)
    clean_s, _ = _measure(lambda: agg.tick(NOW))
    _junk(ws, files_per_folder=10000 * scale, junk_folders=2000 * scale, junk_members=1000 * scale)
    agg = ws.aggregator(min_members=1)
    cold_s, cold_peak = _measure(lambda: agg.tick(NOW))
    warm_s, warm_peak = _measure(lambda: agg.tick(NOW + timedelta(seconds=10)))
    dash = agg.tick(NOW + timedelta(seconds=20))
    assert dash.counts.fresh == len(HONEST) and dash.counts.rejected == 1000 * scale
    assert dash.estimate.mean == pytest.approx(ws.honest_mean(), rel=1e-12)
    print(f"junk: clean tick {clean_s * 1000:.0f} ms; with junk cold {cold_s * 1000:.0f} ms "
          f"(peak {cold_peak / 2**20:.1f} MiB), warm {warm_s * 1000:.0f} ms (peak {warm_peak / 2**20:.1f} MiB)")
    assert cold_s < 10 * scale and warm_s < 2 * scale
    assert cold_peak < 64 * 2**20 * scale and warm_peak < 32 * 2**20 * scale


def test_junk_files_beside_a_report_cost_nothing(ws: Workspace) -> None:
    """The aggregator opens one known path per member: 20,000 junk files in two members' report folders
    leave the tick's time where it was (warm ticks compared, generous margin for CI noise)."""
    agg = ws.aggregator(min_members=1)
    agg.tick(NOW)
    before = min(_measure(lambda: agg.tick(NOW + timedelta(seconds=i)))[0] for i in range(1, 6))
    _junk(ws, files_per_folder=10000, junk_folders=0, junk_members=0)
    after = min(_measure(lambda: agg.tick(NOW + timedelta(seconds=i)))[0] for i in range(6, 11))
    assert after < before * 3 + 0.05, (before, after)


# ---------------------------------------------------------------------------------------------------
# Influence bound
# ---------------------------------------------------------------------------------------------------
def bound(settings: Settings, k: int) -> float:
    return (100.0 + PLAUSIBLE_SCALES * settings.max_noise_scale) / k


@pytest.mark.parametrize("k", [3, 4, 10, 40])
@pytest.mark.parametrize("side", ["high", "low"])
def test_one_hostile_member_moves_the_mean_by_at_most_the_bound(tmp_path: Path, k: int, side: str) -> None:
    """Real ticks on a fake workspace of k fresh members: member k-1 is either honest (its true mean m at the
    far end of [0, 100], released without noise: the counterfactual) or hostile (the most extreme report the
    aggregator still accepts, on the other side). The mean moves by exactly (100 + 30 b_max) / k, never more;
    one step further and the report is rejected and not counted."""
    s = Settings(aggregator=AGG, min_members=1)
    ws = Workspace(tmp_path)
    members = [f"h{i}@example.org" for i in range(k - 1)]
    for m in list(ws.values):
        ws.paths.report_file(m).unlink()
    for i, m in enumerate(members):
        ws.write(m, report_obj(5.0 + 90.0 * i / max(1, k - 2), seed=100 + i))
    hostile = "hostile@example.org"
    m_true, v_extreme = (0.0, 100.0 + PLAUSIBLE_SCALES * s.max_noise_scale) if side == "high" else \
        (100.0, -PLAUSIBLE_SCALES * s.max_noise_scale)

    def mean_with(obj: dict, at: datetime) -> Dashboard:
        ws.write(hostile, obj)
        return ws.aggregator(min_members=1).tick(at)

    honest = extreme_obj(m_true, n_samples=20, epsilon=5.0)  # an honest member's report, zero noise drawn
    base = mean_with(honest, NOW)
    worst = mean_with(extreme_obj(v_extreme), NOW + timedelta(seconds=1))
    assert base.counts.fresh == worst.counts.fresh == k
    moved = worst.estimate.mean - base.estimate.mean
    assert abs(moved) <= bound(s, k) * (1 + 1e-12)
    assert abs(moved) == pytest.approx(bound(s, k), rel=1e-9)  # the bound is tight
    beyond = v_extreme + (1e-6 if side == "high" else -1e-6)
    rejected = mean_with(extreme_obj(beyond), NOW + timedelta(seconds=2))
    assert rejected.counts.fresh == k - 1 and rejected.counts.rejected_by_reason == {"implausible_value": 1}
    too_noisy = extreme_obj(v_extreme, epsilon=0.999)  # noise scale just above the cap
    assert mean_with(too_noisy, NOW + timedelta(seconds=3)).counts.rejected_by_reason == {"noise_out_of_range": 1}


def test_a_legacy_report_does_not_move_the_mean(ws: Workspace) -> None:
    before = tick(ws, min_members=1).estimate.mean
    ws.write("legacy@example.org", {"cpu": 100.0, "timestamp": END.strftime("%Y-%m-%d %H:%M:%S")})
    after = tick(ws, NOW + timedelta(seconds=1), min_members=1)
    assert after.counts.legacy == 1 and after.estimate.mean == before


@hyp_settings(max_examples=400, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 10**6),
    eps=st.floats(1e-3, 20.0),
    value=st.floats(-1e4, 1e4) | st.sampled_from([-300.0, 400.0, -30.0, 130.0]),
    max_noise_scale=st.sampled_from([0.5, 1.0, 10.0, 100.0]),
    period=st.sampled_from([1e-6, 0.01, 0.1, 1.0]),
)
def test_every_accepted_report_lies_within_the_influence_range(n, eps, value, max_noise_scale, period) -> None:
    """Whatever consistent privacy numbers and value a member claims, an accepted report's value lies in
    [-30 b_max, 100 + 30 b_max]: |value - m| <= 100 + 30 b_max for every true mean m in [0, 100]."""
    s = Settings(aggregator=AGG, max_noise_scale=max_noise_scale)
    obj = extreme_obj(value, n_samples=n, epsilon=eps)
    obj["window"]["sample_period_s"] = obj["privacy_unit"]["seconds"] = period
    try:
        accepted = parse_report(json.dumps(obj).encode(), now=NOW, settings=s)
    except Rejected:
        return
    v = accepted.value
    assert -PLAUSIBLE_SCALES * max_noise_scale <= v <= 100 + PLAUSIBLE_SCALES * max_noise_scale
    assert accepted.noise_scale <= max_noise_scale


def test_ancient_and_future_reports_are_never_fresh(ws: Workspace) -> None:
    """A report dated 1970 is accepted as a file but never fresh; one dated beyond the clock-skew tolerance is
    rejected as future; neither moves the figure."""
    ws.write("ancient@example.org", extreme_obj(400.0, end=datetime(1970, 1, 1, 0, 0, 20, tzinfo=timezone.utc)))
    ws.write("future@example.org", extreme_obj(-300.0, end=NOW + timedelta(seconds=SETTINGS.future_tolerance_s + 1)))
    dash = tick(ws, min_members=1)
    assert dash.counts.fresh == len(HONEST) and dash.counts.stale == 1
    assert dash.counts.rejected_by_reason == {"future": 1}
    assert dash.estimate.mean == pytest.approx(ws.honest_mean(), rel=1e-12)


@pytest.mark.parametrize("end", ["9999-12-31T23:59:59.999999-00:01", "0001-01-01T00:00:00.000001+00:01"])
def test_times_beyond_the_utc_range_never_break_a_tick(ws: Workspace, end: str) -> None:
    """A report whose window ends beyond the range of UTC datetimes (valid in its own offset) is refused as from
    the future or counted stale, and the private status stays valid JSON."""
    obj = extreme_obj(50.0)
    obj["window"]["end"] = obj["created_at"] = end
    obj["window"]["start"] = "0001-01-01T00:00:00+00:01" if end.startswith("9999") else "0001-01-01T00:00:00+00:02"
    ws.write("edge@example.org", obj)
    dash = tick(ws, min_members=1)
    assert dash.counts.fresh == len(HONEST)
    assert dash.counts.rejected_by_reason.get("future", 0) + dash.counts.stale == 1
