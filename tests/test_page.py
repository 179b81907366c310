"""The public page (cpu_tracker_aggregator/page/index.html) in a real headless Chromium.

Selenium drives the system's chromium through /usr/bin/chromedriver (Debian: chromium, chromium-driver).
The page is served over HTTP from a temporary folder with a dashboard.json made from the real ``Dashboard``
model, and what it shows is compared with that JSON. The normal state is saved as a screenshot in the test's
temporary folder, or to the file named by CPU_TRACKER_SCREENSHOT (docs/dashboard.png, in docs/dashboard.md, is made with
`CPU_TRACKER_SCREENSHOT=docs/dashboard.png ./run.sh test tests/test_page.py`).
Without chromium the tests skip, except under CI (env CI set), where they fail.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from cpu_tracker_aggregator.aggregator import PAGE
from cpu_tracker_aggregator.publish import Publisher, read_history
from shared.paths import CURRENT_FILE
from shared.wire.schema import (
    AggregatorSettings,
    Counts,
    Dashboard,
    Estimate,
    History,
    PrivacySummary,
    Series,
    utc_now,
)

pytestmark = pytest.mark.browser

WINDOW = (1200, 900)
DAY = 86400
TICK_S = 10
COARSE_S = 300
RANGES = {"hour": ("recent", 3600), "day": ("recent", DAY), "month": ("coarse", 30 * DAY)}
GAP_FACTOR = 2.5


# ---------------------------------------------------------------------------------------------------
# The page's rounding, mirrored: JS toFixed rounds the exact binary value, halves away from zero.
# ---------------------------------------------------------------------------------------------------
def pct(x: float) -> str:
    return str(Decimal(x).quantize(Decimal("0.1"), ROUND_HALF_UP))


def num(x: float) -> str:
    return str(Decimal(x).quantize(Decimal("0.001"), ROUND_HALF_UP)).rstrip("0").rstrip(".")


# ---------------------------------------------------------------------------------------------------
# A known dashboard: 24 h of ticks and 30 days of 5-minute averages, with both kinds of gap.
# ---------------------------------------------------------------------------------------------------
def series(t: list[int], resolution: float, is_gap) -> Series:
    wave = lambda x: 30 + 12 * math.sin(2 * math.pi * x / DAY) + 3 * math.sin(2 * math.pi * x / 2700)  # noqa: E731
    mean = [None if is_gap(x) else round(wave(x), 3) for x in t]
    return Series(
        resolution_s=resolution,
        t=t,
        mean=mean,
        ci95_low=[None if m is None else round(m - 4.2, 3) for m in mean],
        ci95_high=[None if m is None else round(m + 4.2, 3) for m in mean],
        members=[1 if m is None else 5 for m in mean],
    )


def history(end: int) -> History:
    """Recent: the aggregator was down for 30 min 2 h ago and for 5 min 10 min ago; null ticks 30 to 17 min
    ago, leaving one lone figure 20 min ago. Coarse: down for two days, one null hour 20 days ago."""
    recent_t = [
        t for t in range(end - DAY, end + 1, TICK_S)
        if not (end - 7200 < t < end - 5400 or end - 600 < t < end - 300)
    ]
    recent = series(recent_t, TICK_S, lambda t: end - 1800 <= t <= end - 1210 or end - 1190 <= t <= end - 1000)
    first, last = -(-(end - 30 * DAY) // COARSE_S) * COARSE_S, end - end % COARSE_S
    coarse_t = [t for t in range(first, last + 1, COARSE_S) if not (end - 10 * DAY < t < end - 8 * DAY)]
    coarse = series(coarse_t, COARSE_S, lambda t: end - 20 * DAY <= t <= end - 20 * DAY + 3600)
    return History(recent=recent, coarse=coarse)


def dashboard(now: datetime, *, enough_members: bool = True) -> Dashboard:
    hist = history(int(now.timestamp()))
    recent = hist.recent
    estimate = Estimate(
        mean=recent.mean[-1], standard_error=1.237, ci95_low=recent.ci95_low[-1], ci95_high=recent.ci95_high[-1],
        members=5, method="test",
    )
    privacy = PrivacySummary(
        mechanisms={"laplace": 5}, epsilon_min=0.5, epsilon_max=1.0, noise_scale_min=0.5, noise_scale_max=1.0,
        privacy_unit_s=0.1, window_s_max=20.0,
    )
    common = dict(
        app_version="0.1.0",
        generated_at=now,
        counts=Counts(
            fresh=5 if enough_members else 2, stale=2, rejected=3, legacy=1,
            rejected_by_reason={"not_json": 2, "schema": 1},
        ),
        settings=AggregatorSettings(tick_s=TICK_S, stale_after_s=60, min_members=3),
        history=hist,
    )
    if enough_members:
        return Dashboard(status="ok", message="Network CPU (test).", estimate=estimate, privacy=privacy, **common)
    message = "No figure: <b>2</b> fresh member report(s), at least 3 are needed & none may be read off."
    return Dashboard(status="too_few_members", message=message, privacy=PrivacySummary(), **common)


def expected_runs(dash: Dashboard, range_key: str) -> list[list[int]]:
    """The page's rule: entries with t in the range; a null mean or a step of t over 2.5 resolutions breaks."""
    name, span = RANGES[range_key]
    s: Series = getattr(dash.history, name)
    end = max(int(dash.generated_at.timestamp()), s.t[-1])
    runs: list[list[int]] = [[]]
    for t, mean in zip(s.t, s.mean):
        if t < end - span:
            continue
        gap = max(GAP_FACTOR * s.resolution_s, dash.settings.stale_after_s + 2 * dash.settings.tick_s)
        if mean is None or (runs[-1] and t - runs[-1][-1] > gap):
            runs.append([])
        if mean is not None:
            runs[-1].append(t)
    return [r for r in runs if r]


# ---------------------------------------------------------------------------------------------------
# Browser and server
# ---------------------------------------------------------------------------------------------------
def browser_binaries() -> tuple[str, str]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    reason = "needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so browser tests must run")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium, chromedriver = browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--hide-scrollbars",
                "--force-device-scale-factor=1", "--lang=en-US", f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    try:  # --window-size counts the (invisible) window frame: set the page's viewport itself
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False},
        )
        yield driver
    finally:
        driver.quit()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        pass


@pytest.fixture(scope="module")
def server_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    root = tmp_path_factory.mktemp("page")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, name="page-server", daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@dataclass
class Site:
    """One folder served over HTTP holding the page, as the aggregator's public folder does."""

    folder: Path
    url: str
    browser: WebDriver

    def publish(self, dash: Dashboard | bytes) -> None:
        """Bytes: written as current.json. A dashboard: published by the aggregator's own Publisher (current.json,
        history index and segments), and read back by docs/dashboard.md's recipe, which must give its history."""
        if isinstance(dash, bytes):
            (self.folder / CURRENT_FILE).write_bytes(dash)
            return
        Publisher(self.folder).publish(dash, int(dash.generated_at.timestamp()))
        _, seen = read_history(self.folder)
        for name in ("recent", "coarse"):
            held, read = getattr(dash.history, name), getattr(seen, name)
            assert (read.t, read.mean, read.members) == (held.t, held.mean, held.members), name

    def open(self) -> None:
        self.browser.get(self.url)
        self.wait_for_state(lambda s: s != "loading", timeout=10)

    def wait_for_state(self, accept, timeout: float) -> str:
        return WebDriverWait(self.browser, timeout).until(lambda b: accept(self.state()) and self.state())

    def state(self) -> str:
        return self.browser.find_element(By.TAG_NAME, "body").get_attribute("data-state")

    def text(self, element_id: str) -> str:
        return self.browser.find_element(By.ID, element_id).text

    def shown(self, element_id: str) -> bool:
        return self.browser.find_element(By.ID, element_id).is_displayed()

    def js(self, script: str):
        return self.browser.execute_script(script)


@pytest.fixture
def site(browser: WebDriver, server_root: tuple[Path, str]) -> Iterator[Site]:
    """A fresh folder with the page; afterwards, the page must have logged no error but a 404 we caused."""
    root, base = server_root
    folder = root / uuid.uuid4().hex
    folder.mkdir()
    shutil.copy(PAGE, folder / "index.html")
    yield Site(folder, f"{base}/{folder.name}/index.html", browser)
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert [m for m in errors if "current.json - Failed to load resource" not in m] == []


# ---------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------
def test_shows_the_dashboard_figures(site: Site, tmp_path: Path) -> None:
    dash = dashboard(utc_now())
    site.publish(dash)
    site.open()

    assert site.state() == "ok"
    est, counts, privacy = dash.estimate, dash.counts, dash.privacy
    assert (site.text("mean"), site.text("ci-low"), site.text("ci-high")) == (
        pct(est.mean), pct(est.ci95_low), pct(est.ci95_high)
    )
    assert site.text("members") == str(est.members)
    assert site.text("std-err") == num(est.standard_error)
    for key in ("fresh", "stale", "rejected", "legacy"):
        assert site.text(key) == str(getattr(counts, key)), key
    reasons = site.js(
        "return [...document.querySelectorAll('#rejected-reasons li')].map(li => [li.dataset.reason, +li.dataset.count])"
    )
    assert dict(reasons) == counts.rejected_by_reason
    assert site.text("epsilon") == f"{num(privacy.epsilon_min)} – {num(privacy.epsilon_max)}"
    assert site.text("noise-scale") == f"{num(privacy.noise_scale_min)} – {num(privacy.noise_scale_max)}"
    assert site.text("privacy-unit") == num(privacy.privacy_unit_s)
    assert site.text("mechanisms") == "laplace (5)"
    assert re.fullmatch(r"updated (just now|\d+ s ago)", site.text("updated"))
    assert not site.shown("stale-warning") and not site.shown("status-message") and not site.shown("load-error")

    shot = Path(os.environ.get("CPU_TRACKER_SCREENSHOT") or tmp_path / "dashboard.png").resolve()
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert site.browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


@pytest.mark.parametrize("range_key", ["hour", "day", "month"])
def test_chart_draws_each_figure_once_and_breaks_at_gaps(site: Site, range_key: str) -> None:
    dash = dashboard(utc_now())
    site.publish(dash)
    site.open()
    site.browser.find_element(By.CSS_SELECTOR, f"[data-range='{range_key}']").click()

    runs = expected_runs(dash, range_key)
    assert len(runs) >= 3  # the fixture really has gaps in every range
    pressed = site.js("return [...document.querySelectorAll('[data-range]')].map(b => b.getAttribute('aria-pressed'))")
    assert pressed == [str(k == range_key).lower() for k in RANGES]
    drawn_t = site.js("return [...document.querySelectorAll('#chart .point')].map(p => +p.dataset.t)")
    assert drawn_t == [t for run in runs for t in run]  # one point per figure; none for null means
    vertices = site.js(
        "return [...document.querySelectorAll('#chart .line')].map(p => p.getAttribute('d').split(/[ML]/).length - 1)"
    )
    assert vertices == [len(run) for run in runs]  # the line breaks exactly at each gap
    assert f"{len(drawn_t)} figures" in site.browser.find_element(By.ID, "chart").get_attribute("aria-label")


def test_hour_range_keeps_a_lone_figure_between_gaps(site: Site) -> None:
    dash = dashboard(utc_now())
    site.publish(dash)
    site.open()
    lone = [run for run in expected_runs(dash, "hour") if len(run) == 1]
    assert len(lone) == 1
    assert site.js("return [...document.querySelectorAll('#chart .point.lone')].map(p => +p.dataset.t)") == lone[0]


def test_too_few_members_says_so(site: Site) -> None:
    dash = dashboard(utc_now(), enough_members=False)
    site.publish(dash)
    site.open()

    assert site.state() == "too_few_members"
    assert site.shown("status-message")
    assert site.text("status-message") == dash.message  # inserted as text: the markup shows verbatim
    assert not site.browser.find_elements(By.CSS_SELECTOR, "#status-message b")
    assert (site.text("mean"), site.text("epsilon"), site.text("privacy-unit")) == ("—",) * 3
    assert site.shown("no-figure") and not site.shown("estimate-detail")
    assert (site.text("fresh"), site.text("stale"), site.text("rejected")) == ("2", "2", "3")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "current.json could not be loaded (HTTP 404)"),
        (b"", "current.json is empty"),
        (b'{"kind": "cpu_tracker.curr', "current.json is not valid JSON"),
        (b'{"cpu": 34.3}', "current.json is not a CPU tracker file"),
    ],
    ids=["missing", "empty", "truncated", "foreign"],
)
def test_unreadable_dashboard_says_so(site: Site, content: bytes | None, says: str) -> None:
    if content is not None:
        site.publish(content)
    site.open()

    assert site.state() == "unavailable"
    assert site.text("status-message").startswith(says)
    assert not site.shown("content")


def test_old_dashboard_is_flagged_stale(site: Site) -> None:
    site.publish(dashboard(utc_now() - timedelta(minutes=10)))
    site.open()

    assert site.text("updated") == "updated 10 min ago"
    assert site.shown("stale-warning") and site.text("stale-warning").startswith("Stale")


def test_page_refetches_the_dashboard(site: Site) -> None:
    site.open()
    assert site.state() == "unavailable"
    dash = dashboard(utc_now())
    site.publish(dash)

    assert site.wait_for_state(lambda s: s == "ok", timeout=15) == "ok"
    assert site.text("mean") == pct(dash.estimate.mean)


def test_shows_the_private_alerts_and_hides_them_when_none_run(site: Site) -> None:
    from shared.wire.schema import AlertState

    dash = dashboard(utc_now())
    site.publish(dash)
    site.open()
    assert not site.shown("alerts-card")  # no monitor: no card
    alert = AlertState(monitor="cpu_high", kind="mean", threshold=90, margin=5, window=45, state="firing",
                       firing=True, since=utc_now(), violation_rounds_used=1, violation_rounds=4, epsilon=20,
                       epsilon_spent=7.5, members=5, estimate=93.1, message="mean CPU above 90% <b>now</b>")
    site.publish(dash.model_copy(update={"alerts": [alert], "generated_at": utc_now()}))
    site.open()
    assert site.shown("alerts-card")
    items = site.js("return [...document.querySelectorAll('#alerts li')].map(li => [li.dataset.monitor, "
                    "li.dataset.state, li.textContent])")
    assert [i[:2] for i in items] == [["cpu_high", "firing"]]
    assert "FIRING" in items[0][2] and "violation rounds 1 of 4" in items[0][2] and "<b>now</b>" in items[0][2]


def test_shows_the_secure_round_beside_the_local_figure(site: Site) -> None:
    from shared.privacy import Interval
    from shared.wire.schema import SecureFigure, SecureRoundStatus

    now = utc_now()
    sec = SecureFigure(
        epoch=3, round=88_000_000, round_start=now - timedelta(seconds=40), round_end=now - timedelta(seconds=20),
        cohort=12, survivors=11, mean=41.234, standard_error=0.71, ci95_low=39.8, ci95_high=42.66,
        percentiles={"p50": Interval(estimate=35.0, low=30.0, high=40.0), "p90": Interval(estimate=80.0, low=70.0, high=90.0),
                     "p99": Interval(estimate=95.0, low=85.0, high=100.0)},
        share_above=Interval(estimate=0.125, low=0.0, high=0.3), unit="cpu_window", unit_words="a member's whole window",
        epsilon=1.25, delta=0.0, noise="distributed discrete Laplace", method="secure aggregation",
        recent=[SecureRoundStatus(round=87_999_999, round_end=now - timedelta(seconds=40), status="refused",
                                  survivors=2, reason="2 of 12 members uploaded")],
    )
    dash = dashboard(now).model_copy(update={"secure": sec})
    site.publish(dash)
    site.open()
    assert site.shown("secure-card") and site.shown("estimate-detail")  # both figures during a migration
    assert (site.text("secure-mean"), site.text("secure-ci-low"), site.text("secure-ci-high")) == (
        pct(sec.mean), pct(sec.ci95_low), pct(sec.ci95_high))
    assert (site.text("secure-survivors"), site.text("secure-cohort")) == ("11", "12")
    assert site.text("secure-p90") == "80 % (70–90)"
    assert site.text("secure-above") == "12.5 % (0–30)"
    assert site.text("secure-unit") == "a member's whole window" and site.text("secure-epsilon") == "1.25"
    assert "refused (2 of 12 members uploaded)" in site.text("secure-recent")


def test_no_secure_card_in_local_mode(site: Site) -> None:
    site.publish(dashboard(utc_now()))
    site.open()
    assert not site.shown("secure-card")


def secure_figure(now: datetime, survivors: int = 5, cohort: int = 5, too_small=("p50", "p99")):
    from shared.privacy import Interval
    from shared.wire.schema import SecureFigure, SecureRoundStatus

    return SecureFigure(
        epoch=2, round=90_000_000, round_start=now - timedelta(seconds=40), round_end=now - timedelta(seconds=20),
        cohort=cohort, survivors=survivors, mean=52.734, standard_error=1.125, ci95_low=50.53, ci95_high=54.94,
        percentiles={"p50": Interval(estimate=10.833, low=0.0, high=100.0),
                     "p90": Interval(estimate=80.0, low=55.0, high=95.0),
                     "p99": Interval(estimate=97.0, low=5.0, high=100.0)},
        share_above=Interval(estimate=0.2, low=0.0, high=0.6), cohort_too_small_for=list(too_small),
        unit="cpu_window", unit_words="a member's whole window", epsilon=1.25, delta=0.0,
        noise="distributed discrete Laplace", method="secure aggregation", min_survivors=4, false_refusal=1e-6,
        recent=[SecureRoundStatus(round=89_999_999, round_end=now - timedelta(seconds=40), status="published",
                                  survivors=5)],
    )


def secure_only(now: datetime, *, lead: str | None = "secure") -> Dashboard:
    """A network in secure mode: no local report at all, the secure round's figures in the history."""
    sec = secure_figure(now)
    return Dashboard(
        app_version="0.1.0", generated_at=now, status="too_few_members", lead=lead, secure=sec,
        message="Network CPU 52.7 % (test)." if lead else "No current figure: the latest secure round (test).",
        counts=Counts(fresh=0, stale=0, rejected=0, legacy=0), privacy=PrivacySummary(),
        settings=AggregatorSettings(tick_s=TICK_S, stale_after_s=60, min_members=3),
        history=history(int(now.timestamp())),
    )


def test_a_secure_only_network_leads_with_the_secure_round(site: Site, tmp_path: Path) -> None:
    """The headline, the members, the privacy and the chart are the secure round's; nothing says "too few members"
    or "Counted 0"; a percentile whose interval spans the whole range says the cohort is too small for it."""
    dash = secure_only(utc_now())
    sec = dash.secure
    site.publish(dash)
    site.open()

    assert site.state() == "ok" and site.js("return document.body.dataset.lead") == "secure"
    assert not site.shown("status-message") and not site.shown("no-figure") and site.shown("estimate-detail")
    assert (site.text("mean"), site.text("ci-low"), site.text("ci-high")) == (
        pct(sec.mean), pct(sec.ci95_low), pct(sec.ci95_high))
    assert site.text("members") == "5 of 5" and f"secure round {sec.round}" in site.text("estimate-detail")
    assert site.text("std-err") == num(sec.standard_error)
    assert site.shown("secure-members") and not site.shown("local-members")
    assert (site.text("secure-counted"), site.text("secure-cohort-size")) == ("5", "5")
    assert "at least 4" in site.text("min-members")
    assert site.shown("privacy-secure") and not site.shown("privacy-local")
    assert site.text("secure-privacy-epsilon") == "1.25" and site.text("secure-privacy-unit") == sec.unit_words
    assert site.text("secure-privacy-noise") == "distributed discrete Laplace"
    assert site.shown("secure-card") and not site.shown("secure-headline")  # the mean is the headline's
    assert site.text("secure-p50") == "cohort too small for it" == site.text("secure-p99")
    assert site.text("secure-p90") == "80 % (55–95)" and site.text("secure-above") == "20 % (0–60)"
    assert site.text("legend-line") == "Network average (secure rounds)"
    drawn = site.js("return [...document.querySelectorAll('#chart .point')].map(p => +p.dataset.t)")
    assert drawn == [t for run in expected_runs(dash, "hour") for t in run] and drawn
    page = site.browser.find_element(By.TAG_NAME, "body").text
    assert "too few members" not in page and "Counted" not in page and "10.8" not in page and "No figure" not in page

    shot = Path(os.environ.get("CPU_TRACKER_SECURE_SCREENSHOT") or tmp_path / "secure.png").resolve()
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert site.browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_a_secure_round_that_is_no_longer_recent_is_not_shown_as_the_figure(site: Site) -> None:
    dash = secure_only(utc_now(), lead=None)
    site.publish(dash)
    site.open()

    assert site.state() == "too_few_members" and site.js("return document.body.dataset.lead") == "none"
    assert site.text("status-message") == dash.message
    assert site.shown("no-figure") and site.text("no-figure") == "No figure for now: no recent secure round."
    assert site.shown("secure-card") and site.shown("secure-headline")  # the last round, for what it was
    assert site.shown("privacy-local") and not site.shown("secure-members")


def test_local_leads_beside_a_secure_round_during_a_migration(site: Site) -> None:
    """An aggregator before `lead` existed (or local leading): the local estimate is the headline, the secure card
    beside it keeps its own mean; the members and privacy cards are local."""
    now = utc_now()
    dash = dashboard(now).model_copy(update={"secure": secure_figure(now, too_small=())})
    site.publish(dash)
    site.open()
    assert site.js("return document.body.dataset.lead") == "local"
    assert site.text("mean") == pct(dash.estimate.mean) and site.text("members") == str(dash.estimate.members)
    assert site.shown("secure-headline") and site.text("secure-p50") == "10.833 % (0–100)"
    assert site.shown("local-members") and not site.shown("secure-members") and site.shown("privacy-local")
