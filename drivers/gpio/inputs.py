"""Panic inputs: contacts on GPIO pins, filtered into presses on one worker thread.

gpiozero calls edge callbacks on its own threads (lgpio's alert thread, RPi.GPIO's
event thread) and, with mock pins, in the thread that drives the pin. Either way the
callback only timestamps the edge and queues it; a single worker thread applies the
:class:`~drivers.gpio.press_filter.PressFilter` and reports decisions in order, so
the same code path runs on a Pi and in the simulator.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpiozero import Factory, InputDevice

from drivers.gpio.press_filter import FilterOutcome, PressFilter

if TYPE_CHECKING:  # drivers take the configuration's shape, not its module
    from edge.config import InputConfig

log = logging.getLogger(__name__)

MAX_EDGE_AGE_S = 60.0  # an edge timestamp further than this from "now" is on another clock


@dataclass(frozen=True)
class PressReport:
    """A decision about one activation of a panic input."""

    input: str
    accepted: bool
    reason: str
    # The activating edge on the pin factory's clock: time.monotonic() seconds for
    # lgpio and for MockFactory.
    edge_ticks: float
    duration: float    # seconds the input had been active when decided
    age: float         # seconds from the activating edge to the decision


def active_level(contact: str, pull: str) -> bool:
    """The pin level that means "pressed".

    With a pull-up a normally-open contact shorts the pin to ground when pressed
    (active low) and a normally-closed one opens, letting the pull-up raise it (active
    high); with a pull-down it is the other way round. A cut wire on a normally-closed
    loop therefore reads as a press: a tampered button raises an alarm.
    """
    normally_open = contact == "normally-open"
    return normally_open != (pull == "up")


class _Channel:
    """One input pin: hands its edges to the worker's queue."""

    def __init__(self, name: str, spec: InputConfig, factory: Factory, edges: queue.SimpleQueue,
                 on_edge: Callable[[str, float, bool], None] | None = None):
        self.name = name
        self.on_edge = on_edge
        self._factory = factory
        self._clock_warned = False
        self.spec = spec
        self.active_level = active_level(spec.contact, spec.pull)
        self.filter = PressFilter(spec.min_press_ms / 1000, spec.hold_ms / 1000,
                                  spec.bounce_ms / 1000)
        self._edges = edges
        self.device = InputDevice(f"GPIO{spec.pin}", pull_up=spec.pull == "up",
                                  pin_factory=factory)
        self.pin = self.device.pin
        try:
            self.pin.bounce = None  # the filter decides; gpiozero's debounce drops short presses
            self.pin.edges = "both"
            self.pin.when_changed = self._on_change
        except Exception:
            self.device.close()
            raise

    def _on_change(self, ticks: float, state: int) -> None:
        now = self._factory.ticks()
        if not -MAX_EDGE_AGE_S <= self._factory.ticks_diff(now, ticks) <= MAX_EDGE_AGE_S:
            ticks = self._on_our_clock(ticks, now)
        active = bool(state) == self.active_level
        self._edges.put((self, ticks, active))
        if self.on_edge is not None:
            self.on_edge(self.name, ticks, active)

    def _on_our_clock(self, ticks: float, now: float) -> float:
        """An edge timestamp on another clock than the factory's: lgpio on a kernel that
        stamps GPIO events with CLOCK_REALTIME (before Linux 5.7). It is converted to the
        monotonic clock by their current offset (exact but for an NTP step between the
        edge and now); failing that, the edge is timed on arrival, never misjudged by
        decades."""
        # The kernel's own CLOCK_REALTIME, never the device's (simulated) wall clock of
        # edge.runtime.clock: the stamp was made on it.
        converted = ticks - (time.time() - time.monotonic())
        if -MAX_EDGE_AGE_S <= self._factory.ticks_diff(now, converted) <= MAX_EDGE_AGE_S:
            how, ticks = "converted from the wall clock", converted
        else:
            how, ticks = "timed on arrival", now
        if not self._clock_warned:
            log.warning("input %s: edge timestamps are not on the pin factory's clock; %s",
                        self.name, how)
            self._clock_warned = True
        return ticks

    def is_active(self) -> bool:
        return bool(self.pin.state) == self.active_level

    def close(self) -> None:
        self.pin.when_changed = None
        self.device.close()


_STOP = object()


class PanicInputs:
    """All panic inputs of the device; reports each decision to ``on_report``.

    ``on_edge(name, ticks, active)``, if given, sees every raw edge as it arrives, on
    the pin driver's thread (the alarm test watches the input after its relay pulse).

    ``on_report`` runs on the worker thread, one decision at a time, in the order the
    activations were decided.
    """

    def __init__(self, factory: Factory, inputs: Mapping[str, InputConfig],
                 on_report: Callable[[PressReport], None],
                 on_edge: Callable[[str, float, bool], None] | None = None):
        self._factory = factory
        self._on_report = on_report
        self._edges: queue.SimpleQueue = queue.SimpleQueue()
        self._channels: dict[str, _Channel] = {}
        try:
            for name, spec in inputs.items():
                self._channels[name] = _Channel(name, spec, factory, self._edges, on_edge)
        except Exception:
            self._close_channels()
            raise
        self._origin = factory.ticks()
        self._thread = threading.Thread(target=self._run, name="panic-inputs", daemon=True)

    @property
    def names(self) -> list[str]:
        return list(self._channels)

    def pin(self, name: str):
        """The gpiozero pin of an input (the simulator drives mock pins through it)."""
        return self._channels[name].pin

    def is_active(self, name: str) -> bool:
        return self._channels[name].is_active()

    def start(self) -> None:
        # An input already active now (a button held, a normally-closed loop cut before
        # boot) produced no edge we could see: treat it as activated at this moment.
        for channel in self._channels.values():
            if channel.is_active():
                log.warning("input %s is active at start", channel.name)
                self._edges.put((channel, self._factory.ticks(), True))
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self._edges.put(_STOP)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("panic input worker did not stop within %.1f s", timeout)
        self._close_channels()

    def _close_channels(self) -> None:
        for channel in self._channels.values():
            try:
                channel.close()
            except Exception:
                log.exception("closing input %s", channel.name)
        self._channels.clear()

    # -- the worker thread -----------------------------------------------------------

    def _now(self) -> float:
        return self._factory.ticks_diff(self._factory.ticks(), self._origin)

    def _run(self) -> None:
        while True:
            deadlines = [d for c in self._channels.values() if (d := c.filter.deadline) is not None]
            timeout = max(0.0, min(deadlines) - self._now()) if deadlines else None
            try:
                item = self._edges.get(timeout=timeout)
            except queue.Empty:
                item = None
            # Take every edge already queued before judging deadlines: a release that
            # is waiting in the queue decides with its exact timestamp.
            while item is not None:
                if item is _STOP:
                    return
                self._handle_edge(*item)
                try:
                    item = self._edges.get_nowait()
                except queue.Empty:
                    item = None
            for channel in self._channels.values():
                if channel.filter.deadline is not None:
                    for outcome in channel.filter.expire(self._now(), channel.is_active()):
                        self._report(channel, outcome)

    def _handle_edge(self, channel: _Channel, ticks: float, active: bool) -> None:
        at = self._factory.ticks_diff(ticks, self._origin)
        for outcome in channel.filter.edge(at, active):
            self._report(channel, outcome)

    def _report(self, channel: _Channel, outcome: FilterOutcome) -> None:
        edge_ticks = self._origin + outcome.started
        report = PressReport(
            input=channel.name, accepted=outcome.accepted, reason=outcome.reason,
            edge_ticks=edge_ticks, duration=outcome.duration,
            age=max(0.0, self._now() - outcome.started),
        )
        if not outcome.accepted:
            log.info("input %s: ignored, %s", channel.name, outcome.reason)
        try:
            self._on_report(report)
        except Exception:
            # The worker must survive whatever the consumer does: the next press counts.
            log.exception("handling a report from input %s", channel.name)
