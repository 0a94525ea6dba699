"""guardpost fleet-sim against the test Mosquitto: twenty devices in one process follow
the contract (every birth, heartbeat, event and snapshot valid against the published
schemas), every alarm and test is acknowledged, a SIGTERM leaves every device offline
with reason "shutdown", a SIGKILL leaves the broker to publish every will."""

from __future__ import annotations

import json
import signal
import threading

import pytest

from tests.support.asyncapi import header_problems, payload_problems
from tests.support.fleet_process import FleetProcess
from tests.support.listener import Waits, listen_to_everything

ROOT = "guardpost/v1"
DEVICES = 20


class FleetRecorder(Waits):
    """Everything below the topic root, each message checked against its schema."""

    def __init__(self, broker):
        self.problems: list[str] = []
        self.last_status: dict[str, dict] = {}     # site -> last status body
        self.births: dict[str, dict] = {}          # site -> last online body
        self.heartbeats: dict[str, int] = {}
        self.events: dict[str, dict] = {}          # event id -> body
        self.snapshots = 0
        self._cond = threading.Condition()
        self.client = listen_to_everything(broker, "fleet-recorder", self._on_message)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, client, userdata, message) -> None:
        site, _device, leaf = message.topic[len(ROOT) + 1:].split("/", 2)
        if not message.payload:
            return  # a retained message cleared
        if leaf.startswith("snapshot/"):
            self._snapshot(message, leaf)
            return
        body = json.loads(message.payload)
        # every message, the platform side's signed acks included, against its AsyncAPI channel
        self.problems += [f"{message.topic}: {p}" for p in payload_problems(leaf, body)]
        if leaf == "ack":
            return
        with self._cond:
            if leaf == "status":
                self.last_status[site] = body
                if body["state"] == "online":
                    self.births[site] = body
            elif leaf == "health":
                self.heartbeats[site] = self.heartbeats.get(site, 0) + 1
            elif leaf.startswith("event/"):
                if not message.payload.endswith(b'"}') or "device_signature" not in body:
                    self.problems.append(f"{message.topic}: not signed")
                self.events[body["id"]] = body
            self._cond.notify_all()

    def _snapshot(self, message, leaf: str) -> None:
        description = dict(message.properties.UserProperty)
        for key in ("index", "width", "height"):
            description[key] = int(description[key])
        description["offset_s"] = float(description["offset_s"])
        self.problems += [f"{message.topic}: {p}"
                          for p in header_problems(leaf, "snapshotMqtt5", description)]
        if leaf != f"snapshot/{description['event_id']}":
            self.problems.append(f"{message.topic}: event_id is not the topic's")
        with self._cond:
            self.snapshots += 1



@pytest.fixture
def recorder(broker):
    running = FleetRecorder(broker)
    yield running
    running.close()


@pytest.fixture
def fleet(broker, tmp_path):
    started: list[FleetProcess] = []

    def start(*args: str) -> FleetProcess:
        process = FleetProcess(f"{broker.host}:{broker.port}", DEVICES,
                               tmp_path / "fleet-report.json", *args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def test_twenty_devices_follow_the_contract_and_every_alarm_is_acknowledged(recorder, fleet):
    sim = fleet("--duration", "3", "--alarm-every", "0.3", "--test-every", "0.6",
                "--heartbeat", "1", "--snapshots", "2", "--seed", "14")
    sim.wait_ready()
    assert sim.wait() == 0
    report = sim.report()

    assert report["events"] > 0
    assert report["acks"] == report["events"] == report["platform_acked"]
    assert report["awaiting_ack"] == 0 and report["acks_refused"] == 0
    assert report["not_verified"] == 0
    assert report["round_trip_ms"]["count"] == report["events"]
    assert recorder.wait_for(lambda r: len(r.events) == report["events"]
                             and r.snapshots == report["snapshots"])
    kinds = {body["kind"] for body in recorder.events.values()}
    assert kinds == {"alarm", "test"}
    assert len(recorder.births) == DEVICES
    assert all(recorder.heartbeats.get(site, 0) >= 2 for site in recorder.births)
    assert recorder.problems == []


def test_sigterm_leaves_every_device_offline_by_shutdown(recorder, fleet):
    sim = fleet("--alarm-every", "0", "--test-every", "0")
    sim.wait_ready()
    assert recorder.wait_for(lambda r: len(r.births) == DEVICES)
    sim.process.send_signal(signal.SIGTERM)
    assert sim.wait() == 0

    def all_offline(r):
        return (len(r.last_status) == DEVICES
                and all(s["state"] == "offline" for s in r.last_status.values()))

    assert recorder.wait_for(all_offline)
    for site, status in recorder.last_status.items():
        assert status["reason"] == "shutdown"
        assert status["session"] == recorder.births[site]["session"]
    assert recorder.problems == []


def test_a_killed_simulator_leaves_the_broker_to_publish_every_will(recorder, fleet):
    sim = fleet("--alarm-every", "0", "--test-every", "0")
    sim.wait_ready()
    assert recorder.wait_for(lambda r: len(r.births) == DEVICES)
    sim.kill()  # SIGKILL: no offline of its own

    def all_offline(r):
        return all(s["state"] == "offline" for s in r.last_status.values())

    assert recorder.wait_for(all_offline)
    for site, status in recorder.last_status.items():
        assert status["reason"] == "connection lost"
        assert status["session"] == recorder.births[site]["session"]
    assert recorder.problems == []
