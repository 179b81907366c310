"""``python -m cpu_tracker_member status``: what this machine published, next to its raw values (shown
locally only), the privacy budget spent and left, and what the guarantee means in plain words."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from shared.ledger import load_spends, spent_in_span
from shared.paths import Paths
from shared.privacy import activity_epsilon, samples_touched
from shared.settings import Settings


def guarantee_lines(settings: Settings) -> list[str]:
    """Plain-words meaning of the per-release epsilon for longer activity (group privacy + composition)."""
    eps, w = settings.epsilon, settings.sample_period_s
    spans = [("one sample", 0.0), ("1 second", 1.0), ("1 minute", 60.0),
             (f"one window ({settings.interval_s:g} s)", settings.interval_s), ("1 hour", 3600.0)]
    lines = [
        f"Each release is {eps:g}-differentially private for one CPU sample ({w:g} s of activity).",
        "Longer activity touches more samples, and each touched sample costs epsilon once:",
    ]
    for name, seconds in spans:
        e = activity_epsilon(seconds, epsilon=eps, sample_period_s=w)
        lines.append(f"  activity lasting {name:<22} touches <= {samples_touched(seconds, w):>6} samples: "
                     f"epsilon <= {e:g}{'  (no meaningful protection)' if e > 10 else ''}")
    lines.append("So a brief spike is hidden; the load of a whole window or hour is not, beyond the +-noise.")
    return lines


def status_text(paths: Paths, settings: Settings, now: datetime, recent: int = 10) -> str:
    out = [f"cpu_tracker member status for {paths.email} at {now.isoformat(timespec='seconds')}", ""]
    spends = load_spends(paths.ledger_file)
    out.append(f"Releases in the ledger ({paths.ledger_file}): {len(spends)}")
    for b in settings.budgets:
        spent = spent_in_span(spends, now - timedelta(seconds=b.horizon_s), now)
        out.append(f"  budget {b.epsilon:g} per {b.horizon_s:g} s span: spent {spent:.4g} in the last span, "
                   f"{max(0.0, b.epsilon - spent):.4g} left")
    out += ["", f"Recent windows (raw values are private: {paths.raw_file}, never synced):",
            f"  {'window end (UTC)':<26}{'raw mean':>10}{'published':>11}"]
    rows = []
    if paths.raw_file.exists():
        rows = [json.loads(line) for line in paths.raw_file.read_text().splitlines()[-recent:] if line.strip()]
    for r in rows:
        out.append(f"  {r['window_end'][:26]:<26}{r['raw_mean']:>10.2f}{r['released']:>11.2f}")
    if not rows:
        out.append("  (nothing published yet)")
    out += ["", *guarantee_lines(settings)]
    return "\n".join(out)
