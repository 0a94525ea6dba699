"""The alarm test's relay pulse, as the panic input sees it: which press is the test, and
whether a person's finger was on the button too.

The test relay's contact is wired across the button's, so while it is energised a finger
on the button is electrically invisible. What can be seen is what happens after the
pulse: the relay's contact opens within ``release`` (its release time and bounce), and
anything on the input after that is a person. The raw edges are judged, with their own
timestamps, the way the press filter will judge them:

- the input still closed, or closing again, after ``release``, before it has been open
  for the input's bounce time: the press filter takes that as the same press (a bounce
  of the test press), so it reports nothing of its own; a finger, to be recorded here
  as an ALARM;
- the input open for the bounce time: the press filter has seen the release, and any
  later press is reported, and recorded, by itself. Nothing more for the test to do.

Activity shorter than ``need`` (the input's ``min_press_ms``) is a glitch, as it would be
for the press filter.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime

from drivers.gpio import PressReport

RELAY_OPERATE_S = 0.1  # the first edge of the pulse's press comes within this of energising
LATE_EDGE_S = 0.005    # how late an edge may reach us after its timestamp


@dataclass
class RelayWindow:
    """An armed alarm test on ``input``: its relay was energised at ``started``
    (``time.monotonic()``, the clock of the pin factory's ticks)."""

    input: str
    started: float
    test: object                                   # the TestSpec it records
    report: PressReport | None = None              # the press the pulse produced
    occurred_at: datetime | None = None
    edges: list[tuple[float, bool]] = field(default_factory=list)  # (ticks, active), raw
    # Told the recording of the pulse's press, and of nothing else.
    outcome: tuple[threading.Event, list] = field(
        default_factory=lambda: (threading.Event(), []))

    def claims(self, report: PressReport) -> bool:
        return (report.accepted and report.input == self.input and self.report is None
                and self.started - 0.005 <= report.edge_ticks <= self.started + RELAY_OPERATE_S)

    def saw_edge(self, name: str, ticks: float, active: bool) -> None:
        """From the pin driver's thread: every raw edge of the tested input."""
        if name == self.input:
            self.edges.append((ticks, active))  # list.append: atomic, no lock needed


def finger_after_pulse(edges: list[tuple[float, bool]], released: float, *, release: float,
                       bounce: float, need: float, now: float) -> bool | None:
    """Was a person's finger on the button after the pulse ended at ``released``?

    ``edges`` are the input's raw ``(ticks, active)`` edges; the relay held the input
    closed at ``released``. True: a finger (the input active for ``need`` in all, later
    than ``released + release``, within what the press filter takes for one press);
    False: the relay alone (the input open for ``bounce``: the filter saw the release);
    None: not known yet at ``now``.
    """
    from_ = released + release
    active, since = True, released
    opened_at: float | None = None
    held = 0.0

    def enough() -> bool:
        return held >= need - 1e-9 if need > 0 else held > 0  # 1 ns: float rounding

    for ticks, level in sorted(e for e in edges if released <= e[0] <= now):
        if level == active:
            continue  # the same level again: no change
        if level:
            if ticks - opened_at >= bounce:
                return False  # released, for the filter: a later press is its own
            active, since = True, ticks
        else:
            held += max(0.0, ticks - max(since, from_))
            if enough():
                return True
            active, opened_at = False, ticks
    if active:
        held += max(0.0, now - max(since, from_))
        return True if enough() else None
    # Edges reach us from the pin driver's thread: allow one a moment late before
    # concluding that nothing followed the opening.
    return False if now - opened_at >= bounce + LATE_EDGE_S else None
