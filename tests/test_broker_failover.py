"""Brokers that fail over (broker.alternates): two real Mosquittos, each with a platform
stand-in of its own (two independent brokers, as a primary and a backup link are), the
daemons as processes. Judged from the brokers' side, by event id."""

from __future__ import annotations

import json
import time

import pytest

from edge.config.loading import ConfigError, parse_config
from edge.store.outbox import Outbox
from edge.tools.localbroker import LocalBroker
from tests.conftest import sim_document
from tests.support.daemons import poll_until
from tests.support.platform import PlatformStandIn
from tests.test_alarm_path import online, press


def uplink_state(outbox: Outbox) -> dict:
    state = outbox.daemons.all().get("uplink")
    return json.loads(state[0]) if state else {}


@pytest.fixture
def backup(tmp_path):
    with LocalBroker(tmp_path / "backup-broker") as running:
        yield running


def test_alternates_are_host_or_host_port_and_a_bad_one_is_named(tmp_path):
    doc = sim_document(tmp_path, 1883, broker={"alternates": ["b.example", "10.0.0.2:8884",
                                                               "[fd00::2]:8885"]})
    config = parse_config(doc)
    assert config.broker.endpoints == [("127.0.0.1", 1883), ("b.example", 1883),
                                       ("10.0.0.2", 8884), ("fd00::2", 8885)]
    for bad in ("b.example:0", "b.example:x", "two words", ""):
        doc = sim_document(tmp_path, 1883, broker={"alternates": ["ok.example", bad]})
        with pytest.raises(ConfigError, match=r"broker\.alternates\.1"):
            parse_config(doc)


def test_the_device_moves_to_the_alternate_with_nothing_lost_or_reordered(
        make_config, daemons, platform, broker, backup):
    path, config = make_config(broker={"alternates": [f"127.0.0.1:{backup.port}"]})
    primary_desk = platform(config, ack=True)
    backup_desk = PlatformStandIn(backup.host, backup.port, config.topic_prefix, ack=True,
                                  client_id="backup-platform").start()
    try:
        daemons("button", path)
        daemons("uplink", path)
        online(primary_desk)
        with Outbox(config.storage.database, config.identity) as outbox:
            first = press(config)
            poll_until(lambda: outbox.event_states([first["id"]]).get(first["id"])
                       == "acknowledged", what="the first alarm acknowledged on the primary")
            # The primary's platform stops acknowledging: the next alarm reaches the primary
            # broker (its PUBACK) and no further; then the primary dies.
            primary_desk.ack = False
            second = press(config)
            primary_desk.wait_for(lambda p: [e for e in p.events("alarm")
                                             if e["id"] == second["id"]], what="the 2nd alarm")
            broker.stop()
            third = press(config)
            # The backup's platform gets what the primary's never acknowledged, then the
            # new alarm: in sequence order, each once at least, nothing else missing.
            backup_desk.wait_for(lambda p: {second["id"], third["id"]}
                                 <= {e["id"] for e in p.events("alarm")},
                                 timeout=30, what="both alarms on the backup")
            seqs = [e["seq"] for e in backup_desk.unique_events if e["kind"] == "alarm"]
            assert seqs == sorted(seqs) and seqs[:2] == [second["seq"], third["seq"]]
            poll_until(lambda: set(outbox.event_states([second["id"], third["id"]]).values())
                       == {"acknowledged"}, what="both acknowledged through the backup")
            state = poll_until(lambda: (s := uplink_state(outbox)) and s["connected"] and s,
                               what="the uplink's state")
            assert state["broker"] == f"127.0.0.1:{backup.port} (alternate 1 of 2)"
            health = backup_desk.wait_for(lambda p: p.on("health"), what="a heartbeat")[-1]
            assert health["broker"] == state["broker"]
    finally:
        backup_desk.stop()
    assert not backup_desk.schema_problems, backup_desk.schema_problems


def test_a_dead_primary_at_start_costs_one_attempt_not_the_alarm(
        make_config, daemons, platform, broker, backup):
    """The primary refuses connections from the start: the device is on the alternate
    after one failed attempt, and an alarm gets through."""
    path, config = make_config(broker={"alternates": [f"127.0.0.1:{backup.port}"]})
    broker.stop()
    backup_desk = PlatformStandIn(backup.host, backup.port, config.topic_prefix, ack=True,
                                  client_id="backup-platform").start()
    try:
        daemons("button", path)
        daemons("uplink", path)
        online(backup_desk)
        alarm = press(config)
        backup_desk.wait_for(lambda p: [e for e in p.events("alarm") if e["id"] == alarm["id"]],
                             what="the alarm on the backup")
        with Outbox(config.storage.database, config.identity) as outbox:
            poll_until(lambda: outbox.event_states([alarm["id"]]).get(alarm["id"])
                       == "acknowledged", what="the alarm acknowledged")
    finally:
        backup_desk.stop()


def test_an_alarm_held_through_an_outage_says_how_long_it_waited(device, broker):
    """MQTT 5 user property ``waited_ms``: the time on the device from the alarm's creation
    to its publication, so that a duty desk sees an alarm held through an outage for what
    it is, whatever the device's clock says."""
    running = device()
    broker.stop()
    alarm = press(running.config)
    pressed = time.monotonic()
    with Outbox(running.config.storage.database, running.config.identity) as outbox:
        poll_until(lambda: not uplink_state(outbox).get("connected"), what="the uplink down")
    poll_until(lambda: time.monotonic() - pressed > 1.0, what="a second of outage")
    held_at_least_ms = (time.monotonic() - pressed) * 1000
    broker.start()
    [received] = running.police.wait_for(
        lambda p: [m for m in p.messages if m.leaf == "event/alarm"
                   and m.body["id"] == alarm["id"]], timeout=30, what="the alarm")
    waited = dict(received.properties.UserProperty)["waited_ms"]
    assert int(waited) >= held_at_least_ms - 1
    fresh = press(running.config)
    [prompt] = running.police.wait_for(
        lambda p: [m for m in p.messages if m.leaf == "event/alarm"
                   and m.body["id"] == fresh["id"]], what="an alarm with the link up")
    assert int(dict(prompt.properties.UserProperty)["waited_ms"]) < int(waited)
