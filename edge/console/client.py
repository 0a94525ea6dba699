"""The console's MQTT 5 side: subscribe, verify, save snapshots, acknowledge, be present.

Subscriptions (QoS 1, a persistent session so that what arrives while the console is
briefly away waits for it at the broker): ``status`` and ``health`` of every device (or of
the ``--site`` s only), and its ``event/#`` and ``snapshot/#``. With ``group``, events come
through the MQTT 5 shared subscription ``$share/{group}/...``: the consoles of one group
each get a share of the events, all of them together get every event; status, health and
snapshots still come to every console (every desk sees the whole fleet's links, and can
open the pictures of any alarm it is shown).

Every inbound message is handled in isolation: whatever it holds, the worst outcome is a
message ignored and counted (:meth:`Fleet.ignore`), never an exception out of paho's
callback. An event that fails its device's signature (with ``device_keys``) is shown
flagged, never dropped: an alarm is an alarm.

Acknowledging is the desk's decision for alarms (:meth:`ConsoleClient.acknowledge`); tests
are acknowledged on arrival (a test checks the way to the platform, not a person), and a
copy of an event already acknowledged here is acknowledged again, as the contract asks.
The console is a platform instance: it publishes its presence
(:class:`edge.platform.presence.PlatformPresence`), online at connect, offline as its will
and at a clean stop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.console.fleet import Alarm, Fleet
from edge.platform import DeviceKeys, EventNotVerified, PlatformSigner
from edge.platform.presence import PlatformPresence

log = logging.getLogger(__name__)

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # a site, device or event id
SESSION_EXPIRY_S = 3600
SNAPSHOT_INTEGERS = ("index", "width", "height")


def default_platform_id() -> str:
    return f"console-{socket.gethostname().split('.')[0] or 'desk'}"


@dataclass(frozen=True)
class ConsoleOptions:
    host: str
    port: int = 1883
    root: str = "guardpost/v1"
    sites: tuple[str, ...] = ()
    group: str | None = None
    platform_id: str = field(default_factory=default_platform_id)
    snapshots: Path | None = None
    tls: dict | None = None


class ConsoleClient:
    """One paho client in its own thread, feeding :class:`Fleet`."""

    def __init__(self, options: ConsoleOptions, fleet: Fleet, *,
                 signer: PlatformSigner | None = None, device_keys: DeviceKeys | None = None,
                 on_alarm: Callable[[Alarm], None] | None = None):
        self.options, self.fleet = options, fleet
        self.signer, self.device_keys, self.on_alarm = signer, device_keys, on_alarm
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.presence = (PlatformPresence(signer, options.root, options.platform_id)
                         if signer else None)
        self._online_payload: bytes | None = None
        self._ack_lock = threading.Lock()
        self._acks_in_flight: dict[int, str] = {}   # mid -> event id
        self._acks_early: set[int] = set()          # PUBACKs that came before we noted the mid
        if options.snapshots is not None:
            options.snapshots.mkdir(parents=True, exist_ok=True)
        self.client = paho.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"guardpost-console/{options.platform_id}",
                                  protocol=paho.MQTTv5)
        if options.tls:
            self.client.tls_set(**options.tls)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.reconnect_delay_set(0.2, 5.0)

    # -- the connection ---------------------------------------------------------------

    def start(self) -> ConsoleClient:
        self._prepare_will()
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        self.client.connect(self.options.host, self.options.port, keepalive=15,
                            clean_start=False, properties=properties)
        self.client.loop_start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """A clean stop: ``offline`` published (and taken by the broker), then disconnect."""
        if self.presence is not None and self.client.is_connected():
            info = self.client.publish(*self.presence.stopping(), qos=1, retain=True,
                                       properties=_json_properties())
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout)
        self.client.disconnect()
        self.client.loop_stop()

    def _prepare_will(self) -> None:
        """A new presence session: its will now, its ``online`` at CONNACK."""
        if self.presence is None:
            return
        topic, self._online_payload, will = self.presence.connecting()
        self.client.will_set(topic, will, qos=1, retain=True,
                             properties=_json_properties(PacketTypes.WILLMESSAGE))

    def subscriptions(self) -> list[tuple[str, int]]:
        root = self.options.root
        prefixes = [f"{root}/{site}/+" for site in self.options.sites] or [f"{root}/+/+"]
        share = f"$share/{self.options.group}/" if self.options.group else ""
        topics = []
        for prefix in prefixes:
            topics += [(f"{prefix}/status", 1), (f"{prefix}/health", 1),
                       (f"{share}{prefix}/event/#", 1), (f"{prefix}/snapshot/#", 1)]
        return topics

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("the broker refused the console's connection: %s", reason_code)
            return
        self.connected.set()
        if self.presence is not None and self._online_payload is not None:
            client.publish(self.presence.topic, self._online_payload, qos=1, retain=True,
                           properties=_json_properties())
        client.subscribe(self.subscriptions())

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        self._prepare_will()  # paho reconnects with whatever will is set now

    # -- what arrives -----------------------------------------------------------------

    def _on_message(self, client, userdata, message) -> None:
        try:
            self._handle(message)
        except Exception as err:  # whatever it is, one bad message must not stop the desk
            self.fleet.ignore(f"{_topic_text(message)}: {type(err).__name__}: {err}")

    def _handle(self, message) -> None:
        now = time.monotonic()
        head = f"{self.options.root}/"
        if not message.topic.startswith(head):
            raise ValueError("outside the topic root")
        parts = message.topic[len(head):].split("/")
        if len(parts) < 3 or not SAFE_ID.match(parts[0]) or not SAFE_ID.match(parts[1]):
            raise ValueError("not a device's topic")
        site_id, device_id, leaf = parts[0], parts[1], "/".join(parts[2:])
        if leaf == "snapshot" or leaf.startswith("snapshot/"):
            self._snapshot(message, site_id, device_id, parts[2:])
            return
        if not message.payload:
            raise ValueError("empty (a retained message cleared)")
        if leaf == "status":
            self.fleet.status(site_id, device_id, _json_object(message.payload), now)
        elif leaf == "health":
            self.fleet.health(site_id, device_id, _json_object(message.payload), now)
        elif len(parts) == 4 and parts[2] == "event":
            self._event(message, site_id, device_id, parts[3], now)
        else:
            raise ValueError(f"not a topic the console reads ({leaf[:40]})")

    def _event(self, message, site_id: str, device_id: str, kind: str, now: float) -> None:
        body = _json_object(message.payload)
        verified, problem = None, None
        if self.device_keys is not None:
            try:
                self.device_keys.verify(message.payload, topic=message.topic)
                verified = True
            except EventNotVerified as err:
                verified, problem = False, str(err)
        if (body.get("site_id"), body.get("device_id"), body.get("kind")) != (
                site_id, device_id, kind):
            verified, problem = False, "the payload names another device or kind than its topic"
        user = dict(getattr(message.properties, "UserProperty", None) or [])
        item, new = self.fleet.event(site_id, device_id, body, now,
                                     received_at=datetime.now(UTC), verified=verified,
                                     problem=problem, waited_ms=user.get("waited_ms"))
        if body.get("ack_required") is not True or self.signer is None:
            pass
        elif item.kind == "test" and verified is not False:
            self._publish_ack(item)
        elif not new and item.acks_sent:
            self._publish_ack(item)  # a copy of what the desk acknowledged: again
        if new and item.kind == "alarm" and self.on_alarm is not None:
            self.on_alarm(item)

    def _snapshot(self, message, site_id: str, device_id: str, parts: list[str]) -> None:
        if len(parts) != 2 or not SAFE_ID.match(parts[1]):
            raise ValueError("a snapshot's topic names its event")
        event_id = parts[1]
        description, jpeg = _split_snapshot(message)
        index = description.get("index")
        if not isinstance(index, int) or not 0 <= index < 100_000:
            raise ValueError("a snapshot without its index")
        if self.device_keys is not None:
            try:
                self.device_keys.verify_snapshot(description, jpeg, topic=message.topic)
            except (EventNotVerified, KeyError, TypeError, ValueError) as err:
                # Kept (the picture of an alarm matters), counted as not verified.
                log.warning("%s: snapshot not verified: %s", message.topic, err)
                with self.fleet.lock:
                    self.fleet.not_verified += 1
        if self.options.snapshots is None:
            with self.fleet.lock:
                self.fleet.messages += 1
            return
        path = self.options.snapshots / f"{site_id}__{device_id}__{event_id}__{index:03d}.jpg"
        _write_atomically(path, jpeg)
        self.fleet.snapshot_saved(event_id, path)

    # -- acknowledging ----------------------------------------------------------------

    def acknowledge(self, event_id: str) -> str:
        """The desk acknowledges ``event_id``: a signed ack to its device. What happened, in
        words for the screen. Pressing it again sends another (harmless: the device has
        acknowledged it already)."""
        if self.signer is None:
            return "this console has no key (--key): it cannot acknowledge"
        with self.fleet.lock:
            item = self.fleet.alarms.get(event_id) or self.fleet.notices.get(event_id)
        if item is None:
            return "no such alarm"
        again = item.acks_sent > 0
        self._publish_ack(item)
        return (f"acknowledged again ({item.acks_sent} sent; the device keeps the first)"
                if again else f"acknowledgement sent to {item.site_id}/{item.device_id}")

    def _publish_ack(self, item: Alarm) -> None:
        prefix = f"{self.options.root}/{item.site_id}/{item.device_id}"
        topic, payload = self.signer.ack(prefix, item.event_id, by=self.options.platform_id)
        self.fleet.ack_sent(item.event_id)
        info = self.client.publish(topic, payload, qos=1, properties=_json_properties())
        with self._ack_lock:
            if info.mid in self._acks_early:
                self._acks_early.discard(info.mid)
                delivered = True
            else:
                self._acks_in_flight[info.mid] = item.event_id
                delivered = False
        if delivered:
            self.fleet.ack_delivered(item.event_id)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._ack_lock:
            event_id = self._acks_in_flight.pop(mid, None)
            if event_id is None:
                self._acks_early.add(mid)
                if len(self._acks_early) > 10_000:   # presence and the like: never claimed
                    self._acks_early.clear()
                return
        if reason_code.is_failure:
            log.error("the broker refused the acknowledgement of %s: %s", event_id, reason_code)
            return
        self.fleet.ack_delivered(event_id)


def _topic_text(message) -> str:
    """The topic for a log line, even when it is not UTF-8 (paho's ``topic`` raises)."""
    raw = getattr(message, "_topic", b"")
    return raw[:120].decode(errors="replace") if isinstance(raw, bytes) else str(raw)[:120]


def _json_properties(packet_type: int = PacketTypes.PUBLISH) -> Properties:
    properties = Properties(packet_type)
    properties.ContentType = "application/json"
    return properties


def _json_object(payload: bytes) -> dict:
    body = json.loads(payload)
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")
    return body


def _split_snapshot(message) -> tuple[dict, bytes]:
    """The description and the JPEG: MQTT 5 user properties and the payload, or (a
    device on MQTT 3.1.1) a JSON line, a newline, then the JPEG."""
    properties = getattr(message, "properties", None)
    user = getattr(properties, "UserProperty", None) if properties else None
    if user:
        description: dict = dict(user)
        for key in SNAPSHOT_INTEGERS:
            if key in description:
                description[key] = int(description[key])
        if "offset_s" in description:
            description["offset_s"] = float(description["offset_s"])
        return description, message.payload
    line, newline, jpeg = message.payload.partition(b"\n")
    if not newline:
        raise ValueError("a snapshot without its description")
    return _json_object(line), jpeg


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
