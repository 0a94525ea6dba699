"""The publish window: which outbox rows are published next, and what their PUBACKs mean.

- Rows are published in priority order at QoS 1, at most ``inflight_window`` at a time
  (clamped to the broker's MQTT 5 Receive Maximum), so a new alarm waits for at most one
  free slot, never behind a backlog being drained. The queue is walked with a cursor
  instead of being re-read from the top (what is in flight would be read again and
  again); a wake-up (something was committed) starts the walk from the top.
- A PUBACK marks a row ``sent``, recorded in batches (at most ``MARK_DELAY_S`` old or
  ``MARK_BATCH`` rows; at once for an alarm or test, which light the LED and time tests).
- A PUBACK is not delivery: 0x10 "No matching subscribers" means nobody got it. The row
  stays queued and is tried again with a growing pause, and while nobody listens only
  alarms go out besides those retries (each is a probe; a backlog is not thrown away
  message by message). A PUBACK with an error (0x87 not authorised) holds the row back
  for ``HOLD_BACK_S``; a snapshot refused is dropped (its size or the ACL: it would be
  refused again).
- Alarms and tests the platform has not acknowledged come back from :class:`Resend`
  and go after the live rows of their priority.
- Event properties (content type, response topic) are encoded once; each event adds its
  id as MQTT 5 Correlation Data, as the contract says.
- Every event payload is signed here, as it is published, with the device's event key
  (:mod:`edge.contract.event_signature`): the key stays in this process and the alarm
  path in the button daemon does no cryptography. Ed25519 is deterministic: an event
  published again is the same bytes. A snapshot's description carries its JPEG's
  ``sha256`` and a signature too.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.config import Config
from edge.contract.event_signature import EventSigner
from edge.contract.events import ACK_REQUIRED, Priority
from edge.contract.messages import Topics, snapshot_description
from edge.daemons.uplink.resend import Resend
from edge.runtime.mqtt import PackedProperties, is_v5, user_property
from edge.store.outbox import Outbox, QueuedMessage
from edge.store.snapshots import QueuedSnapshot, SnapshotStore

log = logging.getLogger(__name__)

HOLD_BACK_S = 30.0          # a row the broker refused is retried after this long
UNHEARD_FIRST_S = 1.0       # a row nobody subscribed to is tried again after this long ...
UNHEARD_MAX_S = 60.0        # ... doubling up to this while nobody listens
MARK_DELAY_S = 0.05         # PUBACKs are recorded in batches at most this old ...
MARK_BATCH = 256            # ... or this large (an alarm's PUBACK is recorded at once)
CURSOR_REFRESH_S = 1.0      # the queue is re-read from the top at least this often
# Snapshots are large: a few in flight keep the link busy, more would take the window's
# slots (and the link's bandwidth) from an alarm that comes next.
SNAPSHOTS_IN_FLIGHT = 2
NO_MATCHING_SUBSCRIBERS = 0x10
_ACK_KINDS = {kind.value for kind in ACK_REQUIRED}


@dataclass(frozen=True)
class InFlight:
    """An outbox row published and not yet settled."""

    seq: int                    # the event's sequence number, or the snapshot's row id
    priority: int
    snapshot: bool = False
    event_id: str | None = None
    needs_ack: bool = False     # an alarm or test: the platform must acknowledge it
    again: bool = False         # published again, not for the first time


class _DrainLog:
    """Says how long it took to empty the outbox, once it is empty again."""

    def __init__(self):
        self.started: float | None = None
        self.count = 0

    def published(self, count: int) -> None:
        if count and self.started is None:
            self.started = time.monotonic()

    def delivered(self) -> None:
        self.count += 1

    def finish(self) -> None:
        if self.started is None or not self.count:
            self.started = None
            return
        seconds = max(time.monotonic() - self.started, 1e-9)
        level = logging.INFO if self.count >= 100 else logging.DEBUG
        log.log(level, "outbox empty: %d message(s) delivered in %.3f s (%.0f/s)",
                self.count, seconds, self.count / seconds)
        self.started, self.count = None, 0


class PublishWindow:
    """Publishes the outbox in priority order and settles the broker's PUBACKs."""

    def __init__(self, config: Config, topics: Topics, snapshots: SnapshotStore,
                 resend: Resend, wake_button):
        self.config = config
        self.topics = topics
        self.size = config.uplink.inflight_window
        self._snapshots = snapshots
        self._resend = resend
        self._wake_button = wake_button
        self.inflight: dict[int, InFlight] = {}      # paho message id -> outbox row
        self._urgent_at: dict[int, float] = {}       # alarms and tests in flight: since when
        self._refused: dict[InFlight, float] = {}    # row the broker refused -> retry time
        self._unheard: dict[InFlight, float] = {}    # row nobody subscribed to -> retry time
        self._unheard_streak = 0                     # rounds of retries nobody heard
        self._unheard_round_until = 0.0              # this round's rows are retried then
        self.unheard_topic: str | None = None        # the last topic nobody subscribed to
        # Where the walk through the queue has got to: (priority, seq) of the last row
        # published, or None to start again from the top (a new row may outrank it).
        self._cursor: tuple[int, int] | None = None
        self._cursor_is_frontier = False  # True: every published row is behind the cursor
        self._cursor_set_at = 0.0
        self._unmarked: list[InFlight] = []          # PUBACKed, not yet recorded as sent
        self._unmarked_since = 0.0
        self._unmarked_urgent = False
        self._max_packet: int | None = None          # the broker's MQTT 5 Maximum Packet Size
        self._event_props: PackedProperties | None = None
        self._recovered_props: PackedProperties | None = None
        self._drain = _DrainLog()
        self._signer = EventSigner.from_file(config.trust.event_key)

    # -- the connection's life -------------------------------------------------------------

    def connected(self, size: int, max_packet: int | None, now: float) -> None:
        """A new connection: its window size, and paho re-sends what was in flight."""
        self.size, self._max_packet = size, max_packet
        self._cursor = None
        self._urgent_at = dict.fromkeys(self._urgent_at, now)

    def restart_walk(self) -> None:
        """Something was committed: it may outrank the cursor."""
        self._cursor = None

    # -- publishing ------------------------------------------------------------------------

    def free(self, others: int = 0) -> int:
        return self.size - len(self.inflight) - others

    def fill(self, client: paho.Client, outbox: Outbox, now: float, others: int = 0) -> int:
        """Publish the next rows, up to the window (``others``: slots taken by messages that
        are not outbox rows); returns how many slots are still free."""
        free = self.free(others)
        if free <= 0:
            return 0
        self._release(now)
        only_alarms = any(until > now for until in self._unheard.values())
        due = self._resend.due(now, free) if len(self._resend) else []
        if due:
            published = self._fill_with_resends(client, outbox, free, now, only_alarms, due)
        else:  # the drain's hot path
            rows = self._walk(outbox, free, now, only_alarms)
            self._publish_rows(client, rows, now, again=False)
            published = len(rows)
        published += self._fill_snapshots(client, free - published)
        if not published and not self.inflight:
            self.flush_marks(outbox)
            if not self._unheard and not self._refused:
                self._drain.finish()
        self._drain.published(published)
        return free - published

    def _fill_with_resends(self, client: paho.Client, outbox: Outbox, free: int, now: float,
                           only_alarms: bool, due: list[tuple[int, int, str]]) -> int:
        """Rows to publish again and queued rows, merged in publishing order (priority,
        then seq): after a move to another broker, an alarm the platform never
        acknowledged goes there before the alarm pressed since, never after it. Returns
        how many were published."""
        cursor = (self._cursor, self._cursor_set_at, self._cursor_is_frontier)
        rows = self._walk(outbox, free, now, only_alarms)
        merged = sorted([(row.priority, row.seq, row) for row in rows]
                        + [(priority, seq, event_id) for priority, seq, event_id in due],
                        key=lambda item: item[:2])[:free]
        taken = [item[2] for item in merged if not isinstance(item[2], str)]
        if len(taken) < len(rows):   # the walk went further than what fits: step back
            if taken:
                self._cursor = (taken[-1].priority, taken[-1].seq)
            else:
                self._cursor, self._cursor_set_at, self._cursor_is_frontier = cursor
        again = {row.id: row for row in self._resend.fetch(
            outbox, [item[2] for item in merged if isinstance(item[2], str)])}
        published = 0
        for _, _, item in merged:
            if isinstance(item, str):
                if (row := again.get(item)) is None:
                    continue   # acknowledged meanwhile
                self._publish_rows(client, [row], now, again=True)
            else:
                self._publish_rows(client, [item], now, again=False)
            published += 1
        return published

    def _release(self, now: float) -> None:
        """Rows held back whose time has come go back into the walk."""
        for held in (self._refused, self._unheard):
            due = [row for row, until in held.items() if until <= now]
            for row in due:
                del held[row]
            if due:
                self._cursor = None  # they are behind the cursor

    def _walk(self, outbox: Outbox, free: int, now: float,
              only_alarms: bool) -> list[QueuedMessage]:
        """The next queued rows after the cursor (from the top when it was reset)."""
        if self._cursor is not None and now - self._cursor_set_at > CURSOR_REFRESH_S:
            self._cursor = None  # a new row whose wake-up was lost waits at most this long
        # Rows published and not yet recorded as sent still read "queued": skip them.
        if self._cursor is None:
            exclude = {row.seq for row in self._unsettled()}
            rows = outbox.next_queued(free, exclude)
            self._cursor_is_frontier = False
        elif self._cursor_is_frontier:  # the common case: nothing published lies beyond
            rows = outbox.queued_after(*self._cursor, free)
        else:
            # Just after a restart from the top, rows published before it may lie beyond.
            ahead = {row.seq for row in self._unsettled()
                     if (row.priority, row.seq) > self._cursor}
            self._cursor_is_frontier = not ahead
            rows = outbox.queued_after(*self._cursor, free + len(ahead))
            rows = [row for row in rows if row.seq not in ahead][:free]
        if only_alarms:
            # Nobody listens: the rows held back probe for the platform, and so does each
            # new alarm; the rest waits (the cursor stays before it).
            rows = [row for row in rows if row.priority <= Priority.ALARM]
        if rows:
            if self._cursor is None:
                self._cursor_set_at = now
            self._cursor = (rows[-1].priority, rows[-1].seq)
        elif not only_alarms:
            self._cursor = None
        return rows

    def _event_properties(self, recovered: bool = False) -> PackedProperties | None:
        """Content type and response topic, encoded once (each event adds its id); an
        event read back from a damaged outbox also says so (user property
        ``recovered``: its bytes are the same as they were)."""
        if self._event_props is None and is_v5(self.config.broker):
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = "application/json"
            # Where the platform answers: the acknowledgement names the event id.
            props.ResponseTopic = self.topics.ack
            self._event_props = PackedProperties.of(props)
            props.UserProperty = ("recovered", "true")
            self._recovered_props = PackedProperties.of(props)
        return self._recovered_props if recovered and self._event_props else self._event_props

    def _publish_rows(self, client: paho.Client, rows: list[QueuedMessage], now: float, *,
                      again: bool) -> None:
        # (The hot loop of a drain: names looked up once.)
        template, prefix, inflight = self._event_properties(), self.topics.prefix, self.inflight
        sign = self._signer.sign
        for row in rows:
            if row.recovered and template is not None:
                template = self._event_properties(recovered=True)
            properties = None
            if template is not None:
                # An alarm, reset or test says how long it waited on this device: the
                # duty desk sees an alarm held through an outage for what it is.
                properties = template.with_correlation(
                    row.id.encode(), waited_property(row.id)
                    if row.priority <= Priority.TEST else b"")
            info = client.publish(f"{prefix}/{row.topic}", sign(row.payload), qos=1,
                                  properties=properties)
            if row.recovered:
                template = self._event_props
            # Even if the connection dropped just now, paho holds the message and re-sends
            # it on reconnect, so the row is in flight either way.
            inflight[info.mid] = InFlight(row.seq, row.priority, event_id=row.id,
                                          needs_ack=row.kind in _ACK_KINDS, again=again)
            if row.priority <= Priority.TEST:
                self._urgent_at[info.mid] = now

    def _fill_snapshots(self, client: paho.Client, room: int) -> int:
        """Snapshots come after every queued event (their priority is below them all)."""
        flying = sum(1 for f in self.inflight.values() if f.snapshot)
        room = min(room, SNAPSHOTS_IN_FLIGHT - flying)
        if room <= 0:
            return 0
        busy = {row.seq for row in self._unsettled(snapshots=True)}
        return sum(self._publish_snapshot(client, snapshot)
                   for snapshot in self._snapshots.next_queued(room, busy))

    def _publish_snapshot(self, client: paho.Client, snapshot: QueuedSnapshot) -> int:
        """A JPEG on ``snapshot/{event_id}``: MQTT 5 carries the description in user
        properties; MQTT 3.1.1 has none, so a JSON line goes before the JPEG bytes."""
        try:
            jpeg = Path(snapshot.path).read_bytes()
        except OSError as err:
            self._snapshots.forget(snapshot.id, f"{snapshot.path}: {err.strerror}")
            return 0
        description = self._signer.sign_snapshot(
            snapshot_description(self.config.identity, snapshot), jpeg)
        if is_v5(self.config.broker):
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = "image/jpeg"
            props.UserProperty = [(key, str(value)) for key, value in description.items()]
            payload = jpeg
        else:
            props = None
            payload = json.dumps(description).encode() + b"\n" + jpeg
        limit = min(filter(None, (self._max_packet, self.config.uplink.max_packet_bytes)),
                    default=None)
        if limit and len(payload) + 1024 > limit:
            # The broker would close the connection on it, again and again.
            self._snapshots.forget(snapshot.id, f"{len(payload)} bytes is over the broker's "
                                   f"maximum packet size of {limit} (lower the "
                                   "camera's max_jpeg_bytes)")
            return 0
        info = client.publish(self.topics.below(f"snapshot/{snapshot.event_id}"), payload,
                              qos=1, properties=props)
        self.inflight[info.mid] = InFlight(snapshot.id, Priority.SNAPSHOT, snapshot=True)
        return 1

    def _unsettled(self, *, snapshots: bool = False) -> list[InFlight]:
        """Published, not yet recorded as sent: events, or (``snapshots``) snapshots."""
        return [row for row in (*self.inflight.values(), *self._unmarked, *self._refused,
                                *self._unheard)
                if row.snapshot == snapshots and not row.again]

    # -- PUBACKs ---------------------------------------------------------------------------

    def acked(self, mid: int, code: int, reason: str, now: float) -> bool:
        """A PUBACK; False if ``mid`` is not an outbox row of ours."""
        flight = self.inflight.pop(mid, None)
        if flight is None:
            return False
        if self._urgent_at:
            self._urgent_at.pop(mid, None)
        if not code:
            self._took(flight, now)
        elif code == NO_MATCHING_SUBSCRIBERS:
            self._not_heard(flight, now)
        elif code >= 0x80:
            self._refused_by_broker(flight, reason, now)
        else:
            self._took(flight, now)
        return True

    def _took(self, flight: InFlight, now: float) -> None:
        if self._unheard_streak and not flight.snapshot:
            log.info("the platform listens again: %d held row(s) go now", len(self._unheard))
            self._unheard_streak, self._unheard_round_until = 0, 0.0
            self.unheard_topic = None
            self._unheard.clear()
            self._cursor = None
        if flight.needs_ack:
            self._resend.took(flight.event_id, flight.seq, flight.priority, now,
                              again=flight.again)
            if flight.again:
                return  # its row was marked sent the first time
        if not self._unmarked:
            self._unmarked_since = now
        self._unmarked.append(flight)
        if flight.priority <= Priority.TEST:
            # Alarms light the LED; tests are timed stage by stage: record both at once
            # rather than with the next batch.
            self._unmarked_urgent = True
        self._drain.delivered()

    def _not_heard(self, flight: InFlight, now: float) -> None:
        """0x10: the broker took it and nobody subscribes: not delivered. The rows of one
        round are retried together, after a pause that doubles from round to round."""
        if now >= self._unheard_round_until:
            pause = min(UNHEARD_MAX_S, UNHEARD_FIRST_S * 2 ** min(self._unheard_streak, 16))
            self._unheard_streak += 1
            self._unheard_round_until = now + pause
            log.warning("PUBACK 0x10 No matching subscribers: nobody subscribes to this "
                        "device's events; row %d and those after it are held and tried again "
                        "in %.0f s", flight.seq, pause)
        if flight.again:
            self._resend.postpone(flight.event_id, self._unheard_round_until)
        else:
            self._unheard[flight] = self._unheard_round_until
        self.unheard_topic = "snapshot" if flight.snapshot else "event"

    def _refused_by_broker(self, flight: InFlight, reason: str, now: float) -> None:
        if flight.snapshot:
            # Refused once, refused again (its size, the ACL): retrying forever would
            # only spend the link. Events are never dropped; pictures are.
            self._snapshots.forget(flight.seq, f"the broker refused it ({reason})")
        elif flight.again:
            self._resend.postpone(flight.event_id, now + HOLD_BACK_S)
        else:
            log.error("broker refused outbox row %d (%s); retrying in %.0f s",
                      flight.seq, reason, HOLD_BACK_S)
            self._refused[flight] = now + HOLD_BACK_S

    def settle(self, outbox: Outbox, now: float) -> None:
        """Record the PUBACKed rows when the batch is due."""
        if self._unmarked and (self._unmarked_urgent or len(self._unmarked) >= MARK_BATCH
                               or now - self._unmarked_since >= MARK_DELAY_S):
            self.flush_marks(outbox)

    def flush_marks(self, outbox: Outbox) -> None:
        """Record the PUBACKed rows as sent: one transaction for the whole batch."""
        if not self._unmarked:
            return
        outbox.mark_sent(row.seq for row in self._unmarked if not row.snapshot)
        self._snapshots.mark_sent([row.seq for row in self._unmarked if row.snapshot])
        self._unmarked = []
        if self._unmarked_urgent:
            self._unmarked_urgent = False
            self._wake_button()  # its LED: "at the broker"

    # -- what the loop asks ----------------------------------------------------------------

    def oldest_urgent(self) -> float | None:
        """Since when the oldest alarm or test in flight waits for its PUBACK."""
        return min(self._urgent_at.values(), default=None)

    def next_due(self, now: float, *, room: bool) -> float:
        """How long the loop may wait before this window has work of its own: a batch of
        marks to record, and, if there is ``room`` to publish, a row due again (without
        room the loop waits for the network, not spinning until a slot frees)."""
        times = []
        if room:
            times += [*self._refused.values(), *self._unheard.values()]
            if (due := self._resend.next_due()) is not None:
                times.append(due)
        if self._unmarked:
            times.append(self._unmarked_since + MARK_DELAY_S)
        return max(0.0, min(times) - now) if times else float("inf")

    def stats(self) -> dict:
        """What the heartbeat says about delivery (docs/schemas/health.schema.json)."""
        return {"in_flight": len(self.inflight), "held_unheard": len(self._unheard),
                "held_refused": len(self._refused),
                "awaiting_acknowledgement": len(self._resend),
                "published_again": self._resend.republished}


def waited_property(event_id: str) -> bytes:
    """The user property ``waited_ms``: milliseconds from the event's creation (the Unix
    milliseconds at the head of its UUIDv7 id) to now, both on this device's clock, so
    right whether or not that clock is synchronised (a step of it in between shows; never
    below 0)."""
    created_ms = int(event_id[:8] + event_id[9:13], 16)
    waited = max(0, time.time_ns() // 1_000_000 - created_ms)
    return user_property("waited_ms", str(waited))
