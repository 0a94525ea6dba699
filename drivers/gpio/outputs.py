"""What the guard sees and hears: status LED, buzzer, siren relay, test relay.

The LED tells the story of the latest alarm: fast blink while it is only on this
device, slow blink once the broker has it, steady when the police platform has
acknowledged it. The buzzer chirps once when an alarm is durably recorded and twice
when the police have received it.
"""

from __future__ import annotations

import logging
import threading
from enum import StrEnum
from typing import TYPE_CHECKING

from gpiozero import LED, Buzzer, DigitalOutputDevice, Factory

if TYPE_CHECKING:
    from edge.config import OutputConfig, OutputsConfig

log = logging.getLogger(__name__)


class LedPattern(StrEnum):
    OFF = "off"
    FAST_BLINK = "fast-blink"   # recorded here, not yet at the broker
    SLOW_BLINK = "slow-blink"   # at the broker, not yet acknowledged by the platform
    STEADY = "steady"           # the platform acknowledged: police received it
    FAULT = "fault"             # the alarm could not be recorded: see the logs

_BLINK_TIMES = {
    LedPattern.FAST_BLINK: (0.1, 0.1),
    LedPattern.SLOW_BLINK: (0.5, 0.5),
    LedPattern.FAULT: (0.05, 0.45),
}

CHIRP_ON_S = 0.08
CHIRP_OFF_S = 0.12


class Indicators:
    """The outputs of the device; any of them may be absent from the configuration."""

    def __init__(self, factory: Factory, outputs: OutputsConfig):
        self._lock = threading.Lock()
        self._devices: list[DigitalOutputDevice] = []
        try:
            self.led = self._make(LED, outputs.status_led, factory)
            self.buzzer = self._make(Buzzer, outputs.buzzer, factory)
            self.siren_relay = self._make(DigitalOutputDevice, outputs.siren, factory)
            self.test_relay = self._make(DigitalOutputDevice, outputs.test_relay, factory)
        except Exception:
            self.close()
            raise
        self.pattern = LedPattern.OFF

    def _make(self, kind, spec: OutputConfig | None, factory: Factory):
        if spec is None:
            return None
        device = kind(f"GPIO{spec.pin}", active_high=spec.active_high, initial_value=False,
                      pin_factory=factory)
        self._devices.append(device)
        return device

    def show(self, pattern: LedPattern) -> None:
        """Set the status LED pattern (idempotent: the same pattern is left running)."""
        with self._lock:
            if pattern == self.pattern:
                return
            self.pattern = pattern
            log.info("status LED: %s", pattern.value)
            if self.led is None:
                return
            if pattern == LedPattern.OFF:
                self.led.off()
            elif pattern == LedPattern.STEADY:
                self.led.on()
            else:
                on_time, off_time = _BLINK_TIMES[pattern]
                self.led.blink(on_time=on_time, off_time=off_time, background=True)

    def chirp(self, times: int = 1) -> None:
        """Short beeps in the background; the caller never waits for the buzzer."""
        log.info("buzzer: %d chirp%s", times, "" if times == 1 else "s")
        if self.buzzer is not None:
            self.buzzer.beep(on_time=CHIRP_ON_S, off_time=CHIRP_OFF_S, n=times, background=True)

    def sound_siren(self, seconds: float) -> None:
        """The siren or strobe relay: on for ``seconds`` (0: until :meth:`silence_siren`),
        in the background."""
        log.info("siren: on%s", f" for {seconds:g} s" if seconds else " until reset")
        if self.siren_relay is None:
            return
        if seconds:
            self.siren_relay.blink(on_time=seconds, off_time=0, n=1, background=True)
        else:
            self.siren_relay.on()

    def silence_siren(self) -> None:
        if self.siren_relay is not None and self.siren_relay.value:
            log.info("siren: off")
            self.siren_relay.off()

    def close(self) -> None:
        for device in self._devices:
            try:
                device.close()
            except Exception:
                log.exception("closing output %s", device)
        self._devices.clear()
