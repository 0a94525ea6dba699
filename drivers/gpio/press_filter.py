"""When is a change on a panic input a press?

gpiozero's software debounce (``bounce_time``) drops the *edges* that follow an edge
within the bounce time, so a short real press can vanish, and its mock pins ignore it
altogether. This filter works on edge timestamps instead:

- an activation becomes a press once it has lasted ``threshold`` seconds
  (``max(min_press, hold)``), decided either when the deadline passes with the input
  still active, or when the release edge arrives carrying a timestamp at least
  ``threshold`` after the activation (so a press whose edges were delivered late,
  under load, is still counted);
- an activation released sooner is a glitch (or, with a hold time, too short) and is
  reported as ignored;
- once a press is accepted nothing more happens until the input is released: holding
  the button never repeats it.

The filter is pure: times are floats in seconds on one time base, given by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

# Edge timestamps are floats; a press equal to the threshold must not be lost to rounding.
_TOLERANCE_S = 1e-6


@dataclass(frozen=True)
class FilterOutcome:
    """The decision about one activation of an input."""

    accepted: bool
    started: float   # time of the activating edge
    duration: float  # how long it had lasted when decided
    reason: str


class PressFilter:
    """Glitch and hold-time filter for one input (see the module docstring)."""

    def __init__(self, min_press: float, hold: float = 0.0):
        if min_press < 0 or hold < 0:
            raise ValueError("min_press and hold must not be negative")
        self.min_press = min_press
        self.hold = hold
        self.threshold = max(min_press, hold)
        self._pending_since: float | None = None
        self._held = False

    @property
    def deadline(self) -> float | None:
        """When :meth:`expire` should be called next, or None if nothing is pending."""
        if self._pending_since is None:
            return None
        return self._pending_since + self.threshold

    def edge(self, at: float, active: bool) -> FilterOutcome | None:
        """Feed one edge; returns a decision if this edge settles one."""
        if active:
            if self._held:
                return None  # still the same press: holding never repeats
            if self._pending_since is not None:
                # Two activations without a release between them: the release edge was
                # lost. The first activation's length is unknown; start over from here.
                self._pending_since = at
                return None
            if self.threshold == 0:
                self._held = True
                return FilterOutcome(True, at, 0.0, "press")
            self._pending_since = at
            return None

        if self._pending_since is not None:
            started, self._pending_since = self._pending_since, None
            duration = max(0.0, at - started)
            if duration >= self.threshold - _TOLERANCE_S:
                return FilterOutcome(True, started, duration, "press (confirmed by its release)")
            return FilterOutcome(False, started, duration, self._too_short(duration))
        self._held = False
        return None

    def expire(self, now: float, still_active: bool) -> FilterOutcome | None:
        """Called at (or after) :attr:`deadline` with the input's level read now."""
        if self._pending_since is None or now < self._pending_since + self.threshold - _TOLERANCE_S:
            return None
        if not still_active:
            # Released, but its edge has not reached us yet: it carries the exact
            # duration, so wait for it rather than guess.
            return None
        started, self._pending_since = self._pending_since, None
        self._held = True
        return FilterOutcome(True, started, now - started, "press")

    def _too_short(self, duration: float) -> str:
        ms = duration * 1000
        if self.hold > self.min_press and duration >= self.min_press:
            return f"released after {ms:.1f} ms, before the hold time of {self.hold * 1000:.0f} ms"
        return f"glitch of {ms:.1f} ms, shorter than the minimum of {self.min_press * 1000:.0f} ms"
