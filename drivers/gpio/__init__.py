"""GPIO through gpiozero: panic inputs with a glitch filter, indicator outputs.

- :mod:`.factory`: opens exactly the pin factory the configuration names.
- :mod:`.press_filter`: the timing rules of a press (glitch, hold), pure and testable.
- :mod:`.inputs`: panic inputs; edges from gpiozero's threads go to one worker thread.
- :mod:`.outputs`: status LED, buzzer, siren and test relay.
- :mod:`.sim`: a simulated contact on gpiozero's ``MockFactory`` pins.
"""

from drivers.gpio.factory import PinFactoryError, open_pin_factory
from drivers.gpio.inputs import PanicInputs, PressReport
from drivers.gpio.outputs import Indicators
from drivers.gpio.press_filter import FilterOutcome, PressFilter

__all__ = [
    "FilterOutcome",
    "Indicators",
    "PanicInputs",
    "PinFactoryError",
    "PressFilter",
    "PressReport",
    "open_pin_factory",
]
