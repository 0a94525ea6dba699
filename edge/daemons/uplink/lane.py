"""The side lane: what the device publishes that is not an event (answers to commands,
rejections), at a lower priority than every event.

Before, each of 10,000 bad messages was answered, the answers shared the in-flight slots
with alarms, and a live alarm waited 1.5 s behind them. Now:

- side messages are published only into slots no event wants: after the window has
  taken every event it can, and never the last free slot (an alarm that comes next
  finds it); at most :data:`IN_FLIGHT` at a time, so paho never queues them where an
  alarm would wait behind them;
- the queue is bounded; answers to commands go before rejections;
- rejections (and refusals of commands) pass a token bucket: the excess is counted and
  summarised, not answered one by one.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import paho.mqtt.client as paho

log = logging.getLogger(__name__)

IN_FLIGHT = 2       # side messages in flight at once
QUEUE_LIMIT = 64    # waiting side messages; a rejection beyond it is counted, not sent


@dataclass(frozen=True)
class SideMessage:
    """One answer to publish: ``test_id`` marks the result reply of a platform test (its
    PUBACK is recorded, so the result is not sent again)."""

    topic: str
    payload: bytes
    properties: object | None = None
    test_id: str | None = None
    reply: bool = False    # an answer to a command (goes before rejections)


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; monotonic time."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._at: float | None = None

    def take(self, now: float) -> bool:
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def wait(self) -> float:
        """Seconds until :meth:`take` would succeed (after one that did not)."""
        return max(0.0, (1 - self._tokens) / self.rate)


class SideLane:
    """Answers and rejections waiting for a slot no event wants."""

    def __init__(self):
        self._replies: deque[SideMessage] = deque()
        self._rejections: deque[SideMessage] = deque()
        self.inflight: dict[int, SideMessage] = {}   # paho message id -> message

    def __len__(self) -> int:
        return len(self._replies) + len(self._rejections)

    def add(self, message: SideMessage) -> bool:
        """Queue ``message``; False (not queued) when the lane is full of rejections."""
        if message.reply:
            self._replies.append(message)  # bounded by the commands themselves
            return True
        if len(self._rejections) >= QUEUE_LIMIT:
            return False
        self._rejections.append(message)
        return True

    def publish(self, client: paho.Client, free_slots: int) -> int:
        """Publish into ``free_slots`` less the one kept for the next alarm."""
        room = min(free_slots - 1, IN_FLIGHT - len(self.inflight))
        published = 0
        while room > published and (self._replies or self._rejections):
            message = (self._replies or self._rejections).popleft()
            info = client.publish(message.topic, message.payload, qos=1,
                                  properties=message.properties)
            self.inflight[info.mid] = message
            published += 1
        return published

    def acked(self, mid: int) -> SideMessage | None:
        return self.inflight.pop(mid, None)
