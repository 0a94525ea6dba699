"""Alarms and tests the broker took but the platform has not acknowledged: published again.

A PUBACK is one hop. A broker that restarts without persistence had PUBACKed alarms and
then lost them (13 of 1,064 over 30 restarts never reached the platform). As SIA DC-09
retransmits until its ACK, an alarm or test that is ``sent`` and not ``acknowledged`` is
published again, same id and same bytes (the platform de-duplicates by id):

- ``republish_after_s`` after the broker took it, then after pauses doubling up to
  ``republish_max_s``, until the platform acknowledges it;
- at once after a connection whose CONNACK says the broker had no session for us: it
  has forgotten everything, the messages it was holding for the platform included.

The schedule lives in memory (the outbox keeps the rows and their state): at start it is
read back from the outbox, every unacknowledged row due ``republish_after_s`` after it
was sent. Times are on the monotonic clock; ``sent_at`` (wall clock) only says how long
ago a row was sent when the daemon starts, and is clamped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from edge.contract.events import utc_now
from edge.store.outbox import Outbox, QueuedMessage

log = logging.getLogger(__name__)


@dataclass
class _Due:
    seq: int
    priority: int
    due: float            # monotonic; inf while it is in flight
    attempts: int = 0     # publications after the first


class Resend:
    """When each unacknowledged alarm or test is due to be published again."""

    def __init__(self, first_s: float, cap_s: float):
        self.first_s, self.cap_s = first_s, cap_s
        self._rows: dict[str, _Due] = {}   # event id -> its schedule
        self.republished = 0               # publications again, since start

    def __len__(self) -> int:
        return len(self._rows)

    def load(self, outbox: Outbox, now: float, wall: datetime | None = None) -> int:
        """Read back every unacknowledged row; returns how many there are."""
        wall = wall or utc_now()
        for event_id, seq, priority, sent_at in outbox.sent_unacknowledged():
            age = 0.0
            if sent_at:
                age = (wall - datetime.fromisoformat(sent_at)).total_seconds()
            wait = min(self.first_s, max(0.0, self.first_s - age))
            self._rows[event_id] = _Due(seq, priority, now + wait)
        if self._rows:
            log.info("%d alarm(s) and test(s) await the platform's acknowledgement",
                     len(self._rows))
        return len(self._rows)

    def took(self, event_id: str, seq: int, priority: int, now: float, *,
             again: bool) -> None:
        """The broker took it (PUBACK): the platform's acknowledgement is awaited."""
        row = self._rows.get(event_id)
        if row is None:
            if again:
                return  # acknowledged while it was on its way again
            row = self._rows[event_id] = _Due(seq, priority, 0.0)
        elif again:
            row.attempts += 1
        row.due = now + min(self.cap_s, self.first_s * 2 ** row.attempts)

    def postpone(self, event_id: str, until: float) -> None:
        """Published again but not taken (nobody subscribed, or refused): try at ``until``."""
        row = self._rows.get(event_id)
        if row is not None:
            row.due = until

    def acknowledged(self, event_ids) -> None:
        for event_id in event_ids:
            self._rows.pop(event_id, None)

    def session_lost(self, now: float) -> int:
        """The broker had no session for us: everything it took may be gone. Returns how
        many rows are due now."""
        count = 0
        for row in self._rows.values():
            if row.due != float("inf"):
                row.due = now
                count += 1
        return count

    def due(self, now: float, limit: int) -> list[tuple[int, int, str]]:
        """Up to ``limit`` rows due now, in publishing order: ``(priority, seq, event id)``."""
        if limit <= 0 or not self._rows:
            return []
        ready = [(row.priority, row.seq, event_id) for event_id, row in self._rows.items()
                 if row.due <= now]
        return sorted(ready)[:limit]

    def next_due(self) -> float | None:
        return min((row.due for row in self._rows.values()), default=None)

    def fetch(self, outbox: Outbox, event_ids: list[str]) -> list[QueuedMessage]:
        """The rows to publish again; those acknowledged meanwhile leave the schedule.
        Each returned row is in flight until :meth:`took` or :meth:`postpone`."""
        rows = outbox.published_rows(event_ids)
        found = {row.id for row in rows}
        self.acknowledged(set(event_ids) - found)
        for row in rows:
            self._rows[row.id].due = float("inf")
            self.republished += 1
        return rows
