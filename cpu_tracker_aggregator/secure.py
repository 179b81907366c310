"""The aggregator's side of secure aggregation: epochs, closing rounds, unmasking, and the secure figure.

Per round r (the UTC window [r * w, (r + 1) * w)): at (r + 1) * w + deadline_s the uploads seen are the
survivors; fewer than ``min_survivors`` and the round is refused (the inbox says so and nobody reveals anything).
Otherwise each member's inbox lists survivors and dropped members with the shares sealed for it; the members'
next uploads carry their reveals; once every survivor's self-mask seed can be rebuilt and every mask with a
dropped member removed, the sum is unmasked, checked for plausibility and published. A round still incomplete
``reveal_rounds`` rounds later fails, naming what was missing. Late uploads for a closed round are refused.
"""

from __future__ import annotations

import base64
import logging
import math
import os
import secrets
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Mapping

import numpy as np
from pydantic import ValidationError

from shared import secagg
from cpu_tracker_aggregator.reader import open_datasites, read_report, signature
from shared.atomic import atomic_write_bytes, read_capped, write_if_changed
from shared.logs import Problems
from shared.paths import Paths, is_datasite_email
from shared.permissions import ensure_permissions
from shared.schema import SecureFigure, SecureRoundStatus
from shared.secnoise import (
    calibrate,
    epsilon_of,
    fleet_estimate,
    fleet_mean,
    mean_standard_error,
    noise_sd,
    release_event,
)
from shared.secure_schema import (
    UNIT_WORDS,
    CohortMember,
    Epoch,
    Inbox,
    InboxRound,
    Reveal,
    SecureKey,
    SecureUpload,
    b64_bytes,
    mean_sensitivity_for,
    noise_family_for,
    releases_for,
)
from shared.settings import Settings

log = logging.getLogger("cpu_tracker.aggregator")
MAX_MEMBER_FILE_BYTES = 1 << 18  # a round file is about 3 KB at 1,000 members, at most tens of KB
ABSENT_ROUNDS = 3  # a member missing from this many closed rounds in a row is left out of the next epoch
MEAN_FRACTION = 0.8  # of each release's epsilon, on the mean coordinate; the rest on the histogram
RECENT = 12
PLAUSIBLE_SIGMAS = 6.0
NOISE_WORDS = {"dlaplace": "distributed discrete Laplace", "dgaussian": "distributed discrete Gaussian"}


# ---------------------------------------------------------------------------------------------------
# Pure steps
# ---------------------------------------------------------------------------------------------------
def scale_for(unit: str, units_per_window: int) -> int:
    """Integers per point: 1 for the window and day units; for one second of a window of n seconds, enough that the
    per-second sensitivity 100 * scale / n is about 10 steps (so rounding it up costs little)."""
    return 1 if unit != "cpu_second" else max(1, math.ceil(units_per_window / 10))


def plan_epoch(number: int, keys: Mapping[str, str], settings: Settings, aggregator: str, first_round: int,
               created_at: datetime) -> Epoch:
    """A new epoch for the members in ``keys`` (email -> base64 public key) with the aggregator's settings."""
    cohort = sorted(keys)
    n = len(cohort)
    degree = secagg.graph_degree(n)
    threshold = secagg.shamir_threshold(degree)
    min_survivors = min(n, max(settings.min_cohort, math.ceil(settings.min_survivor_fraction * n - 1e-9),
                               threshold + 1))
    unit, w = settings.secure_unit, settings.interval_s
    units = settings.samples_per_window
    scale = scale_for(unit, units)
    family = noise_family_for(unit)
    delta = settings.secure_delta if family == "dgaussian" else 0.0
    noise = calibrate(family=family, epsilon=settings.secure_target, delta=delta,
                      mean_sensitivity=mean_sensitivity_for(unit, scale, units), releases=releases_for(unit, w),
                      mean_fraction=MEAN_FRACTION, shares_for=secagg.lying_floor(n, degree))
    return Epoch(
        epoch=number, created_at=created_at, aggregator=aggregator,
        salt=base64.b64encode(secrets.token_bytes(16)).decode(), window_s=w, first_round=first_round,
        rounds=max(10, math.ceil(3600 / w)), deadline_s=min(0.5 * w, 60.0), reveal_rounds=3,
        cohort=[CohortMember(email=e, x25519=keys[e]) for e in cohort],
        neighbours=secagg.neighbour_graph(cohort, degree), threshold=threshold, min_survivors=min_survivors,
        scale=scale, bins=settings.secure_bins, units_per_window=units, unit=unit,
        epsilon=settings.secure_target, delta=delta, noise=noise,
    )


def upload_problem(upload: SecureUpload, epoch: Epoch, member: str, round_: int) -> str | None:
    """Why an upload cannot count for ``member`` in ``round_`` (None: it counts)."""
    if upload.email != member:
        return f"it names {upload.email}"
    if upload.epoch != epoch.epoch or upload.round != round_:
        return f"it is for epoch {upload.epoch} round {upload.round}"
    if not upload.vector:
        return "it carries reveals only (its member was out of budget)"
    if set(upload.sealed) != set(epoch.neighbours[member]):
        return "its sealed shares are not addressed to exactly its neighbours"
    try:
        secagg.decode_vector(upload.vector, epoch.dim)
    except ValueError as e:
        return str(e)
    return None


def missing_for_unmask(epoch: Epoch, survivors: list[str], dropped: list[str],
                       reveals: Mapping[str, Reveal]) -> list[str]:
    """What is still missing before the round can be unmasked (empty: it can)."""
    missing = []
    for i in survivors:
        have = sum(1 for j in epoch.neighbours[i] if j in reveals and i in reveals[j].shares)
        if have < epoch.threshold:
            missing.append(f"{epoch.threshold - have} more shares of {i}'s self-mask seed")
    gone = set(dropped)
    for d in dropped:
        for i in epoch.neighbours[d]:
            if i not in gone and (i not in reveals or d not in reveals[i].keys):
                missing.append(f"{i}'s round key with dropped {d}")
    return missing


def unmask(epoch: Epoch, vectors: Mapping[str, np.ndarray], dropped: list[str],
           reveals: Mapping[str, Reveal]) -> np.ndarray:
    """The survivors' noisy sum: every self mask and every mask with a dropped member removed (int64)."""
    survivors = list(vectors)
    shares = [[secagg.unpack_share(b64_bytes(reveals[j].shares[i]))
               for j in epoch.neighbours[i] if j in reveals and i in reveals[j].shares] for i in survivors]
    seeds = dict(zip(survivors, secagg.combine_seeds(shares, epoch.threshold)))  # one vectorised pass
    keys = [(i, d, b64_bytes(reveals[i].keys[d])) for d in dropped for i in epoch.neighbours[d] if i in vectors]
    return secagg.unmask_sum(vectors, seeds, keys)


def implausible(total: np.ndarray, epoch: Epoch, survivors: int) -> str | None:
    """Why an unmasked sum cannot come from ``survivors`` honest members (None: it can). A member may add anything
    within the modulus; this refuses a sum outside the range its members' values and the noise allow (6 standard
    deviations, a false refusal about once in 10^8 rounds), a histogram whose counts do not add up to the survivors,
    and a mean coordinate that disagrees with the histogram by more than half a bin plus the noise."""
    sd_mean, sd_hist = noise_sd(epoch.noise, survivors)
    z, top = PLAUSIBLE_SIGMAS, (epoch.bounds[1] - epoch.bounds[0]) * epoch.scale * survivors
    m, hist = float(total[0]), total[1:].astype(float)
    if not -z * sd_mean - survivors <= m <= top + z * sd_mean + survivors:
        return f"the mean coordinate {m:.0f} lies outside 0..{top:.0f} by more than the noise"
    if (hist < -z * sd_hist).any() or (hist > survivors + z * sd_hist).any():
        return "a histogram count lies outside 0..survivors by more than the noise"
    if abs(hist.sum() - survivors) > z * sd_hist * math.sqrt(epoch.bins):
        return f"the histogram counts add up to {hist.sum():.0f}, not about {survivors} survivors"
    edges = epoch.bin_edges()
    centres = np.array([(a + b) / 2 for a, b in zip(edges, edges[1:])])
    width = edges[1] - edges[0]
    hist_mean = float(centres @ hist) / survivors
    spread = z * math.sqrt((sd_mean / epoch.scale) ** 2 + (sd_hist ** 2) * float(centres @ centres)) / survivors
    if abs(m / epoch.scale / survivors - hist_mean) > width / 2 + spread + 1.0 / epoch.scale:
        return (f"the mean coordinate ({m / epoch.scale / survivors:.1f} points) disagrees with the histogram "
                f"({hist_mean:.1f})")
    return None


def secure_figure(epoch: Epoch, round_: int, total: np.ndarray, survivors: int,
                  recent: list[SecureRoundStatus]) -> SecureFigure:
    """The published figure of one unmasked round: the mean with its 95 % interval (``secnoise.fleet_mean``: the
    noise's exact spread plus the stochastic rounding's), the fleet percentiles and the share above 90 %."""
    se = mean_standard_error(epoch.noise, survivors, epoch.scale)
    mean = fleet_mean(int(total[0]), spec=epoch.noise, survivors=survivors, scale=epoch.scale)
    fleet = fleet_estimate([int(v) for v in total[1:]], spec=epoch.noise, survivors=survivors,
                           edges=epoch.bin_edges(), threshold=90.0)
    start, end = epoch.window(round_)
    eps = epsilon_of([release_event(epoch.noise, survivors)] * releases_for(epoch.unit, epoch.window_s), epoch.delta)
    return SecureFigure(
        epoch=epoch.epoch, round=round_, round_start=_utc(start), round_end=_utc(end), cohort=len(epoch.cohort),
        survivors=survivors, mean=mean.estimate, standard_error=se, ci95_low=mean.low, ci95_high=mean.high,
        percentiles={q: getattr(fleet, q) for q in ("p50", "p90", "p99")}, share_above=fleet.share_above, threshold=90.0, unit=epoch.unit,
        unit_words=UNIT_WORDS[epoch.unit], epsilon=eps, delta=epoch.delta, noise=NOISE_WORDS[epoch.noise.family],
        method=f"secure aggregation (pairwise and self masks, Shamir-shared seeds) of {survivors} members' quantized "
               f"window means with {NOISE_WORDS[epoch.noise.family]} noise shares; interval from the noise's "
               "distribution",
        recent=recent[-RECENT:],
    )


def _utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, timezone.utc)


# ---------------------------------------------------------------------------------------------------
# I/O
# ---------------------------------------------------------------------------------------------------
@dataclass
class Round:
    epoch: Epoch
    number: int
    survivors: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    sealed: dict[str, dict[str, str]] = field(default_factory=dict)  # sender -> receiver -> sealed share
    reveals: dict[str, Reveal] = field(default_factory=dict)  # member -> its reveal for this round, once found
    status: str = "unmasking"  # or refused, then published | failed
    reason: str | None = None


@dataclass
class SecureAggregator:
    """Runs the epochs and rounds. All file I/O of the aggregator's secure mode lives here."""

    paths: Paths
    settings: Settings
    problems: Problems
    epoch: Epoch | None = None
    rounds: dict[int, Round] = field(default_factory=dict)
    figure: SecureFigure | None = None
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT))
    _absent: dict[str, int] = field(default_factory=dict)
    _excluded: set[str] = field(default_factory=set)
    _old: Epoch | None = None
    _files: dict[tuple[str, ...], tuple[tuple[int, int, int], object]] = field(default_factory=dict)
    _inbox_state: tuple | None = None
    _inboxes: dict[str, bytes] = field(default_factory=dict)

    def tick(self, now: datetime) -> bool:
        """One pass: epoch upkeep, close due rounds, unmask what can be. True when the figure changed."""
        before = self.figure
        w = self.settings.interval_s
        current = math.floor(now.timestamp() / w)  # the round whose window is open now
        self._epoch_upkeep(now, current)
        if self.epoch is None:
            return False
        for ep in (self._old, self.epoch):
            for r in range(max(ep.first_round, current - 3), min(current, ep.last_round() + 1)) if ep else ():
                if r not in self.rounds and now.timestamp() >= (r + 1) * w + ep.deadline_s:
                    self._close(ep, r)
        e = self.epoch
        for r in sorted(self.rounds):
            rnd = self.rounds[r]
            if rnd.status == "unmasking":
                self._try_unmask(rnd, current)
        oldest = current - 2 * (e.reveal_rounds + 2)
        for r in [r for r in self.rounds if r < oldest]:
            del self.rounds[r]
        for parts in [p for p in self._files if _upload_round(p) is not None and _upload_round(p) < oldest]:
            del self._files[parts]
        self._write_inboxes()
        return self.figure is not before

    # -- epochs ---------------------------------------------------------------------------------------
    def _keys(self) -> dict[str, str]:
        """Members that published a valid key (and are allowed by ``members``), email -> base64 key."""
        allowed = set(self.settings.members) if self.settings.members else None
        out = {}
        try:
            names = [p.name for p in self.paths.datasites.iterdir()]
        except OSError:
            return out
        for name in names:
            if not is_datasite_email(name) or (allowed is not None and name not in allowed):
                continue
            key = self._member_file(self.paths.secure_key_file(name), SecureKey, f"key-{name}")
            if key is not None and key.email == name:
                out[name] = key.x25519
        return out

    def _epoch_upkeep(self, now: datetime, current: int) -> None:
        """A new epoch when there is none, when the current one ends within two rounds (then members left out for
        being absent get another chance), when a member's key appears or changes, or when a member has been absent
        from ABSENT_ROUNDS rounds in a row. It starts two rounds ahead, so that members see it first."""
        e = self.epoch
        rollover = e is None or current + 2 > e.last_round()
        if rollover:
            self._excluded = set()
        self._excluded |= {m for m, n in self._absent.items() if n >= ABSENT_ROUNDS}
        keys = self._keys()
        wanted = {m: k for m, k in keys.items() if m not in self._excluded}
        listed = {m.email: m.x25519 for m in e.cohort} if e else {}
        if not rollover and wanted == listed:
            return
        if not rollover and e.first_round > current:
            return  # announced and not started: changes wait for its first round
        if len(wanted) < self.settings.min_cohort:
            self.problems.report("cohort", f"secure mode: {len(wanted)} members can take part (a published key, not "
                                 f"absent), fewer than min_cohort {self.settings.min_cohort}: no secure rounds until "
                                 "there are more", logging.INFO)
            return
        self.problems.clear("cohort")
        number = (e.epoch + 1) if e else self._next_number()
        first = current + 2
        try:
            epoch = plan_epoch(number, wanted, self.settings, self.paths.email, first, now)
            ensure_permissions(self.paths.epoch_dir(), self.paths.email, sorted(wanted))  # the cohort alone
            atomic_write_bytes(self.paths.epoch_file(), epoch.model_dump_json(indent=1).encode())
        except (OSError, ValueError) as ex:
            self.problems.report("epoch", f"secure mode: cannot publish epoch {number}: {ex}")
            return
        self.problems.clear("epoch")
        if e is not None:  # the old epoch ends where the new one begins; its rounds in flight finish
            self._old = e.model_copy(update={"rounds": max(1, first - e.first_round)})
            for rnd in self.rounds.values():
                if rnd.epoch.epoch == e.epoch:
                    rnd.epoch = self._old
        self.epoch = epoch
        self._absent = {}
        log.info("secure mode: epoch %d published: %d members, rounds from %d, threshold %d, at least %d survivors, "
                 "%s, epsilon %g per %s", number, len(wanted), first, epoch.threshold, epoch.min_survivors,
                 NOISE_WORDS[epoch.noise.family], epoch.epsilon, UNIT_WORDS[epoch.unit])

    def _next_number(self) -> int:
        """After a restart: one more than the epoch on disk, so that members never see a number go back."""
        raw = read_capped(self.paths.epoch_file())
        try:
            return Epoch.model_validate_json(raw).epoch + 1 if raw else 1
        except ValidationError:
            return 1

    # -- rounds ---------------------------------------------------------------------------------------
    def _read_upload(self, member: str, round_: int) -> SecureUpload | None:
        return self._member_file(self.paths.upload_file(round_, member), SecureUpload, f"upload-{member}")

    def _member_file(self, path, model, problem: str):
        """A file in a member's datasite, parsed with ``model``; None when absent, refused or invalid (logged once).
        Read with the roster's walk (``reader.read_report``: no symlink followed, size capped) and parsed again only
        when its stat signature changes, so a tick costs one ``lstat`` per file that did not."""
        parts = path.relative_to(self.paths.datasites).parts
        try:
            sig = signature(os.lstat(path))
        except OSError:
            self._files.pop(parts, None)
            return None
        hit = self._files.get(parts)
        if hit is not None and hit[0] == sig:
            return hit[1]
        ds = str(self.paths.datasites)
        ds_fd = open_datasites(ds)
        try:
            got = None if ds_fd < 0 else read_report(ds_fd, ds, parts, MAX_MEMBER_FILE_BYTES)
        finally:
            if ds_fd >= 0:
                os.close(ds_fd)
        parsed = None
        if got is not None and type(got.data) is not bytes:
            self.problems.report(problem, f"secure mode: {path} is refused ({got.data}): left out")
        elif got is not None:
            try:
                parsed = model.model_validate_json(got.data)
                self.problems.clear(problem)
            except ValidationError as e:
                self.problems.report(problem, f"secure mode: {path} is not valid and is left out "
                                     f"({e.errors()[0].get('msg')})")
        self._files[parts] = (sig, parsed)
        return parsed

    def _close(self, epoch: Epoch, r: int) -> None:
        rnd = Round(epoch, r)
        for m in epoch.emails():
            up = self._read_upload(m, r)
            problem = None if up is None else upload_problem(up, epoch, m, r)
            if up is not None and problem is None:
                rnd.vectors[m] = secagg.decode_vector(up.vector, epoch.dim)
                rnd.sealed[m] = dict(up.sealed)
                self._absent[m] = 0
            else:
                if up is not None and up.vector:
                    log.warning("secure round %d: %s's upload does not count: %s", r, m, problem)
                self._absent[m] = self._absent.get(m, 0) + 1
        rnd.survivors = sorted(rnd.vectors)
        rnd.dropped = sorted(set(epoch.emails()) - set(rnd.vectors))
        if len(rnd.survivors) < epoch.min_survivors:
            rnd.status = "refused"
            rnd.reason = (f"{len(rnd.survivors)} of {len(epoch.cohort)} members uploaded, fewer than the "
                          f"{epoch.min_survivors} the noise needs: nothing is revealed or published")
            rnd.vectors.clear()
            self._record(rnd, "refused")
        elif rnd.dropped:
            log.info("secure round %d: %d survivors, %d dropped (%s)", r, len(rnd.survivors), len(rnd.dropped),
                     ", ".join(rnd.dropped[:5]))
        self.rounds[r] = rnd

    def _reveals(self, rnd: Round, current: int) -> dict[str, Reveal]:
        """Each member's reveal for ``rnd`` from its uploads of the following rounds (the first one found, kept)."""
        for m in rnd.epoch.emails():
            if m in rnd.reveals:
                continue
            for later in range(rnd.number + 1, min(current, rnd.number + rnd.epoch.reveal_rounds + 1) + 1):
                up = self._read_upload(m, later)
                found = None if up is None or up.email != m else next(
                    (x for x in up.reveals if x.round == rnd.number), None)
                if found is not None:
                    rnd.reveals[m] = found
                    break
        return rnd.reveals

    def _try_unmask(self, rnd: Round, current: int) -> None:
        e = rnd.epoch
        reveals = self._reveals(rnd, current)
        missing = missing_for_unmask(e, rnd.survivors, rnd.dropped, reveals)
        if missing:
            if current > rnd.number + e.reveal_rounds + 1:
                rnd.status, rnd.reason = "failed", "not unmasked in time: missing " + "; ".join(missing[:3])
                log.warning("secure round %d failed: %s", rnd.number, rnd.reason)
                self._record(rnd, "failed")
                rnd.vectors.clear()
            return
        try:
            total = unmask(e, rnd.vectors, rnd.dropped, reveals)
        except ValueError as ex:
            rnd.status, rnd.reason = "failed", f"unmasking failed: {ex}"
            self._record(rnd, "failed")
            return
        bad = implausible(total, e, len(rnd.survivors))
        rnd.vectors.clear()
        if bad:
            rnd.status, rnd.reason = "failed", f"the sum is implausible for {len(rnd.survivors)} members, not " \
                                               f"published: {bad} (a member may have added garbage)"
            log.error("secure round %d: %s", rnd.number, rnd.reason)
            self._record(rnd, "failed")
            return
        rnd.status = "published"
        self._record(rnd, "published")
        self.figure = secure_figure(e, rnd.number, total, len(rnd.survivors), list(self.recent))

    def _record(self, rnd: Round, status: str) -> None:
        self.recent.append(SecureRoundStatus(round=rnd.number, round_end=_utc(rnd.epoch.window(rnd.number)[1]),
                                             status=status, survivors=len(rnd.survivors), reason=rnd.reason))
        if status != "published" and self.figure is not None:
            self.figure = self.figure.model_copy(update={"recent": list(self.recent)})

    # -- inboxes --------------------------------------------------------------------------------------
    def _write_inboxes(self) -> None:
        """Each cohort member's inbox: the rounds being unmasking (or refused) with the shares its neighbours sealed
        for it. Rebuilt only when a round opened or changed status, and written only where it changed; readable by
        that member only."""
        state = tuple((r, rnd.epoch.epoch, rnd.status) for r, rnd in sorted(self.rounds.items())[-8:])
        if state == self._inbox_state:
            return
        members = set(self.epoch.emails()) | (set(self._old.emails()) if self._old else set())
        for m in sorted(members):
            entries = []
            for r in sorted(self.rounds)[-8:]:
                rnd = self.rounds[r]
                if m not in rnd.epoch.neighbours:
                    continue
                if rnd.status == "refused":
                    entries.append(InboxRound(round=r, epoch=rnd.epoch.epoch, status="refused", reason=rnd.reason))
                elif rnd.status == "unmasking":
                    sealed = {s: rnd.sealed[s][m] for s in rnd.epoch.neighbours[m] if m in rnd.sealed.get(s, {})}
                    entries.append(InboxRound(round=r, epoch=rnd.epoch.epoch, status="unmasking",
                                              survivors=rnd.survivors, dropped=rnd.dropped, sealed=sealed))
            body = Inbox(epoch=self.epoch.epoch, member=m, rounds=entries).model_dump_json().encode()
            if self._inboxes.get(m) == body:
                continue
            try:
                ensure_permissions(self.paths.inbox_dir(m), self.paths.email, [m])
                write_if_changed(self.paths.inbox_file(m), body)
                self._inboxes[m] = body
                self.problems.clear("inbox-write")
            except OSError as ex:
                self.problems.report("inbox-write", f"secure mode: cannot write inboxes ({ex}); free disk space")
                return  # retried at the next tick
        self._inbox_state = state


def _upload_round(parts: tuple[str, ...]) -> int | None:
    """The round of a cached upload's path (``<member>/app_data/<app>/secure/r<round>.json``), else None."""
    name = parts[-1]
    if len(parts) >= 2 and parts[-2] == "secure" and name.startswith("r") and name.endswith(".json"):
        digits = name[1:-5]
        return int(digits) if digits.isdigit() else None
    return None
