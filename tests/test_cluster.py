"""A real three-node NATS cluster (JetStream + MQTT 3.1.1, tests/support/nats_cluster.py):
a fleet spread over the nodes loses one node mid-run and nothing is lost: every device of
that node is back on another one, every alarm and test is acknowledged, and every
device's retained status is what a subscriber on any node gets, the restarted node too.
The real device (button and uplink daemons, MQTT 3.1.1) on one node with the two others
as ``broker.alternates`` loses its node between two alarms: both acknowledged, in order.

And what NATS does with wills, found by these tests: a will crosses nodes when a client's
connection breaks, but the will of a client whose node dies (SIGKILL) or shuts down
(SIGTERM) is never published: NATS keeps wills in the memory of the node that holds the
connection. The device's retained ``online`` stays until it connects again elsewhere;
a platform learns of a device that does not come back from its silence (the heartbeat
allowance in its birth), not from a will.
"""

from __future__ import annotations

import json
import threading
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge.config import load_config
from edge.store.outbox import Outbox
from tests.conftest import sim_document, write_toml
from tests.support.asyncapi import payload_problems
from tests.support.daemons import poll_until
from tests.support.fleet_process import FleetProcess
from tests.support.listener import Waits
from tests.support.nats_cluster import NatsCluster, nats_binary
from tests.support.platform import PlatformStandIn
from tests.test_alarm_path import online, press
from tests.test_broker_failover import uplink_state

if nats_binary() is None:
    pytest.skip("nats-server is not installed (.ci/setup installs Debian's nats-server)",
                allow_module_level=True)

ROOT = "guardpost/v1"
DEVICES = 30
LOST = 1  # the node stopped mid-run


@pytest.fixture
def cluster(tmp_path):
    with NatsCluster(tmp_path / "nats") as running:
        yield running


class Listener(Waits):
    """An MQTT 3.1.1 subscriber on one node: every message of ``topics``, retained or not,
    each checked against its AsyncAPI channel; tests wait on conditions over them."""

    def __init__(self, port: int, client_id: str, *topics: str):
        self.messages: list[tuple[str, dict | None, bool]] = []  # (topic, body, retained)
        self.problems: list[str] = []
        self._cond = threading.Condition()
        subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=paho.MQTTv311)
        self.client.on_connect = lambda c, *a: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(20), f"{client_id} did not subscribe"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, client, userdata, message) -> None:
        body = None
        if message.topic.startswith(ROOT + "/") and message.payload:
            body = json.loads(message.payload)
            leaf = message.topic[len(ROOT) + 1:].split("/", 2)[2]
            self.problems += [f"{message.topic}: {p}" for p in payload_problems(leaf, body)]
        elif message.payload:
            body = {"raw": message.payload.decode(errors="replace")}
        with self._cond:
            self.messages.append((message.topic, body, message.retain))
            self._cond.notify_all()

    def bodies(self, suffix: str) -> list[dict]:
        with self._cond:
            return [body for topic, body, _ in self.messages if topic.endswith(suffix) and body]



def retained_statuses(port: int, expected: dict[str, dict], timeout: float = 30.0) -> dict:
    """The retained statuses a subscriber arriving on ``port`` gets, asked again (a new
    subscriber each time) until they are ``expected`` or ``timeout``: each node learns
    retained messages from the replicated stream at its own pace."""
    deadline = time.monotonic() + timeout
    while True:
        late = Listener(port, f"late-{port}", f"{ROOT}/+/+/status")
        try:
            late.wait_for(lambda w: len(w.messages) >= len(expected),
                          timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            retained = {body["site_id"]: body for _, body, was in late.messages if was}
            assert late.problems == []
        finally:
            late.close()
        if retained == expected or time.monotonic() >= deadline:
            return retained


def all_stopped(watcher: Listener) -> bool:
    final = {body["site_id"]: body for body in watcher.bodies("/status")}
    return len(final) == DEVICES and all(b["state"] == "offline" for b in final.values())


def test_a_node_lost_mid_run_loses_nothing_and_every_device_moves(cluster, tmp_path):
    watcher = Listener(cluster.nodes[0].mqtt_port, "watcher", f"{ROOT}/+/+/status",
                       f"{ROOT}/+/+/ack")
    sim = FleetProcess(",".join(cluster.addresses), DEVICES, tmp_path / "report.json",
                       "--protocol", "3.1.1", "--duration", "15", "--alarm-every", "0.2",
                       "--test-every", "0.6", "--heartbeat", "2", "--snapshots", "1")
    try:
        sim.wait_ready(60)
        assert watcher.wait_for(lambda w: len(w.bodies("/ack")) >= 5)  # mid-run
        cluster.kill(LOST)
        assert sim.wait(120) == 0
        # every device's stop, through whichever node it ended on
        assert watcher.wait_for(all_stopped, timeout=90)  # NATS may still be re-electing
    finally:
        sim.kill()
        watcher.close()
    report = sim.report()

    assert report["events"] > 0
    assert report["acks"] == report["events"] and report["awaiting_ack"] == 0
    assert report["platform_received"] == report["events"]  # every event, by id
    assert report["not_verified"] == 0 and report["acks_refused"] == 0
    lost, on_each = cluster.addresses[LOST], DEVICES // len(cluster.nodes)
    assert report["devices_per_broker_at_ready"] == dict.fromkeys(cluster.addresses, on_each)
    assert report["devices_per_broker_at_end"][lost] == 0
    assert sum(report["devices_per_broker_at_end"].values()) == DEVICES
    failover = report["failover"]
    # The lost node's devices, at least: while JetStream elects new leaders for what the
    # lost node led, the other nodes close connections whose publish timed out too.
    assert failover["devices_lost"] >= on_each and failover["not_reconnected"] == 0
    assert failover["events_since_loss_acked"] == failover["events_since_loss"] > 0

    # Per device: every will is of an earlier connection than the device's last birth (the
    # contract's session rule); NATS publishes one when it closes a live connection whose
    # publish timed out while JetStream elected new leaders. The last status is offline:
    # the stop's "shutdown", or a will if NATS cut the link as the device stopped.
    last: dict[str, dict] = {}
    for site in {b["site_id"] for b in watcher.bodies("/status")}:
        mine = [b for b in watcher.bodies("/status") if b["site_id"] == site]
        last_birth = max(b["session"] for b in mine if b["state"] == "online")
        final = mine[-1]
        assert final["state"] == "offline" and final["session"] >= last_birth, mine
        assert all(b["session"] < last_birth for b in mine[:-1]
                   if b["state"] == "offline"), mine
        last[site] = final
    assert len(last) == DEVICES
    # the same retained status on every node, the restarted one too
    cluster.restart(LOST)
    for node in cluster.nodes:
        assert retained_statuses(node.mqtt_port, last) == last, node.name
    assert watcher.problems == []


def _device_with_will(port: int, client_id: str) -> paho.Client:
    """A 3.1.1 client with a retained will on ``{client_id}/status``, its birth published."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv311, clean_session=False)
    client.will_set(f"wills/{client_id}/status", b"will", qos=1, retain=True)
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert connected.wait(20)
    client.publish(f"wills/{client_id}/status", b"online", qos=1, retain=True).wait_for_publish(10)
    return client


def _retained(port: int, topic: str) -> bytes:
    listener = Listener(port, f"look-{port}", topic)
    try:
        assert listener.wait_for(lambda w: w.messages, timeout=20), f"nothing retained on {port}"
        return listener.messages[0][1]["raw"].encode()
    finally:
        listener.close()


@pytest.mark.parametrize("end", ["kill", "stop"])
def test_a_will_crosses_nodes_but_dies_with_its_node(cluster, end):
    watcher = Listener(cluster.nodes[1].mqtt_port, "will-watcher", "wills/#")
    broken = _device_with_will(cluster.nodes[0].mqtt_port, "broken")
    orphan = _device_with_will(cluster.nodes[0].mqtt_port, "orphan")
    try:
        # a connection that breaks (no DISCONNECT) while its node lives: the will, on node 2
        broken.loop_stop()
        broken.socket().close()
        assert watcher.wait_for(lambda w: ("wills/broken/status", {"raw": "will"}, False)
                                in w.messages)
        orphan.loop_stop()  # its link ends with its node
        getattr(cluster, end)(0)
        cluster.restart(0)
        # the node is gone and back: the orphan's will was never published, anywhere
        for node in cluster.nodes:
            assert _retained(node.mqtt_port, "wills/orphan/status") == b"online"
            assert _retained(node.mqtt_port, "wills/broken/status") == b"will"
        assert ("wills/orphan/status", {"raw": "will"}, False) not in watcher.messages
    finally:
        watcher.close()
        for client in (broken, orphan):
            client.loop_stop()
            if client.socket() is not None:
                client.socket().close()


def test_the_real_device_moves_to_another_node_and_both_alarms_are_acknowledged_in_order(
        cluster, tmp_path, daemons):
    first_node, second_node, third_node = cluster.nodes
    path = write_toml(tmp_path / "guardpost.toml", sim_document(
        tmp_path, first_node.mqtt_port,
        broker={"protocol": "3.1.1",
                "alternates": [second_node.mqtt_address, third_node.mqtt_address]}))
    config = load_config(path)
    desk = PlatformStandIn("127.0.0.1", third_node.mqtt_port, config.topic_prefix, ack=True,
                           protocol=paho.MQTTv311, client_id="cluster-platform").start()
    try:
        daemons("button", path)
        daemons("uplink", path)
        online(desk)
        with Outbox(config.storage.database, config.identity) as outbox:
            def acknowledged(*events):
                ids = [e["id"] for e in events]
                return set(outbox.event_states(ids).values()) == {"acknowledged"}

            first = press(config)
            poll_until(lambda: acknowledged(first), what="the first alarm acknowledged")
            cluster.kill(0)
            second = press(config)
            poll_until(lambda: acknowledged(first, second), timeout=60,
                       what="the second alarm acknowledged through another node")
            seqs = [e["seq"] for e in desk.unique_events if e["kind"] == "alarm"]
            assert seqs == [first["seq"], second["seq"]]
            state = poll_until(lambda: (s := uplink_state(outbox)) and s["connected"] and s,
                               what="the uplink's state")
            assert state["broker"] in (f"{second_node.mqtt_address} (alternate 1 of 3)",
                                       f"{third_node.mqtt_address} (alternate 2 of 3)")
    finally:
        desk.stop()
    assert not desk.schema_problems, desk.schema_problems


def test_what_nats_refuses_mqtt_5_and_a_dot_in_a_topic_level(cluster):
    """The README's compatibility table: NATS 2.9 answers an MQTT 5 CONNECT with "unacceptable
    protocol version", and a device whose site id has a '.' (which the configuration
    allows) cannot connect at all: its will topic is refused with the CONNECT."""
    port = cluster.nodes[0].mqtt_port

    def connect(protocol: int, will_topic: str) -> object:
        answers: list = []
        done = threading.Event()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"refused-{protocol}",
                             protocol=protocol)
        client.will_set(will_topic, b"{}", qos=1, retain=True)
        client.on_connect = lambda c, u, flags, reason, props: (answers.append(reason),
                                                                 done.set())
        client.on_disconnect = lambda c, u, flags, reason, props: (
            answers.append(f"closed: {reason}"), done.set())
        client.connect("127.0.0.1", port)
        client.loop_start()
        try:
            assert done.wait(20), "no answer"
        finally:
            client.loop_stop()
            if client.socket() is not None:
                client.socket().close()
        return answers[0]

    assert connect(paho.MQTTv311, f"{ROOT}/school-1/gate-1/status") == "Success"
    refused = connect(paho.MQTTv5, f"{ROOT}/school-1/gate-1/status")
    assert refused == "Unsupported protocol version"
    assert str(connect(paho.MQTTv311, f"{ROOT}/school.1/gate-1/status")).startswith("closed")
