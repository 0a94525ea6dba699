"""The alarm latch (GB 50394 §5.2.3): once triggered, an input stays in alarm until reset.

The latch lives in the outbox database, written in the same transaction as the event
it belongs to, so a crash can never leave an alarm recorded but unlatched, or a latch
without its alarm, and ``guardpost reset`` works even while the button daemon is down.

- The first accepted press of an input commits an alarm (Contact ID 120, 122 or 123
  by the input's mode) and latches the input.
- Every further press while latched commits a *repeat*: an alarm event whose
  ``repeat_of`` names the original and whose ``repeat`` counts, so the platform sees
  the urgency. Holding the button is one press and never repeats.
- A reset commits a panic-reset event (Contact ID 465) per latched input, naming the
  alarm it clears and who cleared it, and unlatches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

from edge.config import Config, InputConfig
from edge.contract.events import (
    PANIC_CODES,
    ContactId,
    Event,
    EventDraft,
    EventKind,
    utc_iso,
    utc_now,
)
from edge.runtime.clock import boot_id, clock_synchronised
from edge.runtime.wake import wake
from edge.store.latches import Latch
from edge.store.outbox import ALARM_COMMIT_TIMEOUT_S, Outbox

__all__ = ["AlarmLatch", "Latch", "UnknownInput", "reset_alarms"]


class LatchBatch:
    """The latch rules applied to a run of presses inside one transaction."""

    def __init__(self, latch: AlarmLatch, latched: dict[str, Latch]):
        self._latch = latch
        self.clock_synced = latch.clock_synced()  # asked once for the whole batch
        self._state = dict(latched)
        self._new: set[str] = set()       # latched by this batch
        self._changed: set[str] = set()   # repeated by this batch

    def alarm(self, input_name: str, occurred_at: datetime, held_s: float | None,
              event_id: str) -> EventDraft:
        """The draft of the alarm event ``event_id`` this press is: a new alarm that
        latches the input, or a repeat of the latched one."""
        spec = self._latch.inputs.get(input_name)
        if spec is None:
            raise UnknownInput(input_name)
        detail = {"mode": spec.mode}
        if spec.label:
            detail["label"] = spec.label
        if held_s is not None:
            detail["held_ms"] = round(held_s * 1000, 1)
        code = PANIC_CODES[spec.mode]
        latched = self._state.get(input_name)
        if latched is None:
            self._state[input_name] = Latch(input_name, event_id, utc_iso(occurred_at),
                                            event_id, 0)
            self._new.add(input_name)
            return self._latch.draft(EventKind.ALARM, code, input_name, occurred_at,
                                     clock_synced=self.clock_synced, detail=detail)
        repeats = latched.repeats + 1
        self._state[input_name] = Latch(input_name, latched.alarm_id, latched.latched_at,
                                        event_id, repeats)
        self._changed.add(input_name)
        return self._latch.draft(EventKind.ALARM, code, input_name, occurred_at,
                                 clock_synced=self.clock_synced, detail=detail,
                                 repeat_of=latched.alarm_id, repeat=repeats)

    def write(self) -> None:
        """After the events are inserted: each latch this batch changed, once."""
        latches = self._latch.outbox.latches
        for name in self._new:
            latched = self._state[name]
            latches.latch(name, latched.alarm_id, latched.latched_at)
        for name in self._changed:
            latched = self._state[name]
            latches.repeated(name, latched.last_event_id, latched.repeats)


class UnknownInput(KeyError):
    """The input is not in the configuration."""


class AlarmLatch:
    """Commits presses and resets against the latch state of each input."""

    def __init__(self, outbox: Outbox, inputs: Mapping[str, InputConfig],
                 clock_synced: Callable[[], bool] = clock_synchronised):
        self._outbox = outbox
        self._inputs = inputs
        self._clock_synced = clock_synced

    @property
    def outbox(self) -> Outbox:
        return self._outbox

    @property
    def inputs(self) -> Mapping[str, InputConfig]:
        return self._inputs

    def clock_synced(self) -> bool:
        return self._clock_synced()

    def draft(self, kind: EventKind, code: int, input_name: str, occurred_at: datetime,
              *, clock_synced: bool | None = None, **extra) -> EventDraft:
        synced = self._clock_synced() if clock_synced is None else clock_synced
        return EventDraft(kind=kind, code=code, occurred_at=occurred_at, clock_synced=synced,
                          boot_id=boot_id(), input=input_name, **extra)

    def press(self, input_name: str, occurred_at: datetime | None = None,
              held_s: float | None = None, *,
              timeout: float = ALARM_COMMIT_TIMEOUT_S) -> Event:
        """Commit an accepted press durably: a new alarm, or a repeat while latched.

        The write lock is waited on for at most ``timeout`` seconds; a
        :class:`edge.store.outbox.LockTimeout` is a commit that did not happen: retry."""
        if input_name not in self._inputs:
            raise UnknownInput(input_name)
        occurred_at = occurred_at or utc_now()
        with self._outbox.transaction(timeout):
            return self.append_press(input_name, occurred_at, held_s)

    def append_press(self, input_name: str, occurred_at: datetime,
                     held_s: float | None = None) -> Event:
        """:meth:`press` inside the caller's transaction; durable when it ends."""
        [(seq, event_id)] = self._outbox.reserve_events(1)
        batch = self.batch()
        event = Event(event_id, seq, batch.alarm(input_name, occurred_at, held_s, event_id))
        self._outbox.insert_events([event])
        batch.write()
        return event

    def batch(self) -> LatchBatch:
        """Several presses in one transaction (the recorder's group commit): the latches
        are read once, and each changed latch written once, at the end."""
        return LatchBatch(self, self._outbox.latches.all())

    def reset(self, by: str, input_name: str | None = None) -> list[Event]:
        """Clear the latch of one input (or all); returns the reset events committed."""
        if input_name is not None and input_name not in self._inputs:
            raise UnknownInput(input_name)
        events = []
        now = utc_now()
        latches = self._outbox.latches
        with self._outbox.transaction():
            for latch in latches.all().values():
                if input_name is not None and latch.input != input_name:
                    continue
                events.append(self._outbox.append(self.draft(
                    EventKind.RESET, ContactId.PANIC_RESET, latch.input, now,
                    detail={"alarm_id": latch.alarm_id, "latched_at": latch.latched_at,
                            "repeats": latch.repeats, "by": by},
                )))
                latches.clear(latch.input)
        return events

    def latches(self) -> dict[str, Latch]:
        """Every latched input, by name."""
        return self._outbox.latches.all()


def reset_alarms(config: Config, by: str, input_name: str | None = None) -> list[Event]:
    """What ``guardpost reset`` does: commit the resets, then wake the daemons.

    It needs only the database, so it works while the button daemon is down; the
    button daemon turns the LED off when it next looks (at once, if it is running).
    """
    with Outbox(config.storage.database, config.identity) as outbox:
        events = AlarmLatch(outbox, config.inputs).reset(by=by, input_name=input_name)
    for daemon in ("uplink", "button"):
        wake(config.storage.runtime_dir, daemon)
    return events
