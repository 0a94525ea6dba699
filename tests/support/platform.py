"""A police platform stand-in for tests: a real paho subscriber on the real broker.

It records every message, validates each one against its channel in the contract's
AsyncAPI document, docs/asyncapi.yaml (so every payload any test makes the device emit
is checked, and a topic the document lacks is a problem), verifies every
event's and snapshot's device signature (the test devices' key,
tests/support/device_keys.py), optionally
acknowledges alarms and tests, and lets tests wait on conditions over what arrived
(woken by each message, no sleeping).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge.platform import EventNotVerified, verify_event, verify_snapshot
from tests.support.asyncapi import header_problems, payload_problems
from tests.support.device_keys import EVENT_PUBLIC_KEY
from tests.support.trust import ADMIN, DUTY_DESK


@dataclass(frozen=True)
class Received:
    topic: str
    leaf: str          # the topic below {root}/{site}/{device}/
    payload: bytes
    body: object       # parsed JSON, or None
    retained: bool
    at: float          # time.monotonic() on arrival
    properties: object


class PlatformStandIn:
    def __init__(self, host: str, port: int, prefix: str, *, ack: bool = False,
                 protocol: int = paho.MQTTv5, client_id: str = "test-platform",
                 tls: dict | None = None, username: str | None = None,
                 password: str | None = None, device_key=EVENT_PUBLIC_KEY):
        self.prefix = prefix
        self.device_key = device_key  # every event must verify with it
        self.ack = ack
        self.messages: list[Received] = []
        self.snapshots: list[tuple[dict, bytes, float]] = []  # (description, JPEG, arrival)
        self.unique_events: list[dict] = []  # first copy of each event, in arrival order
        self.event_copies = 0                # every copy, duplicates included
        self._event_ids: set[str] = set()
        self.schema_problems: list[str] = []
        self.acked: list[str] = []
        # The platform's clock, as its signatures give it: a test that moves the device's
        # clock (tests/support/sim_clock.py) moves this one with it, as NTP keeps both.
        self.clock_offset_s: Callable[[], float] = lambda: 0.0
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._host, self._port, self._protocol = host, port, protocol
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=protocol,
                                  clean_session=None if protocol == paho.MQTTv5 else False)
        if tls:
            self.client.tls_set(**tls)
        if username:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.reconnect_delay_set(0.05, 0.5)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> PlatformStandIn:
        kwargs = {}
        if self._protocol == paho.MQTTv5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600  # survive broker restarts in outage tests
            kwargs = {"clean_start": False, "properties": props}
        self.client.connect(self._host, self._port, keepalive=10, **kwargs)
        self.client.loop_start()
        assert self._subscribed.wait(10), "platform stand-in could not subscribe"
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        client.subscribe(f"{self.prefix}/#", qos=1)

    def _on_message(self, client, userdata, message) -> None:
        leaf = message.topic[len(self.prefix) + 1:]
        if leaf.startswith("snapshot/"):
            self._on_snapshot(message, leaf)
            return
        try:
            body = json.loads(message.payload)
        except (ValueError, RecursionError):  # tests send poison on purpose: it comes back
            body = None
        received = Received(message.topic, leaf, message.payload, body, bool(message.retain),
                            time.monotonic(), message.properties)
        if leaf == "ack" or leaf.startswith("cmd/"):
            pass  # platform-to-device: ours (tests send malformed ones on purpose)
        elif body is None:
            self.schema_problems.append(f"{message.topic}: payload is not JSON")
        else:  # its channel in docs/asyncapi.yaml, and that channel's payload schema
            self.schema_problems += [f"{message.topic}: {p}"
                                     for p in payload_problems(leaf, body)]
        if leaf.startswith("event/"):
            user = dict(getattr(message.properties, "UserProperty", None) or [])
            if self._protocol == paho.MQTTv5:   # (3.1.1 carries no properties)
                self.schema_problems += [f"{message.topic}: {p}" for p in
                                         header_problems(leaf, "event", user)]
            try:
                verify_event(message.payload, self.device_key, topic=message.topic)
            except EventNotVerified as err:
                self.schema_problems.append(f"{message.topic}: device signature: {err}")
        if (self.ack and leaf.startswith("event/") and isinstance(body, dict)
                and body.get("ack_required")):
            topic, payload = DUTY_DESK.ack(self.prefix, body["id"], by="test platform",
                                           signed_at=self.now())
            self._check_outgoing(topic, payload)
            client.publish(topic, payload, qos=1)
            self.acked.append(body["id"])
        with self._cond:
            self.messages.append(received)
            if leaf.startswith("event/") and isinstance(body, dict):
                self.event_copies += 1
                if body.get("id") not in self._event_ids:
                    self._event_ids.add(body.get("id"))
                    self.unique_events.append(body)
            self._cond.notify_all()

    def _on_snapshot(self, message, leaf: str) -> None:
        if self._protocol == paho.MQTTv5:
            props = message.properties
            description = dict(getattr(props, "UserProperty", []) or [])
            for key in ("index", "width", "height"):
                with contextlib.suppress(KeyError, ValueError):
                    description[key] = int(description[key])
            with contextlib.suppress(KeyError, ValueError):
                description["offset_s"] = float(description["offset_s"])
            jpeg = message.payload
            if getattr(props, "ContentType", None) != "image/jpeg":
                self.schema_problems.append(f"{message.topic}: ContentType is not image/jpeg")
        else:
            header, _, jpeg = message.payload.partition(b"\n")
            description = json.loads(header)
        # The description: MQTT 5 user properties, or the 3.1.1 payload's first line.
        self.schema_problems += [f"{message.topic}: {p}" for p in
                                 header_problems(leaf, "snapshotMqtt5", description)]
        if leaf != f"snapshot/{description.get('event_id')}":
            self.schema_problems.append(f"{message.topic}: event_id does not match the topic")
        try:
            verify_snapshot(description, bytes(jpeg), self.device_key, topic=message.topic)
        except EventNotVerified as err:
            self.schema_problems.append(f"{message.topic}: device signature: {err}")
        with self._cond:
            self.snapshots.append((description, bytes(jpeg), time.monotonic()))
            self._cond.notify_all()

    # -- what arrived ----------------------------------------------------------------

    def wait_for(self, condition: Callable[[PlatformStandIn], object], timeout: float = 15.0,
                 what: str = "condition"):
        """Block until ``condition(self)`` is truthy (re-checked at each message)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = condition(self)
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out waiting for {what}; got "
                                         f"{len(self.messages)} message(s)")
                self._cond.wait(remaining)

    def events(self, kind: str | None = None) -> list[dict]:
        """Event payloads in arrival order, the first copy of each."""
        return [e for e in list(self.unique_events) if kind is None or e["kind"] == kind]

    def on(self, leaf: str) -> list[dict]:
        return [m.body for m in list(self.messages) if m.leaf == leaf]

    def publish(self, leaf: str, payload: bytes, **kwargs) -> None:
        """Exactly these bytes (a test's forgery, or a malformed message)."""
        self.client.publish(f"{self.prefix}/{leaf}", payload, qos=1,
                            **kwargs).wait_for_publish(5)

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.clock_offset_s())

    def _check_outgoing(self, topic: str, payload: bytes) -> None:
        """What the platform side of a test sends, against its channel in
        docs/asyncapi.yaml, as every device message is (a deliberately malformed message
        goes by :meth:`publish`, or ``conforming=False``)."""
        self.schema_problems += [f"{topic} (sent): {p}" for p in payload_problems(
            topic[len(self.prefix) + 1:], json.loads(payload))]

    def acknowledge(self, event_id: str, by: str | None = None, signer=DUTY_DESK,
                    **kwargs) -> None:
        """A signed acknowledgement, as the platform sends it."""
        topic, payload = signer.ack(self.prefix, event_id, by=by, signed_at=self.now())
        self._check_outgoing(topic, payload)
        self.client.publish(topic, payload, qos=1, **kwargs).wait_for_publish(5)

    def command(self, name: str, body: dict, signer=ADMIN, conforming: bool = True,
                **kwargs) -> bytes:
        """A signed command ``cmd/{name}``; returns what was sent (to send it again).
        ``conforming=False``: a command the contract does not have, on purpose."""
        topic, payload = signer.command(self.prefix, name, body, signed_at=self.now())
        if conforming:
            self._check_outgoing(topic, payload)
        self.client.publish(topic, payload, qos=1, **kwargs).wait_for_publish(5)
        return payload
