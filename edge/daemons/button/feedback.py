"""What the guard sees and hears: the status LED, the buzzer and the siren.

- a press recorded: one chirp, the LED blinks fast (the alarm is on the device);
- at the broker: slow blink; acknowledged by the police platform: steady, two chirps;
- a press that cannot be recorded, a commit that hangs, a dead recorder: the fault pattern,
  never a pattern that says "recorded" when it is not;
- no latched alarm: off (the siren stops at the reset).

``silent`` inputs neither chirp nor sound the siren; ``audible`` ones sound it.
"""

from __future__ import annotations

import logging
import threading
import time

from drivers.gpio import Indicators
from drivers.gpio.outputs import LedPattern
from edge.config import Config
from edge.contract.events import Event, EventKind
from edge.daemons.button.latch import AlarmLatch
from edge.daemons.button.recorder import AcceptedPress, Recorder
from edge.store.outbox import ACKNOWLEDGED, QUEUED, Outbox
from edge.store.reserve import SpaceReserve

log = logging.getLogger(__name__)

COMMIT_STUCK_S = 2.0  # a commit taking longer than this shows the fault pattern


class Feedback:
    """Drives the indicators from what was recorded and from what the outbox says."""

    def __init__(self, config: Config, indicators: Indicators, recorder: Recorder):
        self.config = config
        self.indicators = indicators
        self.recorder = recorder
        # The "recorded" chirp and the refresh from the outbox take turns, so the guard
        # never hears the chirp after the LED has moved on.
        self._lock = threading.Lock()
        self._announced_acks: set[str] | None = None  # None until the first refresh
        self.reserve = SpaceReserve.of(config.storage)

    def recorded(self, press: AcceptedPress, event: Event) -> None:
        cfg = self.config
        with self._lock:
            log.info("%s recorded: input %s, seq %d, id %s%s", event.kind.value.upper(),
                     press.report.input, event.seq, event.id,
                     f", repeat {event.draft.repeat} of {event.draft.repeat_of}"
                     if event.draft.repeat_of else "")
            mode = cfg.inputs[press.report.input].mode
            if mode != "silent":
                self.indicators.chirp(1)
            if event.kind == EventKind.ALARM:
                self.indicators.show(LedPattern.FAST_BLINK)
                if mode == "audible" and cfg.outputs.siren and not event.draft.repeat_of:
                    self.indicators.sound_siren(cfg.outputs.siren.sound_for_s)

    def failing(self) -> None:
        self.indicators.show(LedPattern.FAULT)

    def refresh(self, outbox: Outbox, latch: AlarmLatch) -> None:
        """Set the LED from the latest event of each latched input, as the outbox has it."""
        with self._lock:
            self._refresh(outbox, latch)

    def _refresh(self, outbox: Outbox, latch: AlarmLatch) -> None:
        if not self.recorder.alive():
            log.critical("the recorder thread has died: presses are not being recorded")
            self.indicators.show(LedPattern.FAULT)
            return
        started = self.recorder.commit_started
        if started is not None and time.monotonic() - started > COMMIT_STUCK_S:
            # A commit that hangs (a failing SD card, a writer holding the lock) must
            # not look like a recorded alarm.
            log.critical("an alarm commit has been waiting for %.0f s",
                         time.monotonic() - started)
            self.indicators.show(LedPattern.FAULT)
            return
        if self.recorder.failing_since is not None:
            self.indicators.show(LedPattern.FAULT)  # a commit failed: it is being retried
            return
        latches = latch.latches()
        states = outbox.event_states(lt.last_event_id for lt in latches.values())
        if self._announced_acks is None:
            # At start, acknowledgements that arrived before are not news: no chirps.
            self._announced_acks = {i for i, state in states.items() if state == ACKNOWLEDGED}
        if not latches:
            # A full disk (alarms recorded from the reserve) shows the fault: the
            # installer must come. A latched alarm's pattern goes first (below).
            self.indicators.show(LedPattern.FAULT if self.reserve.drawn() else LedPattern.OFF)
            self.indicators.silence_siren()  # the alarm was reset
            self._announced_acks.clear()
            return
        seen = [states.get(lt.last_event_id, QUEUED) for lt in latches.values()]
        if QUEUED in seen:
            pattern = LedPattern.FAST_BLINK
        elif all(state == ACKNOWLEDGED for state in seen):
            pattern = LedPattern.STEADY
        else:
            pattern = LedPattern.SLOW_BLINK
        for name, lt in latches.items():
            newly_acknowledged = (states.get(lt.last_event_id) == ACKNOWLEDGED
                                  and lt.last_event_id not in self._announced_acks)
            if newly_acknowledged:
                self._announced_acks.add(lt.last_event_id)
                log.info("police platform acknowledged the alarm on %s", name)
                spec = self.config.inputs.get(name)
                if spec is not None and spec.mode != "silent":
                    self.indicators.chirp(2)
        self.indicators.show(pattern)
