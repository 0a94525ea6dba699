"""Panic inputs on gpiozero's MockFactory pins: what a wired button really does."""

from __future__ import annotations

import queue
import threading
import time

import pytest
from gpiozero.pins.mock import MockFactory

from drivers.gpio import PanicInputs, PinFactoryError, open_pin_factory
from drivers.gpio.inputs import active_level
from drivers.gpio.sim import SimulatedContact
from edge.config import InputConfig


class Harness:
    """PanicInputs on a fresh MockFactory, reports collected in a queue."""

    def __init__(self, **inputs: dict):
        self.factory = MockFactory()
        self.reports: queue.Queue = queue.Queue()
        self.threads: list[str] = []
        self.specs = {name: InputConfig(**spec) for name, spec in inputs.items()}

    def __enter__(self) -> Harness:
        self.inputs = PanicInputs(self.factory, self.specs, on_report=self._report)
        self.contacts = {name: SimulatedContact(self.inputs.pin(name), s.contact, s.pull)
                         for name, s in self.specs.items()}
        self.inputs.start()
        return self

    def _report(self, report) -> None:
        self.threads.append(threading.current_thread().name)
        self.reports.put(report)

    def next_report(self, timeout: float = 5.0):
        return self.reports.get(timeout=timeout)

    def __exit__(self, *exc) -> None:
        self.inputs.close()
        self.factory.close()


def pulse(contact: SimulatedContact, pin, seconds: float) -> float:
    """Drive one activation of about ``seconds``; returns how long it really lasted,
    as the mock pin recorded it (a busy machine can stretch a pulse)."""
    pin.clear_states()
    contact.press()
    threading.Event().wait(seconds)  # shapes the input signal; nothing is awaited here
    contact.release()
    return pin.states[-1].timestamp


def test_a_20_ms_press_is_detected_and_reported_on_the_worker_thread():
    with Harness(gate={"pin": 17, "min_press_ms": 10}) as h:
        lasted = pulse(h.contacts["gate"], h.inputs.pin("gate"), 0.020)
        report = h.next_report()
        assert report.accepted and report.input == "gate"
        assert report.duration >= 0.010
        assert lasted >= 0.020
        # The mock pin calls back in the driving thread; the decision must still come
        # from the worker, as it does with lgpio's own thread on a Pi.
        assert h.threads == ["panic-inputs"]


def test_a_2_ms_glitch_is_not_a_press():
    with Harness(gate={"pin": 17, "min_press_ms": 10}) as h:
        pin = h.inputs.pin("gate")
        for _attempt in range(20):
            lasted = pulse(h.contacts["gate"], pin, 0.002)
            report = h.next_report()
            if lasted < 0.008:  # the machine did not stretch it towards the threshold
                break
        assert not report.accepted, report
        assert "glitch" in report.reason
        assert h.reports.empty()


def test_a_long_hold_is_one_press_and_a_second_press_is_another():
    with Harness(gate={"pin": 17, "min_press_ms": 5}) as h:
        contact = h.contacts["gate"]
        contact.press()
        first = h.next_report()  # decided while still held, at the deadline
        assert first.accepted
        with pytest.raises(queue.Empty):
            h.reports.get(timeout=0.1)  # still held: nothing more
        contact.release()
        threading.Event().wait(0.02)  # released for longer than the bounce time (5 ms)
        contact.press_for(0.03)
        second = h.next_report()
        assert second.accepted and second.edge_ticks > first.edge_ticks


def test_a_cut_wire_on_a_normally_closed_loop_raises_an_alarm():
    with Harness(loop={"pin": 5, "contact": "normally-closed", "pull": "up",
                       "min_press_ms": 5}) as h:
        pin = h.inputs.pin("loop")
        assert pin.state == 0  # the loop is closed at rest: pulled to ground
        pin.drive_high()       # the wire is cut: the pull-up wins
        assert h.next_report().accepted


def test_an_input_already_active_at_start_counts_as_a_press():
    """A loop cut (or a button held) before the daemon starts gives no edge to see; it
    is still an alarm, not silently ignored."""
    factory = MockFactory()
    reports = queue.Queue()
    # Normally closed with a pull-up and nothing driving the pin: the loop is open.
    spec = InputConfig(pin=5, contact="normally-closed", pull="up", min_press_ms=5)
    inputs = PanicInputs(factory, {"loop": spec}, reports.put)
    try:
        assert inputs.is_active("loop")
        inputs.start()
        assert reports.get(timeout=5).accepted
    finally:
        inputs.close()
        factory.close()


@pytest.mark.parametrize(("contact", "pull", "pressed_level"), [
    ("normally-open", "up", False), ("normally-closed", "up", True),
    ("normally-open", "down", True), ("normally-closed", "down", False),
])
def test_the_active_level_follows_the_wiring(contact, pull, pressed_level):
    assert active_level(contact, pull) is pressed_level


def test_several_inputs_are_independent():
    with Harness(gate={"pin": 17, "min_press_ms": 5}, desk={"pin": 27, "min_press_ms": 5}) as h:
        h.contacts["desk"].press_for(0.02)
        h.contacts["gate"].press_for(0.02)
        names = {h.next_report().input, h.next_report().input}
        assert names == {"gate", "desk"}


def test_the_named_pin_factory_or_nothing():
    factory = open_pin_factory("mock")
    assert type(factory).__name__ == "MockFactory"
    factory.close()
    # No Raspberry Pi here: lgpio is not installed, and gpiozero must not fall back to
    # another factory behind our back.
    with pytest.raises(PinFactoryError, match="lgpio"):
        open_pin_factory("lgpio")
    with pytest.raises(PinFactoryError, match="unknown pin factory 'rpigpio'"):
        open_pin_factory("rpigpio")


def test_edges_stamped_on_the_wall_clock_are_converted_to_the_monotonic_clock(caplog):
    """lgpio passes the kernel's event timestamps; a kernel that stamps GPIO events with
    the wall clock (before Linux 5.7) must not push every deadline decades away (a button
    held down would never count), nor lose the edge's own time: a 25 ms press whose edges
    reach us late still lasted 25 ms. The driver calls when_changed like this."""
    with Harness(gate={"pin": 17, "min_press_ms": 20}) as h:
        pin = h.inputs.pin("gate")
        callback = pin.when_changed
        pin.when_changed = None
        pressed = time.time() - 0.100  # the press began 100 ms ago, and lasted 25 ms
        callback(pressed, 0)
        callback(pressed + 0.025, 1)
        report = h.next_report()
        assert report.accepted and abs(report.duration - 0.025) < 0.002, report
        assert 0.09 < report.age < 5
        assert "converted from the wall clock" in caplog.text


def test_edges_stamped_on_no_known_clock_are_timed_on_arrival(caplog):
    with Harness(gate={"pin": 17, "min_press_ms": 5}) as h:
        pin = h.inputs.pin("gate")
        callback = pin.when_changed
        pin.when_changed = None
        pin.drive_low()  # the button is down: the level the driver reads ...
        pin.when_changed = callback
        callback(-1e9, 0)  # ... and its event, stamped on some other clock
        report = h.next_report()  # accepted at its deadline, while still held
        assert report.accepted and report.age < 5
        assert "timed on arrival" in caplog.text
