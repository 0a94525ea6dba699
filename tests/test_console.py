"""guardpost console, its model and client, against the test Mosquitto and simulated
devices (fleet-sim's SimDevice): online -> offline by will and by shutdown, lost when
silent with no will, the acknowledgement round trip (checked by the device itself),
snapshots saved byte for byte, shared work in a group, and nothing a message holds stops
the console. Every payload the console publishes is checked against docs/asyncapi.yaml."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from edge.console.fleet import DEFAULT_DARK_AFTER_S, AckState, Fleet, Link
from edge.contract.events import EventKind
from edge.contract.presence import presence_topic
from edge.platform import DeviceKeys
from edge.runtime.control import request
from edge.tools.fleet_device import fake_jpeg
from tests.support.console import ROOT, Desk, Gates, Recorder, wait_until
from tests.support.device_keys import EVENT_PUBLIC_KEY


@pytest.fixture
def gates(broker):
    running = Gates(broker)
    yield running
    running.close()


@pytest.fixture
def recorder(broker):
    running = Recorder(broker)
    yield running
    running.close()


@pytest.fixture
def desks(broker, tmp_path, gates):
    started: list[Desk] = []

    def start(**kwargs) -> Desk:
        kwargs.setdefault("device_keys", gates.keys)
        desk = Desk(broker, tmp_path, **kwargs)
        started.append(desk)
        return desk

    yield start
    for desk in started:
        desk.stop()


def test_online_then_offline_by_will_and_by_clean_shutdown(gates, desks):
    killed, stopped = gates.start("school-a"), gates.start("school-b")
    desk = desks()
    wait_until(lambda: desk.link(killed) is Link.ONLINE and desk.link(stopped) is Link.ONLINE,
               what="both online")

    gates.kill(killed)
    gates.shut_down(stopped)
    wait_until(lambda: desk.link(killed) is Link.OFFLINE and desk.link(stopped) is Link.OFFLINE,
               what="both offline")
    assert desk.fleet.devices[("school-a", "gate-1")].offline_reason == "connection lost"
    assert desk.fleet.devices[("school-b", "gate-1")].offline_reason == "shutdown"
    assert desk.fleet.counts(0) | {"lost": 0} == {"online": 0, "offline": 2, "lost": 0}


def test_a_device_silent_without_a_will_is_lost_after_its_own_allowance(gates, desks):
    # Heartbeat 1 s, keepalive 2 s: the birth says dark_after_s = max(2 x 1, 1.5 x 2) = 3.
    # The device stays connected (paho answers the keepalive: no will) and publishes
    # nothing more - a stuck uplink, or a broker restart that lost the will.
    device = gates.start("school-quiet", heartbeat=1.0, keepalive=2)
    desk = desks()
    wait_until(lambda: desk.link(device) is Link.ONLINE, what="online")
    assert desk.fleet.devices[("school-quiet", "gate-1")].dark_after_s == 3.0
    wait_until(lambda: desk.link(device) is Link.LOST, what="lost")
    assert device.connected and desk.fleet.devices[
        ("school-quiet", "gate-1")].offline_reason is None
    device.publish_health()  # heard from again
    wait_until(lambda: desk.link(device) is Link.ONLINE, what="online again")


def _health(session: int) -> dict:
    return {"schema": "guardpost/health@1", "session": session}


def _status(state: str, session: int, **fields) -> dict:
    return {"schema": "guardpost/status@1", "state": state, "session": session, **fields}


def test_the_model_judges_silence_by_the_birth_or_the_contracts_default():
    fleet = Fleet()
    fleet.health("s1", "d1", _health(5), now=100.0)   # no birth seen
    assert fleet.link_of("s1", "d1", 100.0 + DEFAULT_DARK_AFTER_S) is Link.ONLINE
    assert fleet.link_of("s1", "d1", 100.1 + DEFAULT_DARK_AFTER_S) is Link.LOST
    fleet.status("s2", "d1", _status("online", 7, dark_after_s=4.5), now=0.0)
    assert fleet.link_of("s2", "d1", 4.5) is Link.ONLINE
    assert fleet.link_of("s2", "d1", 4.6) is Link.LOST
    # the late will of session 6 changes nothing; the will of session 7 does
    fleet.status("s2", "d1", _status("offline", 6), now=1.0)
    assert fleet.link_of("s2", "d1", 1.0) is Link.ONLINE
    fleet.status("s2", "d1", _status("offline", 7, reason="connection lost"),
                 now=1.0)
    assert fleet.link_of("s2", "d1", 1.0) is Link.OFFLINE
    fleet.health("s2", "d1", _health(7), now=2.0)   # the heartbeat before the will
    assert fleet.link_of("s2", "d1", 2.0) is Link.OFFLINE
    fleet.health("s2", "d1", _health(8), now=3.0)   # a new connection
    assert fleet.link_of("s2", "d1", 3.0) is Link.ONLINE


def test_a_snapshot_before_its_alarm_is_attached_when_the_alarm_comes(tmp_path):
    fleet = Fleet()
    fleet.snapshot_saved("e1", tmp_path / "b.jpg")
    fleet.snapshot_saved("e1", tmp_path / "a.jpg")
    alarm, new = fleet.event("s", "d", {"schema": "guardpost/event@1", "id": "e1",
                                        "kind": "alarm"}, now=0.0)
    assert new and alarm.snapshots == [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    assert fleet.unclaimed == {}


def test_an_alarm_acknowledged_at_the_desk_reaches_the_device_signed(gates, desks, recorder):
    device = gates.start("school-330106-0042", location="South gate, Xixi Primary")
    desk = desks()
    event_id = device.publish_event(EventKind.ALARM)
    wait_until(lambda: event_id in desk.fleet.alarms, what="the alarm")
    alarm = desk.fleet.alarms[event_id]
    assert desk.alarms == [event_id]    # the screen's bell hook
    assert (alarm.site_id, alarm.location, alarm.verified) == (
        "school-330106-0042", "South gate, Xixi Primary", True)
    assert alarm.waited_s is not None and alarm.ack is AckState.UNACKNOWLEDGED
    assert device.counts.acks == 0      # alarms wait for a person

    assert "sent" in desk.client.acknowledge(event_id)
    # The device's own check (open_envelope with its trusted keys) accepted it.
    wait_until(lambda: device.counts.acks == 1, what="the device took the ack")
    wait_until(lambda: alarm.ack is AckState.ACKNOWLEDGED, what="the broker took the ack")
    assert device.awaiting_ack == {} and device.counts.acks_refused == 0

    # Twice: another signed ack (a new nonce), which the device accepts and ignores.
    assert "again" in desk.client.acknowledge(event_id)
    wait_until(lambda: len(recorder.acks) == 2, what="the second ack")
    wait_until(lambda: alarm.acks_sent == 2 and alarm.ack is AckState.ACKNOWLEDGED)
    assert device.counts.acks == 1 and device.counts.acks_refused == 0
    assert [a["body"]["event_id"] for a in recorder.acks] == [event_id, event_id]
    assert recorder.problems == []


def test_tests_are_acknowledged_on_arrival(gates, desks):
    device = gates.start("school-t")
    desk = desks()
    event_id = device.publish_event(EventKind.TEST)
    wait_until(lambda: device.counts.acks == 1, what="the test acknowledged")
    assert desk.fleet.notices[event_id].kind == "test" and desk.fleet.alarms == {}


def test_snapshots_are_saved_byte_for_byte(gates, desks):
    device = gates.start("school-s")
    desk = desks()
    event_id = device.publish_event(EventKind.ALARM)
    wait_until(lambda: event_id in desk.fleet.alarms)
    jpeg = fake_jpeg(20_000)
    device.publish_snapshots(event_id, jpeg, 3)
    wait_until(lambda: len(desk.fleet.alarms[event_id].snapshots) == 3, what="3 snapshots")
    paths = desk.fleet.alarms[event_id].snapshots
    assert [p.name for p in paths] == [f"school-s__gate-1__{event_id}__{i:03d}.jpg"
                                       for i in range(3)]
    assert all(p.read_bytes() == jpeg for p in paths)
    assert sorted(p.name for p in desk.snapshots.iterdir()) == [p.name for p in paths]
    assert desk.fleet.not_verified == 0


def test_two_consoles_of_one_group_share_the_events(gates, desks):
    device = gates.start("school-g")
    first, second = desks(platform_id="desk-1", group="duty"), \
        desks(platform_id="desk-2", group="duty")
    published = {device.publish_event(EventKind.ALARM) for _ in range(20)}

    def got():
        return set(first.fleet.alarms) | set(second.fleet.alarms)

    wait_until(lambda: got() == published, what="every alarm at one of the desks")
    assert first.fleet.alarms and second.fleet.alarms                 # each got a share
    assert not set(first.fleet.alarms) & set(second.fleet.alarms)     # each alarm once
    # the devices' links come to every console
    assert first.link(device) is Link.ONLINE and second.link(device) is Link.ONLINE


def test_a_console_publishes_its_presence_signed_with_a_will(broker, tmp_path, gates,
                                                             recorder):
    desk = Desk(broker, tmp_path, gates.keys, platform_id="desk-7")
    wait_until(lambda: [p["body"]["state"] for p in recorder.presence] == ["online"])
    desk.stop()
    wait_until(lambda: len(recorder.presence) == 2, what="offline at a clean stop")
    assert recorder.presence[1]["body"]["reason"] == "shutdown"
    assert recorder.presence[0]["topic"] == presence_topic(ROOT, "desk-7")

    vanishing = Desk(broker, tmp_path, gates.keys, platform_id="desk-8")
    wait_until(lambda: len(recorder.presence) == 3)
    vanishing.client.client.loop_stop()
    vanishing.client.client.socket().close()   # no DISCONNECT: the will
    wait_until(lambda: len(recorder.presence) == 4, what="the will")
    will = recorder.presence[3]["body"]
    assert (will["platform_id"], will["state"], will["reason"]) == (
        "desk-8", "offline", "connection lost")
    assert will["session"] == recorder.presence[2]["body"]["session"]
    assert recorder.problems == []


MALFORMED = [b"", b"\xff\xfe", b"not json", b"[]", b"{}", b"null", b'{"state": "online"}',
             b'{"state": "offline", "session": "7"}', b'{"id": 5, "kind": []}',
             b'{"session": 1e999}', b"[" * 100_000, json.dumps({"x": "y" * 1000}).encode()]


def test_no_message_changes_anything_or_stops_the_console(broker, gates, desks):
    device = gates.start("school-m")
    desk = desks()
    wait_until(lambda: desk.link(device) is Link.ONLINE)
    before = desk.fleet.ignored
    prefix = f"{ROOT}/school-m/gate-1"
    topics = [f"{prefix}/{leaf}" for leaf in ("status", "health", "event/alarm",
                                              "snapshot/x", "snapshot/../..", "event")]
    for topic in topics:
        for payload in MALFORMED:
            device.client.publish(topic, payload, qos=1)
    sent = len(topics) * len(MALFORMED)
    wait_until(lambda: desk.fleet.ignored - before == sent, what="every message ignored")
    assert desk.link(device) is Link.ONLINE
    assert desk.fleet.alarms == {} and desk.fleet.notices == {}
    assert list(desk.snapshots.iterdir()) == []
    # still listening, and a real alarm still comes through
    event_id = device.publish_event(EventKind.ALARM)
    wait_until(lambda: event_id in desk.fleet.alarms)


def test_an_alarm_that_fails_its_signature_is_shown_flagged(gates, desks):
    device = gates.start("school-f")
    desk = desks()
    forged = {"schema": "guardpost/event@1", "id": "0190aaaa-0000-7000-8000-000000000001",
              "seq": 1, "site_id": "school-f", "device_id": "gate-1", "location": "x",
              "kind": "alarm", "code": 120, "qualifier": 1, "priority": "alarm",
              "occurred_at": "2026-12-03T10:00:00.000000Z", "clock_synced": False,
              "boot_id": "b", "ack_required": True}
    device.client.publish(f"{ROOT}/school-f/gate-1/event/alarm", json.dumps(forged), qos=1)
    wait_until(lambda: forged["id"] in desk.fleet.alarms)
    alarm = desk.fleet.alarms[forged["id"]]
    assert alarm.verified is False and "signature" in (alarm.problem or "")
    assert alarm.waited_s is None     # the device's clock was not synced: no outbox time
    assert desk.fleet.not_verified == 1


def test_without_textual_the_command_says_how_to_install_it():
    # A process where Textual cannot be imported (None in sys.modules: ImportError).
    code = ("import sys; sys.modules['textual'] = None; from edge.tools.cli import main; "
            "sys.exit(main(['console', '--broker', '127.0.0.1:9']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert "pip install 'guardpost[console]'" in done.stderr


def test_a_key_without_its_id_is_refused(tmp_path):
    done = subprocess.run([sys.executable, "-m", "edge.tools.cli", "console", "--broker",
                           "127.0.0.1:9", "--key", str(tmp_path / "k.pem")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--key and --key-id go together" in done.stderr


def test_a_real_device_lights_its_led_when_the_desk_acknowledges(
        broker, tmp_path, make_config, daemons, platform, open_outbox):
    """The real button and uplink daemons: the desk's signed ack is believed by the uplink,
    made durable, and the guard's LED turns steady."""
    started = time.monotonic()
    path, config = make_config()
    police = platform(config)               # listens, never acknowledges
    button = daemons("button", path)
    daemons("uplink", path)
    police.wait_for(lambda p: any(s["state"] == "online" for s in p.on("status")),
                    what="the device's birth")
    keys = DeviceKeys()
    keys.add(config.device.site_id, config.device.device_id, EVENT_PUBLIC_KEY)
    desk = Desk(broker, tmp_path, keys, platform_id="desk-real")
    try:
        wait_until(lambda: desk.fleet.link_of(config.device.site_id, config.device.device_id,
                                              time.monotonic()) is Link.ONLINE)
        reply = request(config.storage.runtime_dir / "button.ctl",
                        {"op": "press", "input": "gate", "hold": 0.05})
        event_id = reply["event"]["id"]
        wait_until(lambda: event_id in desk.fleet.alarms, what="the alarm at the desk")
        alarm = desk.fleet.alarms[event_id]
        assert alarm.verified is True and alarm.location == config.device.location
        # the device's own word of its time in the outbox (MQTT 5 waited_ms), a link that
        # was up: well under the time the test has run
        assert alarm.held_s is not None and 0 <= alarm.held_s < time.monotonic() - started
        assert "sent" in desk.client.acknowledge(event_id)
        button.wait_for_line("status LED: steady")
        row = open_outbox(config).get_event_row(event_id)
        assert row["state"] == "acknowledged" and row["acknowledged_by"] == "desk-real"
    finally:
        desk.stop()
