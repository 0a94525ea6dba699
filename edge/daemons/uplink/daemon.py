"""The uplink daemon (``guardpost run uplink``): drains the outbox to the platform's broker.

One thread, one ``select`` over the MQTT socket and the wake-up socket, with paho's
external-loop API (``loop_read``/``loop_write``/``loop_misc``). So there are no locks,
an alarm committed by the button daemon is published as soon as its wake-up arrives,
and this daemon decides reconnection itself (jittered backoff, capped at 30 s).

- Rows are published in priority order at QoS 1, at most ``inflight_window`` at a time
  (clamped to the broker's MQTT 5 Receive Maximum). A new alarm therefore waits for at
  most one free slot, never behind a backlog being drained.
- A row is marked ``sent`` only on the broker's PUBACK, and ``acknowledged`` only when
  the platform's acknowledgement has been committed; only then do we PUBACK the
  acknowledgement itself (manual acks), so a crash between the two loses nothing.
- Unacknowledged publishes survive a reconnect inside paho (re-sent with DUP, same
  message id) and a restart in the outbox (still ``queued``): delivery is at least
  once, de-duplicable by event id.
- Retained ``status``: a birth after every connect and a will, both carrying the same
  session counter; ``offline`` on a clean stop. Retained ``health`` heartbeat.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import select
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge import __version__
from edge.config import Config
from edge.contract.events import Priority, utc_iso, utc_now
from edge.contract.messages import (
    MAX_WAITING_TESTS,
    REQUEST_ID_MEMORY_H,
    RejectedInput,
    Topics,
    health_payload,
    parse_ack,
    parse_test_command,
    rejection_payload,
    reply_payload,
    snapshot_description,
    status_payload,
)
from edge.daemons.button.latch import AlarmLatch
from edge.daemons.selftest.alarmtest import request_test
from edge.runtime.clock import boot_id, clock_synchronised
from edge.runtime.instance import only_instance
from edge.runtime.mqtt import connect, is_v5, make_client
from edge.runtime.sdnotify import Watchdog, notify
from edge.runtime.wake import Waker, wake
from edge.store.outbox import Outbox
from edge.store.snapshots import QueuedSnapshot, SnapshotStore

log = logging.getLogger(__name__)

HOLD_BACK_S = 30.0          # a row the broker refused is retried after this long
MARK_DELAY_S = 0.05         # PUBACKs are recorded in batches at most this old ...
MARK_BATCH = 256            # ... or this large (an alarm's PUBACK is recorded at once)
STABLE_CONNECTION_S = 10.0  # a connection that lasted this long resets the reconnect backoff
CURSOR_REFRESH_S = 1.0      # the queue is re-read from the top at least this often
RESERVED_IN_FLIGHT = 2      # birth/offline and heartbeat may be in flight beside the window
PRUNE_EVERY_S = 3600.0
SHUTDOWN_FLUSH_S = 2.0
LOOP_TICK_S = 1.0           # paho's keepalive bookkeeping wants a call at least this often
# Snapshots are large: a few in flight keep the link busy, more would take the window's
# slots (and the link's bandwidth) from an alarm that comes next.
SNAPSHOTS_IN_FLIGHT = 2
CHORES_EVERY_S = 0.25       # how often finished platform tests and new self-checks are looked for


class Backoff:
    """Exponential reconnect delay with jitter, so a fleet does not reconnect in step."""

    def __init__(self, first: float, cap: float, rng=random.random):
        self.first, self.cap, self._rng = first, cap, rng
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.first * 2 ** self.attempt)
        self.attempt += 1
        return ceiling / 2 + self._rng() * ceiling / 2  # "equal jitter": half fixed, half random

    def reset(self) -> None:
        self.attempt = 0


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


class _PackedOnce(Properties):
    """Publish properties that never change: paho would encode them for every message,
    which costs as much as the rest of a publish (measured in bench/alarm_path.py)."""

    _packed: bytes | None = None

    def pack(self) -> bytes:
        if self._packed is None:
            object.__setattr__(self, "_packed", super().pack())
        return self._packed


@dataclass(frozen=True)
class _InFlight:
    seq: int            # the event's sequence number, or the snapshot's row id
    priority: int
    snapshot: bool = False


class UplinkDaemon:
    """Publishes the outbox and takes the platform's acknowledgements."""

    name = "uplink"

    def __init__(self, config: Config):
        self.config = config
        self.identity = config.identity
        self.topics = Topics(config.topic_prefix)
        up = config.uplink
        self._backoff = Backoff(up.reconnect_min, up.reconnect_max)
        self._window = up.inflight_window
        self._inflight: dict[int, _InFlight] = {}   # paho message id -> outbox row
        self._held_back: dict[_InFlight, float] = {}  # refused row -> when to retry it
        # Where the walk through the queue has got to: (priority, seq) of the last row
        # published, or None to start again from the top (a new row may outrank it).
        self._cursor: tuple[int, int] | None = None
        self._cursor_is_frontier = False  # True: every published row is behind the cursor
        self._cursor_set_at = 0.0
        self._unmarked: list[_InFlight] = []        # PUBACKed, not yet recorded as sent
        self._unmarked_since = 0.0
        self._unmarked_urgent = False
        self._pubacks: list[tuple[int, bool, str]] = []
        self._acks: list = []                       # (AckMessage, mid, qos)
        self._rejections: list = []                 # (topic, reason, payload, mid, qos)
        self._commands: list = []                   # (command, reply topic, correlation, mid, qos)
        self._reply_mids: dict[int, str] = {}       # paho mid -> alarm test whose result it is
        self._next_chores = 0.0
        self._heartbeat_mid: int | None = None
        self._heartbeat_sent = 0.0
        self._broker_rtt_ms: float | None = None    # the last heartbeat's PUBLISH -> PUBACK
        self._rtt_at: str | None = None
        self._selftest_seen: str | None = None      # updated_at of the checks last published
        self._connected = False
        self._connected_since = 0.0
        self._max_packet: int | None = None  # the broker's MQTT 5 Maximum Packet Size
        self._stopping = False
        self._connack_deadline: float | None = None
        self._session = 0
        self._connected_at: str | None = None
        self._last_error: str | None = None
        self._started = time.monotonic()
        self._waker: Waker | None = None
        self._outbox: Outbox | None = None
        self.client: paho.Client | None = None
        self._props: Properties | None = None
        self._drain = _DrainLog()
        self.ready = threading.Event()  # set with READY=1, for in-process users

    def wake(self) -> None:
        if self._waker is not None:
            self._waker.wake()

    # -- main loop -------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        cfg = self.config
        with only_instance(cfg.storage.runtime_dir, self.name), \
                Outbox(cfg.storage.database, self.identity) as outbox, \
                contextlib.closing(Waker(cfg.storage.runtime_dir, self.name)) as waker:
            self._outbox, self._waker = outbox, waker
            self._snapshots = SnapshotStore(outbox, cfg.storage.spool_dir,
                                            cfg.storage.spool_budget_mb * 1024 * 1024)
            self.client = client = self._build_client()
            self._prune()
            self._save_state()
            self.ready.set()
            notify("READY=1", f"STATUS=uplink to {cfg.broker.host}:{cfg.broker.port}")
            log.info("uplink ready: broker %s:%d (MQTT %s%s), window %d", cfg.broker.host,
                     cfg.broker.port, cfg.broker.protocol, ", TLS" if cfg.broker.tls else "",
                     self._window)
            next_attempt = next_heartbeat = 0.0
            next_prune = time.monotonic() + PRUNE_EVERY_S
            watchdog = Watchdog()
            while not stop.is_set():
                watchdog.ping()
                now = time.monotonic()
                if client.socket() is None:
                    if now < next_attempt:
                        if waker.wait(min(next_attempt - now, LOOP_TICK_S)):
                            self._cursor = None
                        continue
                    watchdog.ping()  # a connect may block for connect_timeout, twice
                    if not self._open(client):
                        next_attempt = time.monotonic() + self._backoff.next_delay()
                        self._save_state()
                        continue
                    next_heartbeat = time.monotonic() + cfg.uplink.heartbeat_interval
                self._pump(client, waker, self._select_timeout(now, next_heartbeat))
                self._settle(client, outbox)
                self._fill_window(client, outbox)
                now = time.monotonic()
                if self._connected and now >= self._next_chores:
                    self._chores(client, outbox)
                    self._next_chores = now + CHORES_EVERY_S
                if self._connected and now >= next_heartbeat:
                    self._heartbeat(client, outbox)
                    next_heartbeat = now + cfg.uplink.heartbeat_interval
                if self._connack_deadline is not None and now > self._connack_deadline:
                    self._last_error = "no CONNACK from the broker in time"
                    log.warning("%s; reconnecting", self._last_error)
                    client.disconnect()
                    self._close_socket(client)
                if now >= next_prune:
                    self._prune()
                    next_prune = now + PRUNE_EVERY_S
                if client.socket() is None and not stop.is_set():
                    next_attempt = time.monotonic() + self._backoff.next_delay()
            notify("STOPPING=1")
            self._shutdown(client, outbox)

    def _select_timeout(self, now: float, next_heartbeat: float) -> float:
        """How long the loop may wait for the network before it has work of its own."""
        timeout = min(LOOP_TICK_S, max(0.0, next_heartbeat - now))
        if self._held_back and self._connected and len(self._inflight) < self._window:
            # A refused row due again matters only if there is room to publish it.
            timeout = min(timeout, max(0.0, min(self._held_back.values()) - now))
        if self._unmarked:
            timeout = min(timeout, max(0.0, self._unmarked_since + MARK_DELAY_S - now))
        return timeout

    def _pump(self, client: paho.Client, waker: Waker, timeout: float) -> None:
        """One round of network I/O, the way paho's own loop() does it."""
        sock = client.socket()
        if sock is None:
            return
        pending = sock.pending() if hasattr(sock, "pending") else 0  # TLS-buffered bytes
        wlist = [sock] if client.want_write() else []
        readable, writable, _ = select.select([sock, waker], wlist, [], 0 if pending else timeout)
        if waker in readable:
            waker.drain()
            self._cursor = None  # something was committed: it may outrank the cursor
        if sock in readable or pending:
            client.loop_read()
            self._ack_promptly(sock)
        if client.socket() is not None and writable:
            client.loop_write()
        if client.socket() is not None:
            client.loop_misc()

    @staticmethod
    def _ack_promptly(sock) -> None:
        """Acknowledge the broker's TCP segments at once (Linux TCP_QUICKACK, which the
        kernel clears again after a while, hence after every read).

        A broker that leaves Nagle's algorithm on (Mosquitto's default) holds back its
        next small packet - our next PUBACK - until our kernel acknowledges the last
        one, and the kernel delays that acknowledgement by up to 40 ms while we wait with
        a full window: measured in bench/alarm_path.py, a backlog drain then fell from
        17,000 to under 1,000 messages a second whenever alarms were being delivered.
        """
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    @staticmethod
    def _close_socket(client: paho.Client) -> None:
        """After disconnect(): paho closes the socket once DISCONNECT is written."""
        with contextlib.suppress(OSError):
            client.loop_write()
        if client.socket() is not None:
            # The write would block (a dead peer): the external-loop API has no public
            # close, and waiting here would stall the loop.
            client._sock_close()

    # -- connection ------------------------------------------------------------------

    def _build_client(self) -> paho.Client:
        cfg = self.config
        client = make_client(cfg.broker, cfg.client_id, persistent=True)
        # (paho refuses to change this once it has connected, even after a connection
        # loss, so the broker's Receive Maximum is honoured by our own window instead.)
        client.max_inflight_messages_set(self._window + RESERVED_IN_FLIGHT)
        client.max_queued_messages_set(0)
        client.manual_ack_set(True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _open(self, client: paho.Client) -> bool:
        """Start a connection attempt; False (with the reason logged) if it failed at once."""
        cfg = self.config
        with self._outbox.transaction():
            self._session = self._outbox.next_counter("mqtt_session")
        client.will_set(self.topics.status, status_payload(
            self.identity, state="offline", session=self._session, reason="connection lost"),
            qos=1, retain=True, properties=self._json_props())
        try:
            connect(client, cfg.broker, persistent=True)
        except (OSError, ValueError) as err:
            self._note_error(f"cannot connect to {cfg.broker.host}:{cfg.broker.port}: {err}")
            return False
        sock = client.socket()
        with contextlib.suppress(OSError, AttributeError):
            # Alarms are single small packets: send each at once, never held back by
            # Nagle's algorithm waiting for the broker's TCP acknowledgement.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._connack_deadline = time.monotonic() + cfg.broker.connect_timeout
        return True

    def _note_error(self, message: str) -> None:
        if message != self._last_error:
            log.warning("%s", message)
        else:
            log.debug("%s", message)
        self._last_error = message

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connack_deadline = None
        if reason_code.is_failure:
            self._note_error(f"broker refused the connection: {reason_code}")
            return
        self._connected = True
        self._cursor = None
        self._connected_at = utc_iso(utc_now())
        self._connected_since = time.monotonic()
        self._last_error = None
        window = self.config.uplink.inflight_window
        receive_maximum = getattr(properties, "ReceiveMaximum", None) if properties else None
        self._max_packet = getattr(properties, "MaximumPacketSize", None) if properties else None
        if receive_maximum:
            # The status and heartbeat publishes are outside the window: leave them room
            # so that the broker never has more in flight from us than it allows.
            window = max(1, min(window, receive_maximum - RESERVED_IN_FLIGHT))
        self._window = window
        log.info("connected to %s:%d (session %d, %s, window %d)", self.config.broker.host,
                 self.config.broker.port, self._session,
                 "resumed" if flags.session_present else "new broker session", window)
        # Published from inside the callback so the birth precedes paho's re-sends.
        client.publish(self.topics.status, status_payload(
            self.identity, state="online", session=self._session, version=__version__,
            config=self.config.fingerprint(), boot_id=boot_id(),
            protocol=self.config.broker.protocol, connected_at=self._connected_at),
            qos=1, retain=True, properties=self._json_props())
        client.subscribe([(self.topics.ack, 1), (self.topics.commands, 1)])
        self._outbox.session_started(self._session)
        self._heartbeat(client, self._outbox)
        self._save_state()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected, self._connected = self._connected, False
        self._connack_deadline = None
        if was_connected and time.monotonic() - self._connected_since >= STABLE_CONNECTION_S:
            # Only a connection that lasted resets the backoff: a broker that accepts and
            # then drops us at once (another client with our id) is not hammered.
            self._backoff.reset()
        if was_connected:
            self._outbox.session_ended(self._session, "shutdown" if self._stopping
                                       else str(reason_code))
        if self._stopping:
            return
        if was_connected:
            self._note_error(f"disconnected from the broker: {reason_code}")
            log.info("%d message(s) in flight will be re-sent on reconnect", len(self._inflight))
        elif not (self._last_error or "").startswith("broker refused"):
            # With TLS 1.3 a missing or rejected client certificate shows up only here.
            self._note_error(f"the broker closed the connection before accepting it "
                             f"({reason_code}); check credentials and certificates")
        self._save_state()

    # -- publishing ------------------------------------------------------------------

    def _json_props(self) -> Properties | None:
        """The MQTT 5 properties of everything we publish: built and encoded once."""
        if not is_v5(self.config.broker):
            return None
        if self._props is None:
            props = _PackedOnce(PacketTypes.PUBLISH)
            props.ContentType = "application/json"
            # Where the platform answers: the acknowledgement names the event id.
            props.ResponseTopic = self.topics.ack
            self._props = props
        return self._props

    def _fill_window(self, client: paho.Client, outbox: Outbox) -> None:
        """Publish the next rows in priority order, up to the window."""
        free = self._window - len(self._inflight)
        if not self._connected or free <= 0:
            return
        now = time.monotonic()
        if self._held_back and min(self._held_back.values()) <= now:
            self._held_back = {r: t for r, t in self._held_back.items() if t > now}
            self._cursor = None  # a refused row is due again: it is behind the cursor
        # Rows published and not yet recorded as sent still read "queued": skip them.
        if self._cursor is not None and now - self._cursor_set_at > CURSOR_REFRESH_S:
            self._cursor = None  # a new row whose wake-up was lost waits at most this long
        if self._cursor is None:
            exclude = {row.seq for row in self._unsettled()}
            rows = outbox.next_queued(free, exclude)
            self._cursor_is_frontier = False
        elif self._cursor_is_frontier:  # the common case: nothing published lies beyond
            rows = outbox.queued_after(*self._cursor, free)
        else:
            # Just after a restart from the top, rows published before it may lie beyond.
            ahead = {row.seq for row in self._unsettled() if (row.priority, row.seq) > self._cursor}
            self._cursor_is_frontier = not ahead
            rows = outbox.queued_after(*self._cursor, free + len(ahead))
            rows = [row for row in rows if row.seq not in ahead][:free]
        if rows:
            if self._cursor is None:
                self._cursor_set_at = now
            self._cursor = (rows[-1].priority, rows[-1].seq)
        else:
            self._cursor = None
        props = self._json_props()
        for row in rows:
            info = client.publish(self.topics.below(row.topic), row.payload, qos=1,
                                  properties=props)
            # Even if the connection dropped just now, paho holds the message and
            # re-sends it on reconnect, so the row is in flight either way.
            self._inflight[info.mid] = _InFlight(row.seq, row.priority)
        # Snapshots come after every queued event (their priority is below them all).
        published = len(rows)
        snapshots_flying = sum(1 for f in self._inflight.values() if f.snapshot)
        room = min(free - len(rows), SNAPSHOTS_IN_FLIGHT - snapshots_flying)
        if room > 0:
            busy = {row.seq for row in self._unsettled(snapshots=True)}
            for snapshot in self._snapshots.next_queued(room, busy):
                published += self._publish_snapshot(client, snapshot)
        if not published and not self._inflight:
            self._flush_marks(outbox)
            self._drain.finish()
        self._drain.published(published)

    def _publish_snapshot(self, client: paho.Client, snapshot: QueuedSnapshot) -> int:
        """A JPEG on ``snapshot/{event_id}``: MQTT 5 carries the description in user
        properties; MQTT 3.1.1 has none, so a JSON line goes before the JPEG bytes."""
        try:
            jpeg = Path(snapshot.path).read_bytes()
        except OSError as err:
            self._snapshots.forget(snapshot.id, f"{snapshot.path}: {err.strerror}")
            return 0
        description = snapshot_description(self.identity, snapshot)
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
        self._inflight[info.mid] = _InFlight(snapshot.id, Priority.SNAPSHOT, snapshot=True)
        return 1

    def _unsettled(self, *, snapshots: bool = False) -> list[_InFlight]:
        """Published, not yet recorded as sent: events, or (``snapshots``) snapshots."""
        return [row for row in (*self._inflight.values(), *self._unmarked, *self._held_back)
                if row.snapshot == snapshots]

    def _flush_marks(self, outbox: Outbox) -> None:
        """Record the PUBACKed rows as sent: one transaction for the whole batch."""
        if not self._unmarked:
            return
        outbox.mark_sent(row.seq for row in self._unmarked if not row.snapshot)
        self._snapshots.mark_sent([row.seq for row in self._unmarked if row.snapshot])
        self._unmarked = []
        if self._unmarked_urgent:
            self._unmarked_urgent = False
            wake(self.config.storage.runtime_dir, "button")  # its LED: "at the broker"

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        failed = reason_code.is_failure if hasattr(reason_code, "is_failure") else False
        self._pubacks.append((mid, not failed, str(reason_code)))

    def _heartbeat(self, client: paho.Client, outbox: Outbox) -> None:
        latched = sorted(AlarmLatch(outbox, self.config.inputs).latches())
        selftest = outbox.daemon_states().get("selftest")
        checks = None
        if selftest is not None:
            self._selftest_seen = selftest[1]
            checks = json.loads(selftest[0])
        info = client.publish(self.topics.health, health_payload(
            self.identity, session=self._session, uptime_s=time.monotonic() - self._started,
            outbox=outbox.backlog(), clock_synced=clock_synchronised(), latched=latched,
            selftest=checks), qos=1, retain=True, properties=self._json_props())
        # Its PUBACK times the round trip to the broker, for the self-test's broker check;
        # the daemon's state is recorded then.
        self._heartbeat_mid, self._heartbeat_sent = info.mid, time.monotonic()
        outbox.session_seen(self._session)

    def _chores(self, client: paho.Client, outbox: Outbox) -> None:
        """Replies to the platform's tests that have finished; new self-checks are
        published at once rather than with the next heartbeat."""
        for test_id, request, state, result in outbox.replies_due(self._reply_mids.values()):
            info = client.publish(request["reply_topic"], reply_payload(
                self.identity, command="test", request_id=request["request_id"],
                status=state, test_id=test_id, result=result), qos=1,
                properties=self._reply_props(request))
            self._reply_mids[info.mid] = test_id
        selftest = outbox.daemon_states().get("selftest")
        if selftest is not None and selftest[1] != self._selftest_seen:
            self._heartbeat(client, outbox)

    def _reply_props(self, request: dict) -> Properties | None:
        if not is_v5(self.config.broker):
            return None
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"
        if request.get("correlation") is not None:
            props.CorrelationData = bytes.fromhex(request["correlation"])
        return props

    # -- what came back --------------------------------------------------------------

    def _on_message(self, client, userdata, message: paho.MQTTMessage) -> None:
        if message.topic == self.topics.cmd_test:
            try:
                command = parse_test_command(message.payload)
            except RejectedInput as err:
                self._rejections.append((message.topic, str(err), message.payload,
                                         message.mid, message.qos))
                return
            self._commands.append((command, *self._reply_to(message), message.mid,
                                   message.qos))
            return
        if message.topic != self.topics.ack:
            # Say so, not nothing: a platform newer than this device learns it at once.
            self._rejections.append((message.topic, "unknown command", message.payload,
                                     message.mid, message.qos))
            return
        try:
            ack = parse_ack(message.payload)
        except RejectedInput as err:
            self._rejections.append((message.topic, str(err), message.payload, message.mid,
                                     message.qos))
            return
        self._acks.append((ack, message.mid, message.qos))

    def _settle(self, client: paho.Client, outbox: Outbox) -> None:
        """Commit what the last round brought: PUBACKs, acknowledgements, rejections."""
        wake_button = False
        if self._pubacks:
            for mid, ok, reason in self._pubacks:
                flight = self._inflight.pop(mid, None)
                if mid == self._heartbeat_mid:
                    self._heartbeat_mid = None
                    self._broker_rtt_ms = round((time.monotonic() - self._heartbeat_sent) * 1000,
                                                3)
                    self._rtt_at = utc_iso(utc_now())
                    self._save_state()
                if mid in self._reply_mids:
                    test_id = self._reply_mids.pop(mid)
                    if not ok:
                        log.warning("the broker refused the result reply of test %s (%s)",
                                    test_id, reason)
                    outbox.reply_sent(test_id, "sent" if ok else "refused")
                if flight is None:
                    continue  # birth, heartbeat, rejection replies: not outbox rows
                if ok:
                    if not self._unmarked:
                        self._unmarked_since = time.monotonic()
                    self._unmarked.append(flight)
                    # Alarms light the LED; tests are timed stage by stage: record both
                    # at once rather than with the next batch.
                    self._unmarked_urgent |= flight.priority <= Priority.TEST
                    self._drain.delivered()
                elif flight.snapshot:
                    # Refused once, refused again (its size, the ACL): retrying forever
                    # would only spend the link. Events are never dropped; pictures are.
                    self._snapshots.forget(flight.seq, f"the broker refused it ({reason})")
                else:
                    log.error("broker refused outbox row %d (%s); retrying in %.0f s",
                              flight.seq, reason, HOLD_BACK_S)
                    self._held_back[flight] = time.monotonic() + HOLD_BACK_S
            self._pubacks.clear()
        if self._unmarked and (self._unmarked_urgent or len(self._unmarked) >= MARK_BATCH
                               or time.monotonic() - self._unmarked_since >= MARK_DELAY_S):
            self._flush_marks(outbox)
        if self._acks:
            acks, self._acks = self._acks, []
            results = outbox.mark_acknowledged(
                (ack.event_id, ack.acknowledged_at or utc_now(), ack.by) for ack, _, _ in acks)
            for (ack, mid, qos), result in zip(acks, results, strict=True):
                if not result.known:
                    self._reject(client, self.topics.ack, f"unknown event id {ack.event_id}",
                                 ack.model_dump_json(by_alias=True).encode())
                elif not result.already:
                    log.info("platform acknowledged event %s%s", ack.event_id,
                             f" ({ack.by})" if ack.by else "")
                client.ack(mid, qos)  # only now: the acknowledgement is durable
            wake_button = True
        if self._commands:
            commands, self._commands = self._commands, []
            for command, reply_topic, correlation, mid, qos in commands:
                self._take_test_command(client, outbox, command, reply_topic, correlation)
                client.ack(mid, qos)  # only now: the request is durable
        if self._rejections:
            rejections, self._rejections = self._rejections, []
            for topic, reason, payload, mid, qos in rejections:
                self._reject(client, topic, reason, payload)
                client.ack(mid, qos)
        if wake_button:
            wake(self.config.storage.runtime_dir, "button")

    def _reply_to(self, message: paho.MQTTMessage) -> tuple[str, str | None]:
        """Where the answer goes: the request's MQTT 5 Response Topic (with its
        Correlation Data) if it lies under our ``reply/`` (the only place the broker's
        ACL lets a device write answers), else ``reply/test``."""
        props = getattr(message, "properties", None)
        topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        if (not topic or not topic.startswith(self.topics.below("reply/"))
                or any(c in topic for c in "+#\x00")):
            topic = self.topics.reply_test
        return topic, correlation.hex() if correlation is not None else None

    def _take_test_command(self, client: paho.Client, outbox: Outbox, command,
                           reply_topic: str, correlation: str | None) -> None:
        """The police's linked test: recorded, handed to the self-test daemon, and
        answered twice: ``accepted`` now, the result when it is known."""
        request = {"request_id": command.request_id, "reply_topic": reply_topic,
                   "correlation": correlation, "by": command.by}
        props = self._reply_props(request)
        same = outbox.alarm_tests.by_platform_request(
            command.request_id, utc_now() - timedelta(hours=REQUEST_ID_MEMORY_H))
        if same is not None:
            # The broker sends a command again when our PUBACK was lost (a dropped link,
            # a restart): the same request, the same test, answered again; never a second
            # pulse. A finished test's result is sent again too.
            test_id, state = same.id, same.state
            log.info("platform test request %s again: it is test %s (%s)",
                     command.request_id, test_id, state)
            if state in ("passed", "failed"):
                outbox.reply_sent(test_id, "pending")
            client.publish(reply_topic, reply_payload(
                self.identity, command="test", request_id=command.request_id,
                status="accepted", test_id=test_id), qos=1, properties=props)
            return
        waiting = outbox.alarm_tests.waiting()
        if waiting >= MAX_WAITING_TESTS:
            client.publish(reply_topic, reply_payload(
                self.identity, command="test", request_id=command.request_id,
                status="refused", reason=f"{waiting} tests are already waiting to run"),
                qos=1, properties=props)
            return
        test_id = request_test(outbox, "platform", request=request)
        log.info("platform requested an alarm test (request %s%s): test %s",
                 command.request_id, f" by {command.by}" if command.by else "", test_id)
        wake(self.config.storage.runtime_dir, "selftest")
        client.publish(reply_topic, reply_payload(
            self.identity, command="test", request_id=command.request_id, status="accepted",
            test_id=test_id), qos=1, properties=props)

    def _reject(self, client: paho.Client, topic: str, reason: str, payload: bytes) -> None:
        log.warning("rejected a message on %s: %s", topic, reason)
        client.publish(self.topics.rejected, rejection_payload(topic, reason, payload), qos=1,
                       properties=self._json_props())

    # -- housekeeping ----------------------------------------------------------------

    def _prune(self) -> None:
        keep = self.config.storage.keep_days
        removed = self._outbox.prune(keep)
        pictures = self._snapshots.prune_delivered(keep)
        if removed or pictures:
            log.info("pruned %d delivered event(s) and %d snapshot(s) older than %d days",
                     removed, pictures, keep)

    def _save_state(self) -> None:
        cfg = self.config
        state = {
            "daemon": self.name, "version": __version__, "connected": self._connected,
            "broker": f"{cfg.broker.host}:{cfg.broker.port}", "protocol": cfg.broker.protocol,
            "tls": cfg.broker.tls is not None, "session": self._session,
            "connected_at": self._connected_at, "last_error": self._last_error,
            "in_flight": len(self._inflight), "window": self._window,
            "heartbeat_interval": cfg.uplink.heartbeat_interval,
            "broker_rtt_ms": self._broker_rtt_ms, "rtt_at": self._rtt_at,
        }
        try:
            self._outbox.set_daemon_state(self.name, json.dumps(state))
        except Exception:
            log.exception("could not record the daemon state")

    def _shutdown(self, client: paho.Client, outbox: Outbox) -> None:
        """Say goodbye properly: a retained offline status, then DISCONNECT."""
        self._stopping = True
        if self._connected:
            info = client.publish(self.topics.status, status_payload(
                self.identity, state="offline", session=self._session, reason="shutdown"),
                qos=1, retain=True, properties=self._json_props())
            deadline = time.monotonic() + SHUTDOWN_FLUSH_S
            while (not info.is_published() and client.socket() is not None
                   and time.monotonic() < deadline):
                self._pump(client, self._waker, 0.1)
            self._settle(client, outbox)
        self._flush_marks(outbox)
        if self._connected:
            client.disconnect()
            self._close_socket(client)
        self._connected = False
        self._save_state()
        log.info("uplink stopped")
