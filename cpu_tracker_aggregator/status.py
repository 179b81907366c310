"""``python -m cpu_tracker_aggregator status``: the dashboard's picture in a terminal."""

from __future__ import annotations

from pathlib import Path

from cpu_tracker_aggregator.publish import read_history

BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float | None], lo: float = 0.0, hi: float = 100.0) -> str:
    """One character per value, ' ' for a gap (no figure)."""
    span = max(hi - lo, 1e-9)
    return "".join(
        " " if v is None else BARS[min(len(BARS) - 1, max(0, int((v - lo) / span * len(BARS))))] for v in values
    )


def status_text(public_dir: Path, width: int = 60) -> str:
    """The network figure and the last hour, read from the public folder as any reader would."""
    try:
        dash, history = read_history(public_dir)
    except FileNotFoundError:
        return f"No figure published yet in {public_dir}: is the aggregator running?"
    c = dash.counts
    lines = [f"cpu_tracker network status at {dash.generated_at.isoformat(timespec='seconds')}", dash.message]
    if dash.estimate:
        e = dash.estimate
        lines.append(f"  mean {e.mean:.2f} %   95 % interval [{e.ci95_low:.2f}, {e.ci95_high:.2f}]   "
                     f"standard error {e.standard_error:.3f}")
    lines.append(f"  members: {c.fresh} fresh, {c.stale} stale, {c.rejected} rejected, {c.legacy} legacy")
    for reason, n in c.rejected_by_reason.items():
        lines.append(f"    rejected {n} x {reason}")
    p = dash.privacy
    if p.epsilon_max is not None:
        lines.append(f"  privacy: epsilon {p.epsilon_min:g}-{p.epsilon_max:g} per release for one "
                     f"{p.privacy_unit_s:g} s of activity; noise scale {p.noise_scale_min:.3g}-{p.noise_scale_max:.3g}")
    for a in getattr(dash, "alerts", None) or []:
        since = f" since {a.since.isoformat(timespec='seconds')}" if a.since else ""
        lines.append(f"  alert {a.monitor}: {a.state.upper()}{since} ({a.message}); violation rounds "
                     f"{a.violation_rounds_used} of {a.violation_rounds}, epsilon {a.epsilon_spent:.3g} of "
                     f"{a.epsilon:g} spent")
    r = history.recent
    last_hour = [m for t, m in zip(r.t, r.mean) if t >= (r.t[-1] if r.t else 0) - 3600]
    step = max(1, len(last_hour) // width)
    lines.append(f"  last hour: |{sparkline(last_hour[::step][-width:])}|")
    return "\n".join(lines)
