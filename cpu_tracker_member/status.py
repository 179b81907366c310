"""``python -m cpu_tracker_member status``: what this machine published, next to its raw values (shown
locally only), the privacy budget spent and left, and what the guarantee means in plain words."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from cpu_tracker_member.monitor import composed_words
from shared.privacy.ledger import load_spends, spent_per_budget
from shared.paths import Paths
from shared.privacy import activity_epsilon, activity_units, budget_words, duration_words
from shared.settings import Settings, settings_warnings

WEAK = 10.0  # above this epsilon, say plainly that there is no meaningful protection


def guarantee_lines(settings: Settings) -> list[str]:
    """Plain-words meaning of the per-release epsilon for longer activity (group privacy + composition), in the
    fixed unit: one second of CPU activity."""
    eps, w = settings.epsilon, settings.interval_s
    spans = [("a brief spike", 0.0), ("1 second", 1.0), (f"one window ({duration_words(w)})", w),
             ("1 minute", 60.0), ("1 hour", 3600.0)]
    lines = [
        f"Each release is {eps:g}-differentially private for any one second of this machine's CPU activity "
        "(the privacy unit; no setting changes it).",
        "Longer activity costs epsilon once per second it lasts, summed over the releases it spans:",
    ]
    for name, seconds in spans:
        e = activity_epsilon(seconds, epsilon=eps)
        verdict = "no meaningful protection" if e > WEAK else "weak protection" if e > 1 else "well protected"
        lines.append(f"  activity lasting {name:<24} ({activity_units(seconds):>5} s): epsilon <= {e:<9g} {verdict}")
    lines.append("So a brief spike is hidden; the load of a whole window or hour is not, beyond the +-noise.")
    return lines


def budget_lines(spends, settings: Settings, now: datetime) -> list[str]:
    """Each budget in words, with what the last span of its length spent (fixed unit, old lines converted)."""
    out = []
    for b, spent in spent_per_budget(spends, settings.budgets, now):
        where = "at this instant" if b.horizon_s == 0 else f"in the last {duration_words(b.horizon_s)}"
        out.append(f"  Budget {budget_words(b)}: {spent:.6g} spent {where}, {max(0.0, b.epsilon - spent):.6g} left.")
    return out


def status_text(paths: Paths, settings: Settings, now: datetime, recent: int = 10) -> str:
    out = [f"cpu_tracker member status for {paths.email} at {now.isoformat(timespec='seconds')}", ""]
    spends = load_spends(paths.ledger_file)
    out.append(f"Releases in the ledger ({paths.ledger_file}): {len(spends)}. Epsilon is counted per second of "
               "CPU activity.")
    out += budget_lines(spends, settings, now)
    if composed := composed_words(settings, spends, now - timedelta(days=1), now):
        out.append(f"  In the last day, {composed}.")
    out += [f"  {w}" for w in settings_warnings(settings)]
    out += ["", f"Recent windows (raw values are private: {paths.raw_file}, never synced):",
            f"  {'window end (UTC)':<26}{'raw mean':>10}{'published':>11}"]
    rows = []
    if paths.raw_file.exists():
        rows = [json.loads(line) for line in paths.raw_file.read_text().splitlines()[-recent:] if line.strip()]
    for r in rows:
        out.append(f"  {r['window_end'][:26]:<26}{r['raw_mean']:>10.2f}{r['released']:>11.2f}")
    if not rows:
        out.append("  (nothing published yet)")
    out += ["", *(guarantee_lines(settings) if settings.mode == "local" else secure_lines(paths, settings, spends))]
    return "\n".join(out)


def secure_lines(paths: Paths, settings: Settings, spends) -> list[str]:
    """Secure mode in plain words: what the aggregator receives, the unit and epsilon, the epoch seen."""
    from cpu_tracker_member.secure import MAX_EPOCH_BYTES
    from shared.atomic import read_regular
    from shared.wire.secure_schema import UNIT_WORDS, Epoch

    lines = [f"Mode: secure. The aggregator receives only masked round files and learns the cohort's noisy sum; each "
             f"round protects {UNIT_WORDS[settings.secure_unit]} at epsilon {settings.secure_target:g} at most "
             f"(secure_unit, secure_epsilon){' per UTC day, delta ' + format(settings.secure_delta, 'g') if settings.secure_unit == 'cpu_day' else ''}."]
    try:
        epoch = Epoch.model_validate_json(read_regular(paths.epoch_file(settings.aggregator), MAX_EPOCH_BYTES))
        listed = paths.email in epoch.cohort
        lines.append(f"Epoch {epoch.epoch} from {epoch.aggregator}: {len(epoch.cohort)} members, rounds "
                     f"{epoch.first_round}-{epoch.last_round()}, at least {epoch.min_survivors} survivors; this "
                     f"datasite is {'listed' if listed else 'not listed (enrolled at the next epoch)'}.")
    except (OSError, ValueError) as e:
        lines.append(f"No valid epoch file from the aggregator yet ({type(e).__name__}).")
    secure = [sp for sp in spends if sp.mechanism.startswith("secure")]
    lines.append(f"Secure releases in the ledger: {len(secure)}"
                 + (f", the latest for the window ending {secure[-1].window_end.isoformat(timespec='seconds')}." if secure else "."))
    return lines
