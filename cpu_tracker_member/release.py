"""How the member releases a window, one strategy per mode, and what else consumes each window.

``run_member`` measures window after window and hands each to the one ``Release`` the settings chose
(``release_for``), then to every observer (``observers_for``). A new mechanism is a module with a ``Release``
subclass, its settings and its schema, plus its line in ``RELEASES``; a new consumer of windows is a class with
``step(raw_mean, start, end)`` and its line in ``OBSERVERS``.
"""

from __future__ import annotations

import math
import threading
from datetime import datetime
from threading import Event
from typing import TYPE_CHECKING, Callable

from cpu_tracker_member.monitor import MemberMonitors

if TYPE_CHECKING:
    from cpu_tracker_member.member import Member


class Release:
    """One way of releasing a window. Subclasses set ``epsilon`` (at most what one release spends, for the hourly
    line) and implement ``span``, ``release`` and ``said``."""

    epsilon: float

    def __init__(self, member: Member):
        self.member = member

    def start(self, stop: Event) -> None:
        """Start what runs beside the windows until ``stop`` is set (nothing, unless a mode needs it)."""

    def span(self, wall: Callable[[], datetime]) -> float:
        """Seconds until the window that starts now ends; reads ``wall`` only if it needs the time of day."""
        raise NotImplementedError

    def release(self, raw_mean: float, start: datetime, end: datetime) -> bool:
        """Release the window [start, end) of mean ``raw_mean``: True if something was published. Never raises for
        what the environment does (each problem logged once by the member's ``problems``)."""
        raise NotImplementedError

    def said(self, end: datetime) -> str:
        """The log line for a window ending at ``end`` that was released."""
        raise NotImplementedError


class LocalRelease(Release):
    """Local mode: the member's own Laplace release of each window of ``interval_s``, read by the aggregator only."""

    def __init__(self, member: Member):
        super().__init__(member)
        self.epsilon = member.settings.epsilon

    def span(self, wall: Callable[[], datetime]) -> float:
        return self.member.settings.interval_s

    def release(self, raw_mean: float, start: datetime, end: datetime) -> bool:
        return self.member.publish(raw_mean, start, end) is not None

    def said(self, end: datetime) -> str:
        return f"published window ending {end.isoformat(timespec='seconds')} (epsilon {self.epsilon:g})"


class SecureRelease(Release):
    """Secure mode: each window is the member's part in one of the aggregator's rounds (``SecureMember``)."""

    def __init__(self, member: Member):
        super().__init__(member)
        # imported only here: local mode never loads the cryptography and accounting
        from cpu_tracker_member.secure import SecureMember

        self.secure = SecureMember(member.paths, member.settings, member.problems, member.keeper,
                                   member.upload_delivered)
        self.epsilon = member.settings.secure_target  # at most: the epoch's noise decides

    def start(self, stop: Event) -> None:
        """The answers to the aggregator's inboxes (views, reveals) are sent as soon as an inbox asks, between
        windows too."""
        threading.Thread(target=self.secure.answer_loop, args=(stop,), name="secure-answers", daemon=True).start()

    def span(self, wall: Callable[[], datetime]) -> float:
        # secure rounds are UTC windows (round r = [r * interval, (r + 1) * interval)): end each window on one
        return to_boundary(wall().timestamp(), self.member.settings.interval_s)

    def release(self, raw_mean: float, start: datetime, end: datetime) -> bool:
        m = self.member
        return m.ensure_folder() and m.parents_safe() and self.secure.publish(raw_mean, start, end)

    def said(self, end: datetime) -> str:
        return f"secure round ending {end.isoformat(timespec='seconds')} uploaded"


RELEASES: dict[str, type[Release]] = {"local": LocalRelease, "secure": SecureRelease}  # by ``Settings.mode``
OBSERVERS = (MemberMonitors,)  # each built with the member; ``step(raw_mean, start, end)`` once per dated window


def release_for(member: Member) -> Release:
    """The release the member's settings choose."""
    return RELEASES[member.settings.mode](member)


def observers_for(member: Member) -> list:
    """Everything else that consumes each window (the private alerts' member side)."""
    return [make(member) for make in OBSERVERS]


def to_boundary(now: float, interval_s: float) -> float:
    """Seconds from ``now`` to the next UTC multiple of ``interval_s`` (the end of the current secure round)."""
    return (math.floor(now / interval_s) + 1) * interval_s - now
