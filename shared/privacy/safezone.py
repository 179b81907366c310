"""Private threshold alerts that last for weeks: safe zones (Friedman, Sharfman, Keren & Schuster, "Privacy-
Preserving Distributed Stream Monitoring", NDSS 2014). Pure functions, no I/O; noise only in the ``draw_*``
functions (diffprivlib's mechanisms: a cryptographic RNG unless a ``random_state`` is given, in tests only).

A monitor watches f(v) against a threshold T, where v is the average over members of their local statistics
vectors v_i (fractions in [0, 1], from the member's sliding window of K window means):

- ``mean``:      v_i = (x_i,),        f(v) = v[0]            (linear: mean CPU over the sliding window)
- ``imbalance``: v_i = (x_i, x_i^2),  f(v) = v[1] - v[0]^2   (non-linear: the variance of the members' CPU;
                 T and m are given as a standard deviation in percent and compared as variances)

Geometric monitoring: member i keeps its own vector at the last synchronisation, v_i(t0), and checks its drift
u_i(t) = v^ + v_i(t) - v_i(t0) (v^: the coordinator's estimate at t0) against a ball B(c_i, r) inside the
admissible region A. The u_i average to v(t) + (v^ - v(t0)): if every u_i is in its ball and the centres average
to c, the average is in B(c, r), a convex subset of A, so the global condition holds up to the estimate's noise
(which the margin m absorbs). Only a member whose drift leaves its zone speaks; the silent rounds are protected
by the sparse-vector argument (Dwork & Roth 2014, Thm 3.23, with logistic instead of Laplace query noise):

- Algorithm 1 (node initialisation, ``draw_vector``): v_i + Laplace(Delta_1 / eps_v) per component.
- Algorithm 2 (coordinator initialisation, ``assign``): v^ = mean of the noisy vectors; the state by threshold
  flipping (``decide_state``); the largest ball inside A that contains v^ (``fit_ball``); per-member centres from
  the drift (``assign_offsets``: they average to the ball's centre).
- Algorithm 3 (local monitoring, ``draw_radius`` + ``draw_outside``): once per zone, r^_i = r + Laplace(Delta_2 /
  eps_r); every round, the exponential mechanism over {inside, outside} with utility +-(d - r^_i) (fresh noise
  each round), d = ||v_i(t) - v_i(t0) - o_i||.
- Algorithm 4 (violation recovery, ``Lifecycle``): a reported violation opens a violation round: every member
  sends a fresh noisy vector, Algorithm 2 runs again; after b violation rounds the monitor is exhausted and stops.
- Algorithm 5 (budget, ``Split`` + ``Account``): eps_v = eps / 3(b + 1) per vector (the initial one and one per
  violation round), eps_r = eps_c = eps / 3b per zone (radius and check). At most b zones and b + 1 vectors:
  b (eps/3b + eps/3b) + (b + 1) eps/3(b + 1) = eps over the monitor's whole lifetime, whatever its length.

Privacy unit: one window mean of the member's sliding window (``interval_s`` seconds of activity). Changing one
window mean by anything moves x_i by at most 1/K and x_i^2 by at most 2/K (|a^2 - b^2| <= |a - b| |a + b|), so
Delta_1 = 1/K (mean) or 3/K (imbalance) and Delta_2 = 1/K or sqrt(5)/K. The drift d has the same Delta_2: a window
inside both v_i(t) and v_i(t0) moves x_i by the same amount in both (it cancels) and x_i^2 by 2 (x_t - x_0) delta
<= 2/K. A change of one *second* changes at most two window means by a total of 100 / interval_s points, less
than one window's worth, so the same epsilon also bounds the loss for any one second of activity (the ledger's
unit). In the sparse-vector proof the radius is the noisy threshold (Laplace(Delta_2 / eps_r): eps_r) and the
check's logistic noise of scale 2 Delta_2 / eps_c pays eps_c for the one "outside" answer a zone can give.

What a member spends in that unit, the cap on all monitors together and the day unit's composition: the Spending
section below (docs/alerts.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.privacy.ledger import BudgetExceeded, worst_span
from shared.privacy import CPU_BOUNDS

Kind = Literal["mean", "imbalance"]
State = Literal["ok", "firing"]
BALANCE = 0.5  # how far each member's centre follows its own position (assign_offsets)


class MonitorSpec(BaseModel):
    """One monitor as the aggregator's settings declare it (``[[monitors]]`` in cpu_tracker.toml)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,39}$", description="Label in files and metrics: [a-z][a-z0-9_]*.")
    kind: Kind = Field(default="mean", description="mean: mean CPU over the sliding window; imbalance: standard "
                       "deviation of the members' CPU (compared as a variance).")
    threshold: float = Field(default=90.0, gt=0, lt=100, description="T in percent (mean) or percentage points of "
                             "standard deviation (imbalance).")
    margin: float = Field(default=5.0, gt=0, lt=50, description="Error margin m, in the threshold's unit: the alert "
                          "fires when f crosses T and clears once f falls below T - m (hysteresis).")
    window: int = Field(default=45, ge=1, le=10_000, description="K: window means in the sliding window (45 at "
                        "20 s: 15 minutes).")
    epsilon: float = Field(default=20.0, gt=0, le=1000, description="Epsilon of the monitor's whole lifetime, for one "
                           "window mean of the member (interval_s seconds of activity).")
    violations: int = Field(default=4, ge=1, le=1000, description="b: violation rounds before the monitor is "
                            "exhausted and stops.")
    lifetime_days: float = Field(default=30.0, gt=0, le=366, description="The monitor stops after this long even "
                                 "with violation rounds left: its spends are charged up to its end.")

    @model_validator(mode="after")
    def _check(self) -> "MonitorSpec":
        if self.kind == "imbalance" and self.threshold >= 50:
            raise ValueError(f"an imbalance threshold is a standard deviation of CPU percent, at most 50 (half the "
                             f"members at 0 %, half at 100 %), got threshold={self.threshold:g}")
        if not 0 < self.threshold - self.margin:
            raise ValueError(f"threshold - margin must be above 0, got threshold={self.threshold:g} "
                             f"margin={self.margin:g}")
        return self


def parse_monitors(tables: Sequence[object]) -> tuple[list[MonitorSpec], list[str]]:
    """The valid monitors of the ``monitors`` setting, and one sentence per refused table (naming it, the key, the
    value and what it must be). Duplicated names: the first one runs."""
    from pydantic import ValidationError

    specs, errors = [], []
    for i, table in enumerate(tables):
        label = f"monitors[{i}]" + (f" ({table.get('name')!r})" if isinstance(table, dict) and "name" in table else "")
        try:
            spec = MonitorSpec.model_validate(table)
        except ValidationError as e:
            why = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'the table'}: {err['msg']} (got "
                            f"{err.get('input')!r})" for err in e.errors(include_url=False))
            errors.append(f"{label} is refused and does not run: {why}")
            continue
        if any(s.name == spec.name for s in specs):
            errors.append(f"{label} is refused and does not run: the name {spec.name!r} is already used")
            continue
        specs.append(spec)
    return specs, errors


# ---------------------------------------------------------------------------------------------------
# The statistics
# ---------------------------------------------------------------------------------------------------
def dims(kind: str) -> int:
    return {"mean": 1, "imbalance": 2}[kind]


def local_vector(kind: str, window_means_percent: Sequence[float]) -> np.ndarray:
    """The member's local statistics vector from its last K window means (percent, clipped to [0, 100])."""
    if not len(window_means_percent):
        raise ValueError("local_vector needs at least one window mean, got none")
    x = float(np.clip(np.asarray(window_means_percent, dtype=float), *CPU_BOUNDS).mean()) / 100.0
    return np.array([x]) if kind == "mean" else np.array([x, x * x])


def f_value(kind: str, v: Sequence[float]) -> float:
    """The monitored function of the global vector (fraction, or fraction squared for imbalance)."""
    return float(v[0]) if kind == "mean" else float(v[1] - v[0] ** 2)


def sensitivity(kind: str, window: int) -> tuple[float, float]:
    """(L1, L2) sensitivity of the local vector and of the drift distance, for one window mean."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got window={window}")
    return (1.0 / window, 1.0 / window) if kind == "mean" else (3.0 / window, math.sqrt(5.0) / window)


@dataclass(frozen=True)
class Thresholds:
    """In f's units. The margin band is [T - m, T]: ``hi`` = T bounds the ok zones (the alert fires when f crosses T,
    at the latest), ``lo`` = T - m bounds the firing zones (it clears once f falls below T - m, at the latest), and
    ``mid`` = T - m/2 decides the state at each synchronisation (``decide_state``)."""

    lo: float
    mid: float
    hi: float


def thresholds(spec: MonitorSpec) -> Thresholds:
    g = (lambda p: p / 100.0) if spec.kind == "mean" else (lambda p: (p / 100.0) ** 2)
    return Thresholds(g(spec.threshold - spec.margin), g(spec.threshold - spec.margin / 2), g(spec.threshold))


# ---------------------------------------------------------------------------------------------------
# Algorithm 5: the budget split and the member's account
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    epsilon: float
    violations: int

    @property
    def vector(self) -> float:
        """eps / 3(b + 1) per noisy vector: the initial one and one per violation round."""
        return self.epsilon / (3 * (self.violations + 1))

    @property
    def radius(self) -> float:
        """eps / 3b per zone for the perturbed radius."""
        return self.epsilon / (3 * self.violations)

    @property
    def check(self) -> float:
        """eps / 3b per zone for its checks (all its silent rounds and its one violation)."""
        return self.epsilon / (3 * self.violations)

    @property
    def zone(self) -> float:
        return self.radius + self.check


def split(spec: MonitorSpec) -> Split:
    return Split(spec.epsilon, spec.violations)


@dataclass(frozen=True)
class Account:
    """What one member has spent on one monitor: it never sends more than b + 1 vectors or opens more than b
    zones, whatever the aggregator asks (so it never overspends the monitor's epsilon)."""

    vectors: int = 0
    zones: int = 0

    def can_send_vector(self, s: Split) -> bool:
        return self.vectors < s.violations + 1

    def can_open_zone(self, s: Split) -> bool:
        return self.zones < s.violations

    def spent(self, s: Split) -> float:
        return self.vectors * s.vector + self.zones * s.zone


# ---------------------------------------------------------------------------------------------------
# Algorithm 1 and 3: the member's noise
# ---------------------------------------------------------------------------------------------------
def draw_vector(v: Sequence[float], *, epsilon: float, l1: float, random_state=None) -> list[float]:
    """Algorithm 1: the vector with Laplace noise of scale l1 / epsilon on each component (the Laplace mechanism
    for L1 sensitivity l1, Dwork & Roth Thm 3.6). Unbiased, not clamped."""
    from diffprivlib.mechanisms import Laplace

    _positive(epsilon=epsilon, l1=l1)
    mech = Laplace(epsilon=epsilon, sensitivity=l1, random_state=random_state)
    return [float(mech.randomise(float(x))) for x in v]


def draw_radius(radius: float, *, epsilon: float, l2: float, random_state=None) -> float:
    """Algorithm 3, once per zone: the radius with Laplace noise of scale l2 / epsilon (the noisy threshold)."""
    from diffprivlib.mechanisms import Laplace

    _positive(epsilon=epsilon, l2=l2)
    return float(Laplace(epsilon=epsilon, sensitivity=l2, random_state=random_state).randomise(float(radius)))


def outside_probability(distance: float, noisy_radius: float, *, epsilon: float, l2: float) -> float:
    """The exponential mechanism's probability of answering "outside": utilities u(outside) = d - r^ and
    u(inside) = r^ - d with sensitivity 2 l2 (the distance moves by l2, the noisy threshold is shifted by l2 in
    the sparse-vector proof), so P(outside) = 1 / (1 + exp(-eps (d - r^) / 2 l2))."""
    _positive(epsilon=epsilon, l2=l2)
    z = epsilon * (distance - noisy_radius) / (2 * l2)
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def draw_outside(distance: float, noisy_radius: float, *, epsilon: float, l2: float, random_state=None) -> bool:
    """Algorithm 3, every round: one draw of diffprivlib's exponential mechanism over {inside, outside}."""
    from diffprivlib.mechanisms import Exponential

    _positive(epsilon=epsilon, l2=l2)
    u = float(distance - noisy_radius)
    mech = Exponential(epsilon=epsilon, sensitivity=2 * l2, utility=[-u, u], candidates=["inside", "outside"],
                       random_state=random_state)
    return mech.randomise() == "outside"


def drift_distance(v_now: Sequence[float], v_ref: Sequence[float], offset: Sequence[float]) -> float:
    """d = ||v_i(t) - v_i(t0) - o_i||: the member's drift against its zone's centre (in drift space)."""
    return float(np.linalg.norm(np.asarray(v_now, float) - np.asarray(v_ref, float) - np.asarray(offset, float)))


# ---------------------------------------------------------------------------------------------------
# Algorithm 2: the coordinator's zones
# ---------------------------------------------------------------------------------------------------
def decide_state(kind: str, v_hat: Sequence[float], th: Thresholds) -> State:
    """Threshold flipping with margins: firing when f(v^) >= T - m/2, else ok, so that v^ lies at least m/2 inside
    its new zone whatever the estimate (no zone is ever empty). The next zones watch the opposite crossing: f rising
    above T (ok) or falling below T - m (firing)."""
    return "firing" if f_value(kind, v_hat) >= th.mid else "ok"


def region_distance(kind: str, state: str, tau: float, p: Sequence[float]) -> tuple[float, np.ndarray]:
    """Signed distance from ``p`` to the boundary of the admissible region (positive inside) and the nearest
    boundary point. ok: A = {f <= tau}; firing: A = {f >= tau}."""
    p = np.asarray(p, dtype=float)
    if kind == "mean":
        dist = tau - p[0] if state == "ok" else p[0] - tau
        return float(dist), np.array([tau])
    # boundary y = x^2 + tau; nearest point: d/dx [(x - a)^2 + (x^2 + tau - b)^2] = 0, a cubic in x
    a, b = float(p[0]), float(p[1])
    roots = np.roots([2.0, 0.0, 1.0 + 2.0 * tau - 2.0 * b, -a])
    xs = roots[np.abs(roots.imag) < 1e-9].real
    pts = np.stack([xs, xs**2 + tau], axis=1)
    k = int(np.argmin(np.linalg.norm(pts - p, axis=1)))
    dist = float(np.linalg.norm(pts[k] - p))
    inside = (b - a * a <= tau) if state == "ok" else (b - a * a >= tau)
    return (dist if inside else -dist), pts[k]


R_MAX = 10.0  # the largest radius used: ten times the reach of any drift, so a half-space is a ball in effect


def fit_ball(kind: str, state: str, tau: float, v_hat: Sequence[float]) -> tuple[np.ndarray, float]:
    """The largest ball inside A that contains v^, with its centre on the normal from v^'s nearest boundary point:
    it touches the boundary where v^ is closest and grows away from it while it stays inside A, up to radius
    R_MAX (a member's drift never leaves the box v^ + [-1, 1]^d, so beyond that a ball is as good as the
    half-space it approximates). Cases worked by hand: a half-space (mean) gives the radius R_MAX ball tangent at
    tau; below the parabola (imbalance, ok) the same, tangent at the nearest point (the parabola curves away);
    above it (imbalance, firing) the ball stops at the curvature, e.g. radius 1/2 at the vertex."""
    v = np.asarray(v_hat, dtype=float)
    r0, nearest = region_distance(kind, state, tau, v)
    if r0 <= 0:
        raise ValueError(f"the global vector {v.tolist()} is not inside the {state} region of tau={tau:g}")
    if r0 >= R_MAX:
        return v, R_MAX
    n = (v - nearest) / r0
    if kind == "mean":
        n = np.array([-1.0 if state == "ok" else 1.0])

    def fits(t: float) -> bool:
        return region_distance(kind, state, tau, v + t * n)[0] >= (r0 + t) * (1 - 1e-12)

    t_lo, t_hi = 0.0, R_MAX - r0
    if fits(t_hi):
        t_lo = t_hi
    else:
        for _ in range(80):  # bisection: the fit is monotone along the normal for both regions
            mid = (t_lo + t_hi) / 2
            t_lo, t_hi = (mid, t_hi) if fits(mid) else (t_lo, mid)
    return v + t_lo * n, r0 + t_lo


def assign_offsets(centre: Sequence[float], v_hat: Sequence[float], noisy_vectors: Sequence[Sequence[float]],
                   balance: float = BALANCE) -> list[np.ndarray]:
    """Per-member centres from the drift, as offsets o_i (member i's centre in drift space is v^ + o_i, and it
    checks ||v_i(t) - v_i(t0) - o_i|| against the radius): o_i = (c - v^) + balance (v^ - v~_i), with v~_i its
    noisy vector (post-processing of a release: free). A member below the average gets its ball moved towards
    the places it can still drift to, one above it away from them; the shifts sum to zero because v^ is the mean
    of the v~_i, so the centres always average to the ball's centre c, which is what the convexity argument
    needs. ``balance`` 0: every member has the ball's own centre; 1: every member checks its own vector (less its
    noise) against the ball."""
    if not len(noisy_vectors):
        raise ValueError("assign_offsets needs at least one noisy vector, got none")
    if not 0 <= balance <= 1:
        raise ValueError(f"balance must be in [0, 1], got balance={balance}")
    v = np.asarray(v_hat, dtype=float)
    base = np.asarray(centre, dtype=float) - v
    return [base + balance * (v - np.asarray(x, dtype=float)) for x in noisy_vectors]


@dataclass(frozen=True)
class Assignment:
    """What Algorithm 2 decides from one round of noisy vectors."""

    state: State
    v_hat: tuple[float, ...]
    f_hat: float
    centre: tuple[float, ...]
    radius: float


def assign(spec: MonitorSpec, noisy_vectors: Sequence[Sequence[float]]) -> Assignment:
    """Algorithm 2 (and the recomputation of Algorithm 4): global estimate, state, ball."""
    if not len(noisy_vectors):
        raise ValueError("assign needs at least one noisy vector, got none")
    v_hat = np.asarray(noisy_vectors, dtype=float).mean(axis=0)
    th = thresholds(spec)
    state = decide_state(spec.kind, v_hat, th)
    tau = th.hi if state == "ok" else th.lo
    centre, radius = fit_ball(spec.kind, state, tau, v_hat)
    return Assignment(state, tuple(map(float, v_hat)), f_value(spec.kind, v_hat), tuple(map(float, centre)),
                      float(radius))


# ---------------------------------------------------------------------------------------------------
# Algorithm 4: the coordinator's lifecycle
# ---------------------------------------------------------------------------------------------------
Phase = Literal["collecting", "monitoring", "exhausted"]


@dataclass(frozen=True)
class Lifecycle:
    """Epoch j counts synchronisations (0: initialisation); ``used`` the violation rounds of b spent."""

    epoch: int = 0
    phase: Phase = "collecting"
    used: int = 0

    def on_violation(self, spec: MonitorSpec) -> "Lifecycle":
        """A member reported leaving its zone of this epoch: a violation round starts (fresh vectors)."""
        if self.phase != "monitoring":
            raise ValueError(f"a violation is only possible while monitoring, not while {self.phase}")
        return Lifecycle(self.epoch + 1, "collecting", self.used + 1)

    def on_collected(self, spec: MonitorSpec) -> "Lifecycle":
        """The vectors of this epoch are in: zones are assigned, unless b violation rounds are used up."""
        if self.phase != "collecting":
            raise ValueError(f"vectors are only collected while collecting, not while {self.phase}")
        return Lifecycle(self.epoch, "exhausted" if self.used >= spec.violations else "monitoring", self.used)


# ---------------------------------------------------------------------------------------------------
# Spending: what a member pays for a monitor, in the ledger's unit (one second of activity)
# ---------------------------------------------------------------------------------------------------
SPEND_PREFIX = "safezone_"
VECTOR_SPEND, ZONE_SPEND = "safezone_vector", "safezone_zone"


def spend_mechanism(what: str, monitor: str, instance: str) -> str:
    """A ledger line's mechanism: ``safezone_vector`` or ``safezone_zone``, the monitor's name and an instance id
    drawn once per vector or zone. The lines of one zone (its reference, then one per window its checks use) share
    the id: together they are one sparse-vector instance, whose epsilon counts once on any span they touch."""
    if what not in (VECTOR_SPEND, ZONE_SPEND):
        raise ValueError(f"what must be {VECTOR_SPEND!r} or {ZONE_SPEND!r}, got what={what!r}")
    return f"{what}:{monitor}:{instance}"


WINDOW_JITTER_S = 0.1  # secure rounds end on UTC boundaries: a 20 s window may measure 19.99 s by the wall clock


@dataclass(frozen=True)
class WindowMean:
    """One window mean of the member with the times it covers (Unix seconds, [start, end)) and its whole seconds
    (its sensitivity for one second of activity is 1 / seconds of a window's worth). A window up to WINDOW_JITTER_S
    short of a whole second counts it (0.5 % of a spend at 20 s, less than the secure release's own 1 s grace)."""

    start: float
    end: float
    mean: float

    @property
    def seconds(self) -> int:
        return math.floor(self.end - self.start + WINDOW_JITTER_S)


def usable_windows(windows: Sequence[WindowMean], k: int, *, seconds: int,
                   interval_s: float) -> list[WindowMean] | None:
    """The last ``k`` windows, if one vector or check may use them together, else None: each covers at least
    ``seconds`` whole seconds (the sensitivity its spend is charged for), they follow each other in time, and the
    gaps between them add up to at most one window (``interval_s``: a quick restart), so they are the last
    (k + 1) windows of activity at most: never stale windows from before a long stop."""
    if k < 1 or seconds < 1:
        raise ValueError(f"need k >= 1 and seconds >= 1, got k={k}, seconds={seconds}")
    if len(windows) < k:
        return None
    used = [windows[i] for i in range(len(windows) - k, len(windows))]  # a deque has no slices
    if any(w.seconds < seconds for w in used):
        return None
    gaps = 0.0
    for before, after in zip(used, used[1:]):
        if after.start < before.end - 1e-6:
            return None
        gaps += after.start - before.end
    return used if gaps <= interval_s + 1e-6 else None


def is_monitor_spend(spend) -> bool:
    return spend.mechanism.startswith(SPEND_PREFIX)


def monitor_rows(spends: Sequence, *, leave_out: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, epsilons in the ledger's unit) of the monitors' spends, one row per vector or zone: the lines
    of one zone (same mechanism) become one row over their whole span, counted once. Lines without an instance id
    (older ledgers: one line per spend) are one row each. ``leave_out``: a mechanism whose lines are skipped."""
    groups: dict[object, list[float]] = {}
    for i, s in enumerate(spends):
        if not is_monitor_spend(s) or s.mechanism == leave_out:
            continue
        start, end = s.window_start.timestamp(), s.window_end.timestamp()
        key = s.mechanism if ":" in s.mechanism else i
        row = groups.get(key)
        if row is None:
            groups[key] = [start, end, s.epsilon]
        else:
            row[0], row[1], row[2] = min(row[0], start), max(row[1], end), max(row[2], s.epsilon)
    arr = np.array(list(groups.values()), dtype=float).reshape(-1, 3)
    return arr[:, 0], arr[:, 1], arr[:, 2]


def heaviest_span(starts: np.ndarray, ends: np.ndarray, eps: np.ndarray, horizon_s: float) -> float:
    """The most epsilon that the rows ([start, end), half-open) touching one closed span [t, t + H] add up to, over
    every t: the ledger's rolling-budget arithmetic (``shared.privacy.ledger.worst_span``) taken over all spans, not
    only those touching the last row. The maximum is reached with t just below some row's end e (slide t up to the
    earliest end inside: nothing leaves), where the span holds the rows with end >= e and start < e + H."""
    if not len(starts):
        return 0.0
    order_e, order_s = np.argsort(ends, kind="stable"), np.argsort(starts, kind="stable")
    suffix_e = np.concatenate([np.cumsum(eps[order_e][::-1])[::-1], [0.0]])
    suffix_s = np.concatenate([np.cumsum(eps[order_s][::-1])[::-1], [0.0]])
    at = ends[order_e]
    with_end = suffix_e[np.searchsorted(at, at, side="left")]
    started_late = suffix_s[np.searchsorted(starts[order_s], at + horizon_s, side="left")]
    return float((with_end - started_late).max())


class MonitorCapExceeded(BudgetExceeded):
    """A monitor spend that the member's own cap on all monitors together refuses (``monitor_budgets``)."""

    def __init__(self, spent: float, cap: float, horizon_s: float):
        where = "one instant" if horizon_s == 0 else f"one span of {horizon_s:g} s"
        RuntimeError.__init__(self, f"monitor spend skipped: with it, the private alerts together would spend "
                              f"{spent:.4g} epsilon (per second of activity) on {where}, over this member's "
                              f"monitor_budgets cap of {cap:g}")
        self.spent, self.cap, self.horizon_s = spent, cap, horizon_s


def cap_check(budgets: Sequence) -> Callable[[Sequence, object], None]:
    """The ledger's further check (``Ledger.admit(..., also=...)``, run under its lock) for a monitor spend: with it,
    the monitors' spends together (every name and generation; each vector and each zone counted once, see
    ``monitor_rows``) touching any span of ``budget.horizon_s`` stay within ``budget.epsilon``, for each budget.
    Only spans that touch the new line are checked: the others did not change."""

    def check(recorded: Sequence, new) -> None:
        if not is_monitor_spend(new):
            return
        starts, ends, eps = monitor_rows(recorded, leave_out=new.mechanism if ":" in new.mechanism else None)
        own = max((s.epsilon for s in recorded if s.mechanism == new.mechanism), default=new.epsilon)
        # the new line stands for its whole vector or zone: counted once, on the spans it touches
        starts = np.append(starts, new.window_start.timestamp())
        ends = np.append(ends, new.window_end.timestamp())
        eps = np.append(eps, max(own, new.epsilon))
        for b in budgets:
            spent = worst_span(starts, ends, eps, b.horizon_s)
            if spent > b.epsilon * (1 + 1e-9):
                raise MonitorCapExceeded(spent, b.epsilon, b.horizon_s)

    return check


def day_epsilon(spends: Sequence, day_start: datetime, day_end: datetime) -> float:
    """The epsilon of the monitors' spends for one member's whole activity in [day_start, day_end) (the ``cpu_day``
    unit), composed by addition (basic composition: add it to the day's other releases). A line charged e per second
    on S seconds of the day costs S e by group privacy (a vector over K windows of n seconds: K n eps_v / n =
    K eps_v, which is also what its sensitivity gives: a whole-day change moves x by at most 1 = K Delta_1). A zone
    costs the least of that sum over its lines and twice its first line's: whatever the day does, each check's
    distance moves by at most |dv(t)| + |dv(t0)| <= 2 (mean; 2 sqrt(2) < 2 sqrt(5) for imbalance), 2K times the
    Delta_2 its noise is calibrated for, and its first line covers its K reference windows and one more."""
    lo, hi = day_start.timestamp(), day_end.timestamp()
    zones: dict[str, list[float]] = {}
    total = 0.0
    for s in spends:
        if not is_monitor_spend(s):
            continue
        start, end = s.window_start.timestamp(), s.window_end.timestamp()
        inside = max(0.0, min(end, hi) - max(start, lo))
        if not s.mechanism.startswith(ZONE_SPEND + ":"):
            total += math.ceil(inside - 1e-9) * s.epsilon
            continue
        z = zones.setdefault(s.mechanism, [0.0, math.inf, 0.0])  # [sum in the day, first line's start, its bound]
        z[0] += math.ceil(inside - 1e-9) * s.epsilon
        if start < z[1]:
            z[1], z[2] = start, 2 * math.ceil(end - start - 1e-9) * s.epsilon
    return total + sum(min(z[0], z[2]) for z in zones.values() if z[0] > 0)


def _positive(**values: float) -> None:
    for name, value in values.items():
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be finite and > 0, got {name}={value}")
