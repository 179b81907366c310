"""Private alerts: the safe-zone monitor (shared/safezone.py) against the naive private monitor, on CPU traces.

Both watch f(average of the members' local vectors) against T with the same lifetime epsilon (for one window mean
of a member's sliding window of K window means). The naive monitor releases every member's noisy vector every
round and spends epsilon_round each time: its lifetime is epsilon / epsilon_round rounds, and we give it the
smallest epsilon_round at which it still classifies >= 99 % of rounds correctly (searched on a grid, same trace):
the fair comparison at equal epsilon and equal accuracy. The safe-zone monitor spends only at violation rounds and
lives until b of them are used (or the trace ends: then its lifetime is at least that, marked >=).

The geometry (ball, state, thresholds, budget split, lifecycle) is the project's code; the per-round noise is
drawn with numpy here (a simulation of millions of draws: diffprivlib's mechanisms would take hours; the
probabilities are the same formulas, ``shared.safezone.outside_probability`` vectorised). Fixed seeds.

Traces, as window means in percent (one per member per round):
- ``real``: the committed recording (tests/bench/data/cpu_trace_real.csv, 0.1 s samples), in 2 s window means,
  each member a random circular shift of it, tiled;
- ``crossings``: the fleet alternates between a low (~35 %) and a high (~97 %) load, phases of ~1,500 rounds on
  average, with a per-member offset and AR(1) noise: the mean crosses T = 90 % at every change of phase;
- ``imbalance``: balanced phases (every member ~50 %) and imbalanced ones (half ~15 %, half ~85 %: standard
  deviation ~35 points), for the imbalance monitor (T = 30 points).
"""

from __future__ import annotations

import math
import time

import numpy as np
from scipy.special import expit

from shared import safezone as sz
from shared.safezone import Lifecycle, MonitorSpec
from tests.bench.common import Result, Row
from tests.bench.record_trace import DEFAULT as REAL_TRACE, load

SEED = 20261202
MEMBERS = 20
GOAL_RATIO, GOAL_CORRECT = 100.0, 0.99
MEAN = sz.NODE_CPU_HIGH_USAGE  # T = 90 %, m = 5, K = 45, epsilon 20, b = 4: the default monitor
IMB = MonitorSpec(name="cpu_imbalance", kind="imbalance", threshold=30, margin=5, window=45, epsilon=200,
                  violations=4)


# ---------------------------------------------------------------------------------------------------
# Traces: window means[rounds, members], percent
# ---------------------------------------------------------------------------------------------------
def trace(kind: str, rounds: int, n: int, rng: np.random.Generator, real: np.ndarray) -> np.ndarray:
    if kind.startswith("real"):
        w = real[: len(real) // 20 * 20].reshape(-1, 20).mean(axis=1)  # 2 s window means
        if kind == "real_shifted":  # independent machines: each a random circular shift of the recording
            shifts = rng.integers(0, len(w), n)
            return w[(np.arange(rounds)[:, None] + shifts[None, :]) % len(w)]
        # a load-balanced fleet: every member follows the recording, a few windows apart, with its own noise
        shifts = rng.integers(0, 3, n)
        x = w[(np.arange(rounds)[:, None] + shifts[None, :]) % len(w)] + rng.normal(0, 3, (rounds, n))
        return np.clip(x, 0, 100)
    if kind in ("rare", "imbalance"):  # an event of ~200 rounds (about an hour at 20 s) every ~10,000 (~2 days)
        phases = _events(rounds, 10_000, 200, rng)
    elif kind == "quiet":  # the same fleet without any event
        phases = np.zeros(rounds, dtype=bool)
    else:
        phases = _phases(rounds, 1500, rng)
    ar = np.zeros((rounds, n))
    eps = rng.normal(0, 4, (rounds, n))
    for t in range(1, rounds):
        ar[t] = 0.8 * ar[t - 1] + eps[t]
    if kind in ("crossings", "rare", "quiet"):  # busy machines are steady near 100 %: the noise shrinks with the headroom
        level = np.where(phases, 98.0, 35.0)[:, None] + rng.normal(0, 1, n)[None, :]
        return np.clip(level + ar * np.minimum(1.0, (100.0 - level) / 20.0), 0, 100)
    if kind == "imbalance":
        side = np.where(np.arange(n) % 2 == 0, -1.0, 1.0)
        level = 50.0 + np.where(phases, 38.0, 0.0)[:, None] * side[None, :]
        return np.clip(level + ar * 0.5, 0, 100)
    raise ValueError(kind)


def _events(rounds: int, every: int, length: int, rng: np.random.Generator) -> np.ndarray:
    out, t = np.zeros(rounds, dtype=bool), int(rng.integers(every // 4, every))
    while t < rounds:
        out[t:t + length] = True
        t += length + int(rng.exponential(every))
    return out


def _phases(rounds: int, mean_len: float, rng: np.random.Generator) -> np.ndarray:
    out, t, on = np.zeros(rounds, dtype=bool), 0, False
    while t < rounds:
        length = max(50, int(rng.exponential(mean_len)))
        out[t:t + length] = on
        t, on = t + length, not on
    return out


def local_vectors(spec: MonitorSpec, windows: np.ndarray) -> np.ndarray:
    """V[t, i, :] for t >= K - 1: member i's vector over its last K window means (the member's local_vector)."""
    k = spec.window
    c = np.cumsum(np.vstack([np.zeros((1, windows.shape[1])), windows / 100.0]), axis=0)
    x = (c[k:] - c[:-k]) / k
    return x[..., None] if spec.kind == "mean" else np.stack([x, x * x], axis=-1)


def truth(spec: MonitorSpec, v: np.ndarray) -> np.ndarray:
    g = v.mean(axis=1)
    f = g[:, 0] if spec.kind == "mean" else g[:, 1] - g[:, 0] ** 2
    return f >= sz.thresholds(spec).hi


# ---------------------------------------------------------------------------------------------------
# The two monitors
# ---------------------------------------------------------------------------------------------------
def band(spec: MonitorSpec, v: np.ndarray) -> np.ndarray:
    """Rounds whose true f lies within the margin band (T - m <= f < T): either answer is tolerated there."""
    g = v.mean(axis=1)
    f = g[:, 0] if spec.kind == "mean" else g[:, 1] - g[:, 0] ** 2
    th = sz.thresholds(spec)
    return (f >= th.lo) & (f < th.hi)


def run_safezone(spec: MonitorSpec, v: np.ndarray, rng: np.random.Generator, balance: float = sz.BALANCE) -> dict:
    """Algorithms 1-5 over the trace: recovery one round after the violating round (the member's next window)."""
    rounds, n, _ = v.shape
    l1, l2 = sz.sensitivity(spec.kind, spec.window)
    s = sz.split(spec)
    pred = np.zeros(rounds, dtype=bool)
    life, t, end, exhausted, violations_true = Lifecycle(), 0, rounds, False, 0
    truth_v = truth(spec, v)
    while t < rounds:
        noisy = v[t] + rng.laplace(0, l1 / s.vector, v[t].shape)  # Algorithm 1 / recovery vectors
        a = sz.assign(spec, noisy)  # Algorithm 2
        life = life.on_collected(spec)
        firing = a.state == "firing"
        if life.phase == "exhausted":
            pred[t] = firing
            end, exhausted = t + 1, True
            break
        offset = np.array(sz.assign_offsets(a.centre, a.v_hat, noisy, balance))  # [n, d]
        r_hat = a.radius + rng.laplace(0, l2 / s.radius, n)  # Algorithm 3: radius, once per zone
        d = np.linalg.norm(v[t + 1:] - v[t][None] - offset[None], axis=-1)
        p = expit(s.check * (d - r_hat[None, :]) / (2 * l2))  # = outside_probability, every round
        hit = np.nonzero((rng.random(p.shape) < p).any(axis=1))[0]
        if not len(hit):
            pred[t:] = firing
            break
        tv = t + 1 + int(hit[0])
        pred[t:tv + 1] = firing
        violations_true += int(truth_v[tv] != firing)
        life = life.on_violation(spec)  # Algorithm 4
        t = tv + 1
    ok = pred[:end] == truth_v[:end]
    tolerated = ok | band(spec, v)[:end]
    return {"lifetime": end, "censored": not exhausted, "used": life.used, "correct": float(tolerated.mean()),
            "strict": float(ok.mean()),
            "fp": float((pred[:end] & ~truth_v[:end]).mean()), "fn": float((~pred[:end] & truth_v[:end]).mean()),
            "true_violations": violations_true, "rounds": end}


def naive_f(spec: MonitorSpec, v: np.ndarray, eps_round: float, rng: np.random.Generator) -> np.ndarray:
    """The naive monitor's f of the average of every member's vector, each released at ``eps_round``."""
    l1, _ = sz.sensitivity(spec.kind, spec.window)
    g = (v + rng.laplace(0, l1 / eps_round, v.shape)).mean(axis=1)
    return g[:, 0] if spec.kind == "mean" else g[:, 1] - g[:, 0] ** 2


def true_f(spec: MonitorSpec, v: np.ndarray) -> np.ndarray:
    g = v.mean(axis=1)
    return g[:, 0] if spec.kind == "mean" else g[:, 1] - g[:, 0] ** 2


def naive_lifetime(spec: MonitorSpec, v: np.ndarray, rng: np.random.Generator, contract: str) -> tuple[float, float]:
    """(lifetime in rounds, accuracy) of the naive monitor at the smallest epsilon per round (geometric grid) that
    still meets ``contract`` in >= 99 % of rounds: ``margin``, its estimate of f within the margin of the truth
    (the accuracy the safe zones are built for, whatever the trace); ``trace``, the right side of T on this trace
    (the easiest contract for it: rounds far from T are right even with large noise)."""
    th, f = sz.thresholds(spec), true_f(spec, v)
    tol = th.hi - th.lo
    for eps_round in np.geomspace(spec.epsilon / 1e5, spec.epsilon, 61):
        est = naive_f(spec, v, float(eps_round), rng)
        right = ((est >= th.mid) == (f >= th.hi)) | band(spec, v)
        ok = np.abs(est - f) <= tol if contract == "margin" else right
        if ok.mean() >= GOAL_CORRECT:
            return spec.epsilon / float(eps_round), float(right.mean())
    return 1.0, float((((naive_f(spec, v, spec.epsilon, rng) >= th.mid) == (f >= th.hi)) | band(spec, v)).mean())


# ---------------------------------------------------------------------------------------------------
SEEDS = 3


def run(ctx) -> Result:
    res = Result("safezone", "Private alerts: safe zones vs the naive private monitor")
    rounds = 20_000 if ctx.quick else 60_000
    real = np.clip(np.array(load(REAL_TRACE)[0]), 0, 100)
    runs = []

    def one(label: str, spec: MonitorSpec, kind: str) -> dict:
        """Median over SEEDS traces and noise draws (the lifetime hangs on when the first events come)."""
        started, per = time.perf_counter(), []
        for seed in range(SEEDS):
            r = np.random.default_rng([SEED, KINDS.index(kind), seed])
            v = local_vectors(spec, trace(kind, rounds + spec.window - 1, MEMBERS, r, real))
            out = run_safezone(spec, v, r)
            out["naive"], out["naive_correct"] = naive_lifetime(spec, v, r, "margin")
            out["naive_trace"], _ = naive_lifetime(spec, v, r, "trace")
            out["crossings"] = int(np.abs(np.diff(truth(spec, v).astype(int))).sum())
            per.append(out)
        med = sorted(per, key=lambda o: o["lifetime"])[len(per) // 2]
        row = {"label": label, "trace": kind, "monitor": spec.kind, "epsilon": spec.epsilon, "b": spec.violations,
               "margin": spec.margin, "lifetime": med["lifetime"], "censored": med["censored"],
               "lifetimes": [o["lifetime"] for o in per], "used": med["used"],
               "correct": min(o["correct"] for o in per), "strict": min(o["strict"] for o in per),
               "fp": max(o["fp"] for o in per), "fn": max(o["fn"] for o in per),
               "naive_lifetime": med["naive"], "naive_correct": med["naive_correct"],
               "naive_trace_lifetime": med["naive_trace"], "crossings": med["crossings"]}
        row["ratio"] = row["lifetime"] / row["naive_lifetime"]
        row["ratio_trace"] = row["lifetime"] / row["naive_trace_lifetime"]
        runs.append(row)
        ctx.log(f"safezone: {label:12s} {kind:12s} lifetime {'>=' if row['censored'] else ''}{row['lifetime']} "
                f"rounds (of {row['lifetimes']}), correct {100 * row['correct']:.2f} %; naive "
                f"{row['naive_lifetime']:.0f} "
                f"rounds (ratio {row['ratio']:.0f}); naive tuned to this trace {row['naive_trace_lifetime']:.0f} "
                f"(ratio {row['ratio_trace']:.1f}) ({time.perf_counter() - started:.1f} s)")
        return row

    main = [one("default", MEAN, kind) for kind in ("quiet", "rare", "crossings", "real_aligned", "real_shifted")]
    main.append(one("default", IMB, "imbalance"))
    one("epsilon 10", MEAN.model_copy(update={"epsilon": 10.0}), "quiet")
    for eps in (10, 40, 60, 100):
        one(f"epsilon {eps:g}", MEAN.model_copy(update={"epsilon": float(eps)}), "rare")
    for margin in (2, 10):
        one(f"margin {margin:g}", MEAN.model_copy(update={"margin": float(margin)}), "rare")
    for b in (2, 10):
        one(f"b {b}", MEAN.model_copy(update={"violations": b}), "rare")
    for r in main:
        res.rows += [
            Row(f"{r['monitor']} on {r['trace']}: lifetime at epsilon {r['epsilon']:g}, b = {r['b']}",
                float(r["lifetime"]), "rounds", "naive private monitor, same epsilon, estimate within m in 99 % of "
                "rounds", r["naive_lifetime"], f">= {GOAL_RATIO:g} x baseline", r["ratio"] >= GOAL_RATIO,
                ("(trace ended first: at least this) " if r["censored"] else "")
                + f"median of {r['lifetimes']}; {r['crossings']} true crossings in the median run; a naive monitor "
                f"tuned to this very trace lasts {r['naive_trace_lifetime']:.0f}"),
            Row(f"{r['monitor']} on {r['trace']}: rounds correctly classified", 100 * r["correct"], "%", "", None,
                f"> {100 * GOAL_CORRECT:g} %", r["correct"] > GOAL_CORRECT,
                f"worst of {SEEDS}; strict (no tolerance in the band) {100 * r['strict']:.2f} %; false positives "
                f"{100 * r['fp']:.2f} %, false negatives {100 * r['fn']:.2f} %"),
        ]
    res.tables.append(_table(runs))
    res.details = {"runs": runs, "members": MEMBERS, "rounds": rounds, "seeds": SEEDS}
    res.notes += [
        f"{MEMBERS} members, {rounds} rounds per run, {SEEDS} runs per line (median lifetime, worst accuracy), "
        f"K = {MEAN.window} window means per sliding window. Epsilon is the monitor's lifetime epsilon for one window "
        "mean of a member; the ledger is charged epsilon / n per second of activity (n = the window's whole seconds: "
        "20 at the default 20 s, so the default 20 costs 1 per second of activity, once, for the whole lifetime).",
        "Naive baseline: every round every member releases its vector with Laplace noise of scale Delta_1 / "
        "epsilon_round, and the lifetime at total epsilon is epsilon / epsilon_round rounds, at the smallest "
        "epsilon_round (geometric grid) whose estimate of f is within the margin m of the truth in >= 99 % of the "
        "rounds: the accuracy the safe zones are built to. 'Tuned to this trace' instead asks only for >= 99 % of "
        "rounds on the right side of T on that very trace (easy when the trace is far from T most of the time).",
        "Correct: the published state equals [f(true average) >= T] in that round, any answer being accepted while "
        "the truth lies in the margin band [T - m, T); strict counts those rounds too.",
        "Traces: quiet = a fleet at ~35 % (per-member AR(1) noise) and no event; rare = the same fleet with an event at ~98 % of ~200 rounds every ~10,000 (about an hour every two "
        "days at 20 s); crossings = phases of ~1,500 rounds; real_aligned = the committed recording, every member "
        "following it (its 90 s sliding mean hovers around T); real_shifted = members as independent random shifts of "
        "it (each member's sliding mean wanders from 33 % to 92 % while the fleet's stays near 70 %); imbalance = "
        "rare events where half the fleet goes to ~12 % and half to ~88 %.",
    ]
    return res


KINDS = ("rare", "crossings", "real_aligned", "real_shifted", "imbalance", "quiet")


def _table(runs: list[dict]) -> str:
    lines = ["| run | trace | monitor | epsilon | b | margin | lifetime (rounds, median) | correct (worst) | strict "
             "| FP | FN | naive lifetime | ratio | naive tuned to the trace | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['label']} | {r['trace']} | {r['monitor']} | {r['epsilon']:g} | {r['b']} | {r['margin']:g} "
                     f"| {'>=' if r['censored'] else ''}{r['lifetime']} | {100 * r['correct']:.2f} % | "
                     f"{100 * r['strict']:.2f} % | {100 * r['fp']:.2f} % | {100 * r['fn']:.2f} % | "
                     f"{r['naive_lifetime']:.0f} | {r['ratio']:.0f} | {r['naive_trace_lifetime']:.0f} | "
                     f"{r['ratio_trace']:.1f} |")
    return "\n".join(lines)
