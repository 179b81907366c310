"""``python -m cpu_tracker_aggregator status``: the dashboard's picture in a terminal."""

from __future__ import annotations

from pathlib import Path

from cpu_tracker_aggregator.publish import read_history
from shared.wire.schema import SecureFigure

BARS = "▁▂▃▄▅▆▇█"
TOO_SMALL = "cohort too small for it"


def sparkline(values: list[float | None], lo: float = 0.0, hi: float = 100.0) -> str:
    """One character per value, ' ' for a gap (no figure)."""
    span = max(hi - lo, 1e-9)
    return "".join(
        " " if v is None else BARS[min(len(BARS) - 1, max(0, int((v - lo) / span * len(BARS))))] for v in values
    )


def fleet_figure(sec: SecureFigure, name: str) -> str:
    """A fleet percentile (or the share above the threshold) with its interval, or why there is none."""
    iv = sec.share_above if name == "share_above" else sec.percentiles.get(name)
    if iv is None:
        return "—"
    if name in sec.cohort_too_small_for:
        return TOO_SMALL
    k = 100 if name == "share_above" else 1
    return f"{iv.estimate * k:.1f} % ({iv.low * k:.1f}-{iv.high * k:.1f})"


def secure_lines(sec: SecureFigure, leads: bool) -> list[str]:
    """The secure round's figure: the network's figure when it ``leads``, else a line beside the local one."""
    head = (f"  mean {sec.mean:.2f} %   95 % interval [{sec.ci95_low:.2f}, {sec.ci95_high:.2f}]   standard error "
            f"{sec.standard_error:.3f}   (secure round {sec.round}, ended {sec.round_end:%H:%M:%S} UTC)")
    needs = f"; a round needs {sec.min_survivors}" if sec.min_survivors else ""
    lines = [head if leads else "  secure round (not the network's figure now):" + head[1:],
             f"  members: {sec.survivors} of {sec.cohort} in the round's sum{needs}",
             f"  privacy: epsilon {sec.epsilon:.3g} per {sec.unit_words}"
             + (f", delta {sec.delta:g}" if sec.delta else "") + f"; {sec.noise} noise, only the noisy sum is seen",
             "  fleet: " + "   ".join(f"{q} {fleet_figure(sec, q)}" for q in ("p50", "p90", "p99"))
             + f"   above {sec.threshold:g} %: {fleet_figure(sec, 'share_above')}"]
    if sec.recent:
        lines.append("  latest rounds: " + ", ".join(f"{r.round} {r.status}" for r in sec.recent[-6:]))
    return lines


def status_text(public_dir: Path, width: int = 60) -> str:
    """The network figure and the last hour, read from the public folder as any reader would; a secure round's
    figure first when it is the network's (``lead``)."""
    try:
        dash, history = read_history(public_dir)
    except FileNotFoundError:
        return f"No figure published yet in {public_dir}: is the aggregator running?"
    c = dash.counts
    lines = [f"cpu_tracker network status at {dash.generated_at.isoformat(timespec='seconds')}", dash.message]
    secure_leads = dash.lead == "secure" and dash.secure is not None
    if secure_leads:
        lines += secure_lines(dash.secure, True)
    if dash.estimate:
        e = dash.estimate
        lines.append(f"  {'local reports: ' if secure_leads else ''}mean {e.mean:.2f} %   95 % interval "
                     f"[{e.ci95_low:.2f}, {e.ci95_high:.2f}]   standard error {e.standard_error:.3f}")
    if not secure_leads or c.fresh + c.stale + c.rejected + c.legacy:
        lines.append(f"  {'local reports' if secure_leads else 'members'}: {c.fresh} fresh, {c.stale} stale, "
                     f"{c.rejected} rejected, {c.legacy} legacy")
    for reason, n in c.rejected_by_reason.items():
        lines.append(f"    rejected {n} x {reason}")
    p = dash.privacy
    if p.epsilon_max is not None:
        lines.append(f"  privacy: epsilon {p.epsilon_min:g}-{p.epsilon_max:g} per release for one "
                     f"{p.privacy_unit_s:g} s of activity; noise scale {p.noise_scale_min:.3g}-{p.noise_scale_max:.3g}")
    if dash.secure is not None and not secure_leads:
        lines += secure_lines(dash.secure, False)
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
