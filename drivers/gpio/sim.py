"""A simulated contact: drives a ``MockFactory`` pin the way a wired button would.

Used by ``guardpost sim press``, the demo, the tests and the benchmark. It drives the
pin level that a real contact would produce for its wiring (normally open or closed,
pull-up or pull-down), so the whole input path, filter included, is exercised.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from gpiozero.pins.mock import MockPin

from drivers.gpio.inputs import active_level


class SimulatedContact:
    """The contact behind one mock input pin.

    Several things can close it at once, as on a real panel: the guard's button and the
    test relay wired across it. The input reads "pressed" while any of them presses.
    """

    def __init__(self, pin: MockPin, contact: str, pull: str):
        if not isinstance(pin, MockPin):
            raise TypeError(f"{pin!r} is not a mock pin: simulation needs pin_factory = 'mock'")
        self._pin = pin
        self._active = active_level(contact, pull)
        self._lock = threading.Lock()  # one press at a time per contact
        self._level_lock = threading.Lock()
        self._pressed_by: set[str] = set()
        self._drive(not self._active)  # a normally-closed loop is closed at rest

    def _drive(self, level: bool) -> None:
        if level:
            self._pin.drive_high()
        else:
            self._pin.drive_low()

    def press(self, by: str = "button") -> None:
        with self._level_lock:
            self._pressed_by.add(by)
            self._drive(self._active)

    def release(self, by: str = "button") -> None:
        with self._level_lock:
            self._pressed_by.discard(by)
            if not self._pressed_by:
                self._drive(not self._active)

    def press_for(self, seconds: float, stop: threading.Event | None = None) -> None:
        """Press, hold for ``seconds`` (a wait that ``stop`` can cut short), release."""
        with self._lock:
            self.press()
            try:
                if seconds > 0:
                    (stop or threading.Event()).wait(seconds)
            finally:
                self.release()


class RelayWiredPin(MockPin):
    """A mock output pin whose relay contact is wired across a panic input.

    ``on_change(level)`` is called with the new pin level each time the output changes,
    from the thread that set it, as a real relay would close the contact.
    """

    def __init__(self, factory, info, on_change: Callable[[bool], None] | None = None):
        super().__init__(factory, info)
        self.on_change = on_change

    def _change_state(self, value):
        changed = self._state != value
        super()._change_state(value)
        if changed and self.on_change is not None:
            self.on_change(bool(value))


def wire_test_relay(factory, relay_pin: int, active_high: bool,
                    contact: Callable[[], SimulatedContact | None]) -> RelayWiredPin:
    """Wire (in the fake) the test relay's output to the contact of its panic input;
    call before the output device is created on ``relay_pin``."""

    def follow(level: bool) -> None:
        target = contact()
        if target is None:
            return
        if level == active_high:
            target.press(by="test relay")
        else:
            target.release(by="test relay")

    return factory.pin(relay_pin, pin_class=RelayWiredPin, on_change=follow)


class LaggingPin(MockPin):
    """A mock input pin whose edges reach their callback late, on a thread of their own.

    gpiozero's MockPin calls back at once, in the thread that drives it. lgpio delivers
    edges from its alert thread, after the level has changed, and on a loaded Pi that can
    take long. Code that reads the level, or waits for a decision, must survive that: this
    fake makes the lag as long as a test needs (``lag`` seconds; set it on a subclass).
    Edges keep their own timestamps and their order.
    """

    lag = 0.001

    def __init__(self, factory, info):
        super().__init__(factory, info)
        self._deliveries: queue.SimpleQueue = queue.SimpleQueue()
        self._courier = threading.Thread(target=self._deliver, daemon=True,
                                         name=f"edges-{info.name}")
        self._courier.start()

    def _call_when_changed(self):
        self._deliveries.put((self._last_change, self._state))

    def _deliver(self) -> None:
        while (item := self._deliveries.get()) is not None:
            ticks, state = item
            delay = ticks + self.lag - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # this thread stands for the driver's: it is the lag
            super(MockPin, self)._call_when_changed(ticks, state)

    def close(self):
        self._deliveries.put(None)
        super().close()
