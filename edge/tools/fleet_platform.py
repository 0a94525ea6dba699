"""The platform side of ``guardpost fleet-sim``: one subscriber for the whole fleet.

It verifies every event's device signature, acknowledges alarms and tests with a
:class:`~edge.platform.PlatformSigner` key (as a duty desk would), notes when each event
arrived, and keeps the broker's own figures (``$SYS/broker/...`` on Mosquitto). It runs
in paho's own thread, apart from the devices' loop, so that a busy fleet delays it only
as much as it delays a real platform on the same machine.

Given several brokers (the nodes of a cluster), it starts on the first and moves to the
next one whenever its link is lost. Over MQTT 3.1.1 its session is persistent
(``clean_session=False``), so the events published while it moves wait for it.
"""

from __future__ import annotations

import logging
import threading
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.platform import DeviceKeys, EventNotVerified, PlatformSigner

log = logging.getLogger(__name__)

SYS_TOPICS = ("$SYS/broker/load/#", "$SYS/broker/clients/connected",
              "$SYS/broker/messages/stored", "$SYS/broker/heap/current")


class FleetPlatform:
    """Subscribes to ``{root}/+/+/event/#`` and ``snapshot/#``, acknowledges what needs it."""

    def __init__(self, brokers: list[tuple[str, int]], root: str, signer: PlatformSigner,
                 device_keys: DeviceKeys, *, tls: dict | None = None,
                 client_id: str = "platform:fleet-sim", protocol: str = "5"):
        self.root, self.signer, self.device_keys = root, signer, device_keys
        self.received: dict[str, float] = {}   # event id -> monotonic time of arrival
        self.acked = 0
        self.snapshots = 0
        self.snapshot_bytes = 0
        self.not_verified: list[str] = []
        self.broker_figures: dict[str, str] = {}
        self.subscribed = threading.Event()
        self.brokers, self._broker = list(brokers), 0
        self.v5 = protocol == "5"
        if self.v5:
            self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                      protocol=paho.MQTTv5)
        else:
            self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                      protocol=paho.MQTTv311, clean_session=False)
        if tls:
            self.client.tls_set(**tls)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._next_broker
        self.client.reconnect_delay_set(0.05, 1.0)

    def start(self) -> FleetPlatform:
        host, port = self.brokers[0]
        self.client.connect(host, port, keepalive=15)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("the broker refused the platform's connection: %s", reason_code)
            return
        topics = [(f"{self.root}/+/+/event/#", 1), (f"{self.root}/+/+/snapshot/#", 1)]
        topics += [(topic, 0) for topic in SYS_TOPICS]
        client.subscribe(topics)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._next_broker()

    def _next_broker(self, *args) -> None:
        """paho's loop reconnects to its host and port: make them the next broker's.
        paho 2.2's ``host``/``port`` setters refuse while its state is "connection lost",
        which is exactly when a failover needs them, hence the attributes behind them."""
        if len(self.brokers) > 1:
            self._broker = (self._broker + 1) % len(self.brokers)
            self.client._host, self.client._port = self.brokers[self._broker]

    def _on_message(self, client, userdata, message) -> None:
        now = time.monotonic()
        topic = message.topic
        if topic.startswith("$SYS/"):
            self.broker_figures[topic[len("$SYS/broker/"):]] = message.payload.decode(
                errors="replace")
            return
        parts = topic[len(self.root) + 1:].split("/")
        if len(parts) < 4:
            return
        site_id, device_id, branch = parts[0], parts[1], parts[2]
        if branch == "snapshot":
            self.snapshots += 1
            self.snapshot_bytes += len(message.payload)
            return
        try:
            event = self.device_keys.verify(message.payload, topic=topic)
        except EventNotVerified as err:
            self.not_verified.append(f"{topic}: {err}")
            return
        self.received.setdefault(event["id"], now)
        if event.get("ack_required"):
            ack_topic, payload = self.signer.ack(f"{self.root}/{site_id}/{device_id}",
                                                 event["id"], by="fleet-sim")
            properties = None
            if self.v5:
                properties = Properties(PacketTypes.PUBLISH)
                properties.ContentType = "application/json"
            client.publish(ack_topic, payload, qos=1, properties=properties)
            self.acked += 1
