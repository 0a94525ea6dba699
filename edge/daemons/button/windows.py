"""Test windows: when a press on one input is a test (Contact ID 601/602), not an alarm.

Two things open one, each for one input: the alarm test's relay pulse (the press its pulse
causes) and the installer's commissioning press (``guardpost doctor``: "press the button
now"). A window has one owner, and an input has at most one window at a time: a second
is refused, so a relay test and a commissioning press can never both claim a press.

A window claims a press by the time of the press's first edge, never by when the input
worker got round to deciding it. A press decided late (the worker behind the pulse, the
pin driver's thread under load) is still the test's; a press that began outside every
window is an alarm, however late or early it is decided. That is why closed windows are
remembered for a while: the worker may report after the owner has given up.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from datetime import datetime

from drivers.gpio import PressReport
from edge.contract.events import ContactId

RELAY_OPERATE_S = 0.1  # the first edge of the pulse's press comes within this of energising
EARLY_EDGE_S = 0.005   # an edge stamped this much before the window opened still counts
REMEMBER_COUNT = 16   # closed windows still claim a late-decided press that began in them


@dataclass(frozen=True)
class TestSpec:
    """A press to be recorded as a test (never an alarm), and how."""

    code: ContactId
    detail: dict


Waiter = tuple[threading.Event, list]


def new_waiter() -> Waiter:
    return threading.Event(), []


def tell(waiter: Waiter, outcome: dict) -> None:
    done, box = waiter
    box.append(outcome)
    done.set()


@dataclass(eq=False)
class TestWindow:
    """One input's window: a press whose first edge is in ``[opens, claims_until]`` is
    this test's (times are pin factory ticks: ``time.monotonic()`` seconds for lgpio
    and the mock pins)."""

    input: str
    kind: str                      # "relay" | "commissioning"
    opens: float
    claims_until: float
    test: TestSpec
    report: PressReport | None = None             # the press it claimed
    occurred_at: datetime | None = None
    closed_at: float | None = None
    finger: bool = False           # relay: a person held the button after the pulse
    edges: list[tuple[float, bool]] = field(default_factory=list)  # raw (ticks, active)
    claimed: threading.Event = field(default_factory=threading.Event)
    outcome: Waiter = field(default_factory=new_waiter)  # told when its press is recorded

    def covers(self, report: PressReport) -> bool:
        return (report.input == self.input
                and self.opens - EARLY_EDGE_S <= report.edge_ticks <= self.claims_until)


class WindowBusy(Exception):
    """The input already has a test window open."""


class TestWindows:
    """The open windows (one per input) and the recently closed ones."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: dict[str, TestWindow] = {}
        self._closed: collections.deque[TestWindow] = collections.deque(maxlen=REMEMBER_COUNT)

    def open(self, window: TestWindow) -> TestWindow:
        with self._lock:
            other = self._open.get(window.input)
            if other is not None:
                raise WindowBusy(f"input {window.input} is already under a test "
                                 f"({other.kind}): one at a time")
            self._open[window.input] = window
        return window

    def close(self, window: TestWindow, at: float) -> None:
        """The owner is done: from ``at`` on, no new press is this window's."""
        with self._lock:
            if self._open.get(window.input) is window:
                del self._open[window.input]
            window.closed_at = at
            window.claims_until = min(window.claims_until, at)
            self._closed.append(window)

    def claim(self, report: PressReport) -> tuple[TestWindow, bool] | None:
        """The window this accepted press belongs to, if any (each claims one press), and
        whether it is also a person's alarm (the relay test judged a finger on the button
        before the press was decided: the recorder records both)."""
        with self._lock:
            candidates = [self._open.get(report.input), *reversed(self._closed)]
            for window in candidates:
                if window is None or window.report is not None or not window.covers(report):
                    continue
                window.report = report
                window.claimed.set()
                return window, window.finger
        return None

    def finger(self, window: TestWindow, held: bool) -> PressReport | None:
        """The relay test's judgement of the input after its pulse. Returns the press the
        pulse caused if it is already claimed (then the caller records the person's
        alarm); if not yet, :meth:`claim` says so when it comes."""
        with self._lock:
            window.finger = held
            return window.report

    def saw_edge(self, name: str, ticks: float, active: bool) -> None:
        """From the pin driver's thread: a raw edge, for the relay test's judgement."""
        window = self._open.get(name)  # one dict lookup: atomic, no lock on this thread
        if window is not None and window.kind == "relay":
            window.edges.append((ticks, active))

    def busy(self) -> dict[str, str]:
        """Inputs with an open window, and its kind."""
        with self._lock:
            return {name: window.kind for name, window in self._open.items()}
