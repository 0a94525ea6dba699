"""A simulated contact: drives a ``MockFactory`` pin the way a wired button would.

Used by ``guardpost sim press``, the demo, the tests and the benchmark. It drives the
pin level that a real contact would produce for its wiring (normally open or closed,
pull-up or pull-down), so the whole input path, filter included, is exercised.
"""

from __future__ import annotations

import threading

from gpiozero.pins.mock import MockPin

from drivers.gpio.inputs import active_level


class SimulatedContact:
    """The contact behind one mock input pin."""

    def __init__(self, pin: MockPin, contact: str, pull: str):
        if not isinstance(pin, MockPin):
            raise TypeError(f"{pin!r} is not a mock pin: simulation needs pin_factory = 'mock'")
        self._pin = pin
        self._active = active_level(contact, pull)
        self._lock = threading.Lock()  # one press at a time per contact
        self.release()  # a normally-closed loop is closed at rest

    def _drive(self, level: bool) -> None:
        if level:
            self._pin.drive_high()
        else:
            self._pin.drive_low()

    def press(self) -> None:
        self._drive(self._active)

    def release(self) -> None:
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
