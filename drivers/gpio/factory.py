"""Open the gpiozero pin factory the configuration names, and nothing else.

gpiozero, left to itself, tries lgpio, then RPi.GPIO, then pigpio, then native, and
settles on the first that imports. On a Pi 5 only lgpio works, so a silent fallback
gives a daemon that starts fine and never sees a press. We construct the named
factory directly, so a missing library is an error at start, not a dead button.
"""

from __future__ import annotations

import logging
import os

from gpiozero import Factory

log = logging.getLogger(__name__)


class PinFactoryError(RuntimeError):
    """The configured pin factory cannot be used; ``permanent`` if retrying cannot help."""

    def __init__(self, message: str, *, permanent: bool = True):
        super().__init__(message)
        self.permanent = permanent


def _construct(name: str, chip: int | None) -> Factory:
    if name == "mock":
        from gpiozero.pins.mock import MockFactory

        return MockFactory()
    if name == "lgpio":
        from gpiozero.pins.lgpio import LGPIOFactory

        return LGPIOFactory(chip=chip)
    raise PinFactoryError(f"unknown pin factory {name!r}")


_EXPECTED_CLASS = {"mock": "MockFactory", "lgpio": "LGPIOFactory"}


def open_pin_factory(name: str, chip: int | None = None) -> Factory:
    """Return a new pin factory of exactly the named kind, or raise :class:`PinFactoryError`."""
    env = os.environ.get("GPIOZERO_PIN_FACTORY")
    if env and env != name:
        # Devices get our factory explicitly, so the variable has no effect; say so
        # instead of leaving the installer to wonder which one is in use.
        log.warning("GPIOZERO_PIN_FACTORY=%s is ignored; the configuration says %s", env, name)
    try:
        factory = _construct(name, chip)
    except ImportError as err:
        hint = {"lgpio": "install python3-lgpio (apt) or the 'pi' extra"}.get(name, "")
        raise PinFactoryError(f"pin factory {name!r} is not available: {err}; {hint}") from err
    except Exception as err:  # the libraries raise their own types (lgpio.error, RuntimeError)
        raise PinFactoryError(f"pin factory {name!r} failed to open: {err}",
                              permanent=False) from err
    if type(factory).__name__ != _EXPECTED_CLASS[name]:
        factory.close()
        raise PinFactoryError(
            f"asked for pin factory {name!r} but got {type(factory).__name__}; refusing to start"
        )
    log.info("GPIO pin factory: %s", type(factory).__name__)
    return factory
