"""For the console's tests: simulated devices (fleet-sim's :class:`SimDevice`, each with
paho's own thread), a duty desk (model + client with the test duty-desk key), and a
recorder of what the platform side publishes (acks, presence), each payload checked
against its AsyncAPI channel."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from edge.console.client import ConsoleClient, ConsoleOptions
from edge.console.fleet import Fleet
from edge.contract.events import Identity
from edge.contract.signing import Keyring
from edge.platform import DeviceKeys
from edge.tools.fleet_device import SimDevice
from tests.support.asyncapi import payload_problems
from tests.support.listener import listen_to_everything
from tests.support.trust import DUTY_DESK

ROOT = "guardpost/v1"


def wait_until(condition, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _raw(signer) -> bytes:
    return signer.private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                        serialization.PublicFormat.Raw)


class Gates:
    """Simulated devices on the test broker; every one stopped at the end."""

    def __init__(self, broker):
        self.broker = broker
        self.devices: list[SimDevice] = []
        self.keys = DeviceKeys()
        self.keyring = Keyring()
        self.keyring.add(DUTY_DESK.key_id, _raw(DUTY_DESK), ["ack"])

    def start(self, site_id: str, device_id: str = "gate-1", *, location: str | None = None,
              heartbeat: float = 30.0, keepalive: int = 15) -> SimDevice:
        identity = Identity(site_id, device_id, location or f"{site_id} south gate")
        device = SimDevice(identity, ROOT, int(time.time()), self.keyring, heartbeat_s=heartbeat)
        self.keys.add(site_id, device_id, device.signer.public_key)
        client = device.build_client(keepalive=keepalive)
        device.prepare_connect()
        client.connect(self.broker.host, self.broker.port, keepalive=keepalive)
        client.loop_start()
        self.devices.append(device)
        wait_until(lambda: device.subscribed, what=f"{site_id} subscribed")
        return device

    @staticmethod
    def kill(device: SimDevice) -> None:
        """The connection dies without a DISCONNECT: the broker publishes the will."""
        device.client.loop_stop()
        device.client.socket().close()
        device.connected = False

    @staticmethod
    def shut_down(device: SimDevice) -> None:
        device.publish_offline().wait_for_publish(10)
        device.client.disconnect()
        device.client.loop_stop()
        device.connected = False

    def close(self) -> None:
        for device in self.devices:
            with contextlib.suppress(Exception):
                device.client.disconnect()
                device.client.loop_stop()


class Desk:
    """A console's model and client (no screen), with the test duty-desk key."""

    def __init__(self, broker, tmp_path: Path, device_keys: DeviceKeys | None, *,
                 platform_id: str = "desk-1", group: str | None = None,
                 sites: tuple[str, ...] = ()):
        self.snapshots = tmp_path / f"snapshots-{platform_id}"
        self.fleet = Fleet(list(sites) or None)
        self.alarms: list[str] = []
        self.client = ConsoleClient(
            ConsoleOptions(broker.host, broker.port, ROOT, sites, group, platform_id,
                           self.snapshots), self.fleet, signer=DUTY_DESK,
            device_keys=device_keys, on_alarm=lambda alarm: self.alarms.append(alarm.event_id))
        self.client.start()
        wait_until(self.client.subscribed.is_set, what="the console subscribed")

    def link(self, device: SimDevice):
        return self.fleet.link_of(device.identity.site_id, device.identity.device_id,
                                  time.monotonic())

    def stop(self) -> None:
        self.client.stop()


class Recorder:
    """Everything on the broker; what the platform side publishes, validated."""

    def __init__(self, broker):
        self.acks: list[dict] = []
        self.presence: list[dict] = []
        self.problems: list[str] = []
        self.client = listen_to_everything(broker, "console-recorder", self._on_message)

    def _on_message(self, client, userdata, message) -> None:
        leaf = message.topic[len(ROOT) + 1:]
        if leaf.endswith("/ack"):
            body = json.loads(message.payload)
            self.problems += payload_problems("ack", body)
            self.acks.append(body)
        elif leaf.startswith("_platform/"):
            body = json.loads(message.payload)
            self.problems += payload_problems(leaf, body)
            self.presence.append(body)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
