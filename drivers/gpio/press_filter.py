"""When is a change on a panic input a press?

gpiozero's software debounce (``bounce_time``) drops the *edges* that follow an edge
within the bounce time, so a short real press can vanish, and its mock pins ignore it
altogether. This filter works on edge timestamps instead, with three times:

- ``threshold`` = ``max(min_press, hold)``: an activation is a press once it has lasted
  this long, measured from its first edge;
- ``bounce``: an opening of the contact shorter than this does not end an activation. A
  mechanical contact chatters for a few milliseconds when it closes and opens; without
  this, a bounce at the start would shorten a press below the threshold, and chatter while
  the button is held would count as a new press;
- a single pulse shorter than ``threshold`` (a glitch on the cable), followed by at least
  ``bounce`` of quiet, is reported as ignored.

A press is decided at its deadline if the input still reads active then, or by its
release edge, whose timestamp says how long it lasted, so a press whose edges reached us
late, under load, still counts. Once accepted, nothing more happens until the input has
been released for ``bounce``: holding the button never repeats it.

Edges can be lost (a driver's event buffer overflowing on a noisy loop). The caller
passes the input's level read at each deadline, so a release whose edge never came is
still noticed, and nothing waits forever. But the level is read *ahead* of the edges: the
pin has changed before its edge reaches the queue (lgpio's alert thread, or a mock pin's
callback, runs after the change). Where the level and the edges disagree, the filter
therefore waits up to ``EDGE_GRACE_S`` for the edge, whose timestamp decides; only an edge
that never comes is replaced by the level, and a contact found closed again is then taken
for a new press (a repeat at worst): taken for bounce, it could be a press never decided.

The filter is pure: times are floats in seconds on one time base, given by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

# Edge timestamps are floats; a press equal to the threshold must not be lost to rounding.
_TOLERANCE_S = 1e-6
# While a press is held, the level is read this often: a release edge may be lost.
HELD_CHECK_S = 0.05
# How long an edge may take to reach the filter after the pin changed (the driver's
# thread, the queue, the worker, all under load) before it counts as lost.
EDGE_GRACE_S = 0.05
# An idle input's level is read this often too: a press whose first edge was lost is then
# still a press, half a second late, not a missed alarm.
IDLE_CHECK_S = 0.5


@dataclass(frozen=True)
class FilterOutcome:
    """The decision about one activation of an input."""

    accepted: bool
    started: float   # time of the activating edge
    duration: float  # how long it had lasted when decided
    reason: str


class PressFilter:
    """Glitch, bounce and hold-time filter for one input (see the module docstring)."""

    def __init__(self, min_press: float, hold: float = 0.0, bounce: float = 0.0):
        if min(min_press, hold, bounce) < 0:
            raise ValueError("min_press, hold and bounce must not be negative")
        self.min_press = min_press
        self.hold = hold
        self.bounce = bounce
        self.threshold = max(min_press, hold)
        self._start: float | None = None     # first edge of the current activation
        self._held = False                   # the activation was accepted as a press
        self._gap_since: float | None = None  # the input opened at this time: released?
        self._gap_seen = False               # ... as an edge (not only as a level read)
        self._checked = 0.0                  # last level read while held or idle
        self._doubt_since: float | None = None  # the level disagrees with the edges since
        self._start_presumed = False         # _start is a level's time: its edge was late

    @property
    def _closed_by_edges(self) -> bool:
        return self._start is not None and self._gap_since is None

    @property
    def deadline(self) -> float | None:
        """When :meth:`expire` should be called next."""
        if self._doubt_since is not None:
            return self._doubt_since + EDGE_GRACE_S
        if self._start is None:
            return self._checked + IDLE_CHECK_S
        if self._gap_since is not None:
            return self._gap_since + self.bounce
        if not self._held:
            return self._start + self.threshold
        return self._checked + HELD_CHECK_S

    def edge(self, at: float, active: bool) -> list[FilterOutcome]:
        """Feed one edge; returns the decisions it settles (none, one, or two)."""
        self._doubt_since = None
        if active:
            outcomes = []
            if (self._start is not None and self._gap_since is not None
                    and at - self._gap_since >= self.bounce - _TOLERANCE_S):
                # The opening before this edge lasted the bounce time: the previous
                # activation had ended even if its deadline was not looked at in time.
                outcomes += self._release()
            if self._start is None:
                return outcomes + self._begin(at)
            if self._start_presumed and self._gap_since is None and at < self._start:
                # The activating edge, later than the level that stood in for it (its
                # thread starved under load): its time is the press's start, not the
                # level's; counted from the level, a short press would be a glitch.
                self._start, self._start_presumed = at, False
                return outcomes
            self._gap_since = None  # the contact closed again within the bounce time
            return outcomes
        if self._start is None:
            return []
        self._gap_since = at if self._gap_since is None else min(self._gap_since, at)
        self._gap_seen = True
        if not self._held and at - self._start >= self.threshold - _TOLERANCE_S:
            # Long enough whether or not this opening is a bounce.
            return [self._accept(at, "press (confirmed by its release)")]
        if self.bounce == 0:
            return self._release()
        return []

    def expire(self, now: float, still_active: bool) -> list[FilterOutcome]:
        """Called at (or after) :attr:`deadline` with the input's level read now."""
        deadline = self.deadline
        if deadline is None or now < deadline - _TOLERANCE_S:
            return []
        if self._doubt_since is not None:
            since, self._doubt_since = self._doubt_since, None
            return self._edge_lost(since, now, still_active)
        if still_active != self._closed_by_edges:
            # The pin changed and its edge has not reached us yet (or was lost): wait for
            # it, since only its timestamp tells a bounce from a release or a new press.
            self._doubt_since = now
            return []
        if self._gap_since is not None:
            return self._release()  # open for the bounce time: released
        if self._start is not None and not self._held:
            return [self._accept(now, "press")]
        self._checked = now  # held (or idle), as the edges say
        return []

    def _edge_lost(self, since: float, now: float, still_active: bool) -> list[FilterOutcome]:
        """The edge that would explain the level read at ``since`` never came."""
        if still_active == self._closed_by_edges:
            return self.expire(now, still_active)  # the level is back in line with the edges
        if not still_active:
            # The contact opened and its edge was lost. Not yet accepted, it was open at
            # its deadline: it did not last (an unseen gap is never confirmed as a press).
            self._gap_since, self._gap_seen = since, False
            return self.expire(now, still_active)
        if self._start is None:
            return self._begin(since, presumed=True)  # a press whose first edge was lost
        # Closed again and that edge was lost: a bounce and a new press look the same.
        return self._release() + self._begin(since, presumed=True)

    def _begin(self, at: float, *, presumed: bool = False) -> list[FilterOutcome]:
        """A new activation starts at ``at`` (``presumed``: the time a level was read,
        its edge not seen yet)."""
        self._start, self._gap_since, self._held = at, None, False
        self._start_presumed = presumed
        return [self._accept(at, "press")] if self.threshold == 0 else []

    def _accept(self, now: float, reason: str) -> FilterOutcome:
        self._held = True
        self._checked = now
        return FilterOutcome(True, self._start, max(0.0, now - self._start), reason)

    def _release(self) -> list[FilterOutcome]:
        """The input has been open for ``bounce``: the activation is over."""
        started, ended, held, seen = self._start, self._gap_since, self._held, self._gap_seen
        self._start = self._gap_since = self._doubt_since = None
        self._held = False
        self._checked = ended
        if held:
            return []  # the end of an accepted press is not news
        duration = max(0.0, ended - started)
        if not seen:
            # Open at its deadline and its release edge never came: it did not last.
            return [FilterOutcome(False, started, duration,
                                  "released before the minimum (its release edge was lost)")]
        if duration >= self.threshold - _TOLERANCE_S:
            return [FilterOutcome(True, started, duration, "press (confirmed by its release)")]
        return [FilterOutcome(False, started, duration, self._too_short(duration))]

    def _too_short(self, duration: float) -> str:
        ms = duration * 1000
        if self.hold > self.min_press and duration >= self.min_press:
            return f"released after {ms:.1f} ms, before the hold time of {self.hold * 1000:.0f} ms"
        return f"glitch of {ms:.1f} ms, shorter than the minimum of {self.min_press * 1000:.0f} ms"
