"""One simulated device of ``guardpost fleet-sim``: a paho client driven by the fleet's loop.

A device does what the uplink does on the wire (docs/contract.md), and nothing of the
outbox: a retained birth and will with one session counter, a retained heartbeat on
``health``, signed events (alarms and tests, which the platform acknowledges), signed
snapshots after each of them, and a clean ``offline`` when stopped. It checks every
acknowledgement's signature as the uplink does and times the round trip. Like the uplink,
it publishes an event again, same bytes, after every reconnection and every
:data:`RESEND_S` until the platform acknowledges it (the platform de-duplicates by id):
that, not the broker, is what makes a lost node lose nothing.

Over MQTT 3.1.1 (``protocol="3.1.1"``, what NATS speaks) it does what the uplink does
there: no properties, a persistent session (``clean_session=False``), and each snapshot
as its description in one JSON line, a newline, then the JPEG.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

import paho.mqtt.client as paho
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge import __version__
from edge.contract.event_signature import EventSigner
from edge.contract.events import (
    ContactId,
    Event,
    EventDraft,
    EventKind,
    Identity,
    utc_iso,
    utc_now,
    uuid7,
)
from edge.contract.messages import Topics, health_payload, snapshot_description, status_payload
from edge.contract.signing import Keyring, Rejected, open_envelope
from edge.store.snapshots import QueuedSnapshot

log = logging.getLogger(__name__)

SNAPSHOT_SIZE = (1280, 720)
RESEND_S = 5.0  # an unacknowledged event goes again after this long (and on reconnect)


@dataclass
class DeviceCounts:
    """What one device did, summed over the fleet in the report."""

    births: int = 0
    heartbeats: int = 0
    events: int = 0
    snapshots: int = 0
    acks: int = 0
    acks_refused: int = 0
    disconnects: int = 0
    resent: int = 0


def fake_jpeg(size: int) -> bytes:
    """``size`` bytes that start and end as a JPEG does; random, so that no link
    compresses them better than a real picture."""
    size = max(size, 4)
    return b"\xff\xd8" + os.urandom(size - 4) + b"\xff\xd9"


@dataclass
class SimDevice:
    """One device's identity, keys, counters and paho client (built by :meth:`client_for`)."""

    identity: Identity
    root: str
    session: int
    platform_keys: Keyring
    heartbeat_s: float = 30.0  # what the birth tells the platform (the fleet's loop beats)
    protocol: str = "5"  # or "3.1.1"
    signer: EventSigner = field(default_factory=lambda: EventSigner(
        Ed25519PrivateKey.generate()))
    epoch: str = field(default_factory=lambda: str(uuid7()))
    boot_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    counts: DeviceCounts = field(default_factory=DeviceCounts)
    seq: int = 0
    connected: bool = False
    subscribed: bool = False
    started: float = field(default_factory=time.monotonic)
    # event id -> monotonic time of its publication, until the platform acknowledges it
    awaiting_ack: dict[str, float] = field(default_factory=dict)
    round_trips: list[float] = field(default_factory=list)  # seconds, publish -> ack here
    published: dict[str, float] = field(default_factory=dict)  # event id -> monotonic time
    # event id -> (topic, payload, properties, last sent), in seq order, until acknowledged
    unacknowledged: dict[str, tuple] = field(default_factory=dict)
    # Monotonic times the link was lost after READY (the fleet notes them, not the device's
    # own stop) and how long each loss lasted until the next CONNACK.
    losses: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    reconnected_at: float | None = None  # after the last loss; None while still away
    address: str | None = None          # "host:port" of the broker it uses now
    broker_index: int = 0               # in the fleet's list of brokers
    failed_attempts: int = 0            # connection attempts failed in a row (backoff)
    acked_at: dict[str, float] = field(default_factory=dict)  # event id -> monotonic time
    client: paho.Client | None = None
    _seen_nonces: set[str] = field(default_factory=set)

    def __post_init__(self):
        self.topics = Topics(f"{self.root}/{self.identity.site_id}/{self.identity.device_id}")

    @property
    def client_id(self) -> str:
        # What the shipped broker configuration binds to the certificate's CN.
        return f"{self.identity.site_id}/{self.identity.device_id}"

    # -- the connection --------------------------------------------------------------

    @property
    def v5(self) -> bool:
        return self.protocol == "5"

    def build_client(self, *, keepalive: int, tls: dict | None = None) -> paho.Client:
        if self.v5:
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                 protocol=paho.MQTTv5)
        else:  # as the uplink: acknowledgements sent while it is away wait for it
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                 protocol=paho.MQTTv311, clean_session=False)
        if tls:
            client.tls_set(**tls)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        self.keepalive = keepalive
        self.client = client
        return client

    def prepare_connect(self) -> None:
        """The will of the next connection, carrying its session number."""
        self.session += 1
        self.client.will_set(self.topics.status, status_payload(
            self.identity, state="offline", session=self.session, reason="connection lost"),
            qos=1, retain=True,
            properties=_json_properties(PacketTypes.WILLMESSAGE) if self.v5 else None)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("%s: broker refused the connection: %s", self.client_id, reason_code)
            return
        self.connected = True
        if self.losses and self.reconnected_at is None:
            self.reconnected_at = time.monotonic()
            self.gaps.append(self.reconnected_at - self.losses[-1])
        self.counts.births += 1
        client.publish(self.topics.status, status_payload(
            self.identity, state="online", session=self.session, version=__version__,
            config="f1ee75117e5ed000", boot_id=self.boot_id, protocol=self.protocol,
            connected_at=utc_iso(utc_now()), epoch=self.epoch, last_seq=self.seq,
            heartbeat_interval_s=float(self.heartbeat_s), keepalive_s=self.keepalive,
            dark_after_s=round(max(2 * self.heartbeat_s, 1.5 * self.keepalive), 1)),
            qos=1, retain=True, properties=self._json())
        if self.v5:
            options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
            client.subscribe([(self.topics.ack, options)])
        else:
            client.subscribe(self.topics.ack, qos=1)
        self.publish_health()
        self.resend(older_than=0.0)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.subscribed = True

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.connected:
            self.counts.disconnects += 1
        self.connected = self.subscribed = False

    # -- what the device publishes ---------------------------------------------------

    def publish_health(self) -> None:
        if not self.connected:
            return
        outbox = {"queued": 0, "sent_unacknowledged": len(self.awaiting_ack),
                  "oldest_unsent_age_s": None, "last_seq": self.seq}
        self.client.publish(self.topics.health, health_payload(
            self.identity, session=self.session, uptime_s=time.monotonic() - self.started,
            outbox=outbox, clock_synced=True, latched=[]), qos=1, retain=True,
            properties=self._json())
        self.counts.heartbeats += 1

    def publish_event(self, kind: EventKind) -> str | None:
        """An alarm or a test, signed; its id (None while disconnected: a real device
        would keep it in its outbox, the simulator does not pretend to)."""
        if not self.connected:
            return None
        self.seq += 1
        code = ContactId.PANIC if kind is EventKind.ALARM else ContactId.MANUAL_TEST
        draft = EventDraft(kind=kind, code=code, occurred_at=utc_now(), clock_synced=True,
                           boot_id=self.boot_id, input="gate" if kind is EventKind.ALARM
                           else None)
        event = Event(str(uuid7()), self.seq, draft)
        payload = self.signer.sign(event.payload(self.identity, self.epoch))
        properties = None
        if self.v5:
            properties = _json_properties()
            properties.ResponseTopic = self.topics.ack
            properties.CorrelationData = event.id.encode()
        now = time.monotonic()
        self.awaiting_ack[event.id] = self.published[event.id] = now
        topic = f"{self.topics.prefix}/{event.topic_suffix}"
        self.unacknowledged[event.id] = (topic, payload, properties, now)
        self.client.publish(topic, payload, qos=1, properties=properties)
        self.counts.events += 1
        return event.id

    def resend(self, *, older_than: float = RESEND_S) -> None:
        """Every event not acknowledged, sent again (same bytes, seq order) if its last
        copy is ``older_than`` seconds old: after a reconnection, and from a timer."""
        if not self.connected:
            return
        now = time.monotonic()
        for event_id, (topic, payload, properties, sent) in list(self.unacknowledged.items()):
            if now - sent >= older_than:
                self.client.publish(topic, payload, qos=1, properties=properties)
                self.unacknowledged[event_id] = (topic, payload, properties, now)
                self.counts.resent += 1

    def publish_snapshots(self, event_id: str, jpeg: bytes, count: int) -> None:
        """``count`` snapshots of ``event_id``, the same picture each time."""
        if not self.connected:
            return
        for index in range(count):
            phase = "pre" if index < count // 2 else "post"
            snapshot = QueuedSnapshot(0, event_id, "gate-cam", index, phase,
                                      utc_iso(utc_now()), float(index - count // 2),
                                      *SNAPSHOT_SIZE, path="")
            described = self.signer.sign_snapshot(
                snapshot_description(self.identity, snapshot), jpeg)
            if self.v5:
                properties = Properties(PacketTypes.PUBLISH)
                properties.ContentType = "image/jpeg"
                properties.UserProperty = [(k, str(v)) for k, v in described.items()]
                payload = jpeg
            else:  # the contract's 3.1.1 framing: one JSON line, a newline, the JPEG
                properties, payload = None, json.dumps(described).encode() + b"\n" + jpeg
            self.client.publish(f"{self.topics.prefix}/snapshot/{event_id}", payload, qos=1,
                                properties=properties)
            self.counts.snapshots += 1

    def publish_offline(self) -> paho.MQTTMessageInfo | None:
        """The clean stop's ``offline``; None while disconnected (the will stands)."""
        if not self.connected:
            return None
        return self.client.publish(self.topics.status, status_payload(
            self.identity, state="offline", session=self.session, reason="shutdown"),
            qos=1, retain=True, properties=self._json())

    # -- what the platform sends -----------------------------------------------------

    def _on_message(self, client, userdata, message) -> None:
        if message.topic != self.topics.ack or message.retain:
            return  # a retained ack is refused by the device too (docs/contract.md)
        now = time.monotonic()
        try:
            opened = open_envelope(message.payload, message.topic, self.platform_keys, "ack",
                                   now=utc_now(), clock_synced=True, newest_accepted=None,
                                   seen_nonce=self._seen_nonces.__contains__)
        except Rejected as err:
            log.warning("%s: acknowledgement refused: %s", self.client_id, err)
            self.counts.acks_refused += 1
            return
        self._seen_nonces.add(opened.nonce)
        self.unacknowledged.pop(opened.body.get("event_id"), None)
        published = self.awaiting_ack.pop(opened.body.get("event_id"), None)
        if published is not None:
            self.acked_at[opened.body.get("event_id")] = now
            self.round_trips.append(now - published)
            self.counts.acks += 1

    def _json(self) -> Properties | None:
        return _json_properties() if self.v5 else None


def _json_properties(packet_type: int = PacketTypes.PUBLISH) -> Properties:
    properties = Properties(packet_type)
    properties.ContentType = "application/json"
    return properties
