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

:class:`RelayTester` runs the test in the button daemon: it opens the input's test window
(:mod:`.windows`), pulses the relay, judges the input after it, and waits for the press
the pulse caused to be recorded. Pulses are at least ``MIN_PULSE_GAP_S`` apart, whoever
asks (a test that comes sooner waits its turn): while the relay is energised a tap on the
button cannot be seen, so a storm of test requests must not keep the input blind.
"""

from __future__ import annotations

import logging
import threading
import time

from edge.config import Config
from edge.contract.events import ContactId, utc_iso
from edge.daemons.button.recorder import AcceptedPress, Recorder
from edge.daemons.button.windows import (
    RELAY_OPERATE_S,
    TestSpec,
    TestWindow,
    TestWindows,
    WindowBusy,
    new_waiter,
)

log = logging.getLogger(__name__)

LATE_EDGE_S = 0.005    # how late an edge may reach us after its timestamp
JUDGE_EVERY_S = 0.001  # how often the input's edges after a test pulse are looked at
JUDGE_FOR_AT_MOST_S = 2.0  # then the input's level decides (a contact chattering on)
REPORT_GRACE_S = 2.0   # the input worker's decision about the pulse's press may lag this
MIN_PULSE_GAP_S = 5.0  # the relay is never energised again sooner than this


def _wait(waiter, deadline: float) -> dict | None:
    done, box = waiter
    return box[0] if done.wait(max(0.0, deadline - time.monotonic())) else None


class RelayTester:
    """Pulses the test relay across a panic input and records the press as a test."""

    def __init__(self, config: Config, relay, inputs, windows: TestWindows,
                 recorder: Recorder, latched, stop: threading.Event):
        self.config = config
        self.relay = relay
        self.inputs = inputs
        self.windows = windows
        self.recorder = recorder
        self._latched = latched          # callable: the inputs latched by an alarm
        self._stop = stop
        self._lock = threading.Lock()    # one pulse at a time
        self._last_pulse: float | None = None
        self.outcome_wait_s = 10.0       # for the recorder to commit the test press

    def run(self, request: dict) -> dict:
        """The control request ``relay-test``: ``{"code": 601|602, "detail": {...}}``.

        The answer names the stage that failed: ``edge`` (the input did not see the
        pulse, a person pressed, or the test could not start) or ``committed``.
        """
        name = self.config.test_input
        if self.relay is None or name is None:
            return {"ok": False, "stage": "edge", "error": "no test relay is configured"}
        code = request.get("code", int(ContactId.PERIODIC_TEST))
        if code not in (ContactId.MANUAL_TEST, ContactId.PERIODIC_TEST):
            return {"ok": False, "stage": "edge", "error": "code must be 601 or 602"}
        detail = request.get("detail", {})
        if not isinstance(detail, dict):
            return {"ok": False, "stage": "edge", "error": "detail must be an object"}
        if not self._lock.acquire(blocking=False):
            return {"ok": False, "stage": "edge", "error": "another alarm test is running"}
        try:
            if self._last_pulse is not None:
                # Back-to-back tests wait their turn rather than fail; a storm of them
                # is held to one pulse per MIN_PULSE_GAP_S.
                gap = self._last_pulse + MIN_PULSE_GAP_S - time.monotonic()
                if gap > 0 and self._stop.wait(gap):
                    return {"ok": False, "stage": "edge", "error": "the daemon is stopping"}
            relay = self.config.outputs.test_relay
            return self._pulse_and_judge(name, TestSpec(ContactId(code), {
                **detail, "method": "relay", "covers_wiring": True,
                "pulse_ms": relay.pulse_ms}))
        finally:
            self._lock.release()

    def _pulse_and_judge(self, name: str, test: TestSpec) -> dict:
        if self.inputs.is_active(name):
            return {"ok": False, "stage": "edge",
                    "error": f"input {name} is active (a press under way): not tested"}
        if name in self._latched():
            return {"ok": False, "stage": "edge",
                    "error": f"input {name} is latched by an alarm: reset it first"}
        started = time.monotonic()
        try:
            window = self.windows.open(TestWindow(name, "relay", started,
                                                  started + RELAY_OPERATE_S, test))
        except WindowBusy as err:
            return {"ok": False, "stage": "edge", "error": str(err)}
        try:
            released = self._pulse()
            held = self._finger_after_pulse(window, released)
            if window.report is None:
                # The worker decides the pulse's press from its edges: under load, after
                # the pulse. The window is closed only once it has, or after the grace.
                window.claimed.wait(REPORT_GRACE_S)
        finally:
            self.windows.close(window, time.monotonic())
        report = self.windows.finger(window, held)
        if report is None:
            return {"ok": False, "stage": "edge",
                    "error": f"input {name} did not see the relay pulse "
                             "(relay, wiring or input fault)"
                             + ("; a person is pressing it: the ALARM is recorded as soon "
                                "as the input reports the press" if held else "")}
        alarm = None
        if held:
            # Never swallowed: the same activation, now a person's press, is an alarm,
            # stamped with the edge it began with. Queued before anything is waited for,
            # so a slow commit of the test cannot keep it from the recorder.
            alarm = AcceptedPress(report, window.occurred_at, waiter=new_waiter())
            self.recorder.submit(alarm)
        deadline = time.monotonic() + self.outcome_wait_s
        outcome = _wait(window.outcome, deadline)
        if outcome is None:
            log.error("alarm test: the test press was not recorded within %g s (the outbox "
                      "is not taking writes)%s", self.outcome_wait_s,
                      "; the held button's ALARM is queued behind it" if alarm else "")
            answer = {"ok": False, "stage": "committed",
                      "error": "the test press was not recorded in time (see the daemon log)"}
        else:
            answer = {"ok": True, "input": name, "edge_ticks": report.edge_ticks,
                      "occurred_at": utc_iso(window.occurred_at), **outcome}
        if alarm is not None:
            recorded = _wait(alarm.waiter, deadline)
            answer.update(ok=False, stage="edge", alarm=(recorded or {}).get("event"),
                          error=f"input {name} was still held after the pulse: a person "
                                "pressed the button; recorded as an ALARM")
        return answer

    def _pulse(self) -> float:
        """Energise the relay for ``pulse_ms``; returns when it was let go."""
        try:
            self.relay.on()
            self._stop.wait(self.config.outputs.test_relay.pulse_ms / 1000)
        finally:
            released = time.monotonic()  # before off(): its edge must not predate it
            self.relay.off()
            self._last_pulse = released
        return released

    def _finger_after_pulse(self, window: TestWindow, released: float) -> bool:
        """Judge the input's edges after the pulse until they tell: a person's finger,
        or the relay alone."""
        spec = self.config.inputs[window.input]
        relay = self.config.outputs.test_relay
        give_up = released + relay.release_ms / 1000 + JUDGE_FOR_AT_MOST_S
        while True:
            now = time.monotonic()
            finger = None
            if any(active for _, active in window.edges):
                finger = finger_after_pulse(
                    window.edges, released, release=relay.release_ms / 1000,
                    bounce=spec.bounce_ms / 1000, need=spec.min_press_ms / 1000, now=now)
            # else the pulse's own edge has not reached us (the pin driver lags): nothing
            # to judge by yet.
            if finger is not None:
                return finger
            if now > give_up:
                return self.inputs.is_active(window.input)
            time.sleep(JUDGE_EVERY_S)


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
