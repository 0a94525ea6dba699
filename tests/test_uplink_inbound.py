"""What the platform (or anyone who can publish to the device) sends, against the uplink as
a process: nothing that arrives may stop, delay or fool the alarm path.

Every message is handled in isolation: it becomes a command or a rejection, never an
exception out of the MQTT callback (before, one poison message crashed the uplink, and the
broker handed it back after every restart).
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.config import Config
from edge.contract.messages import EXCERPT_BYTES
from tests.support.daemons import DaemonProcess, poll_until
from tests.support.platform import PlatformStandIn
from tests.support.trust import ADMIN, DUTY_DESK
from tests.test_alarm_path import online
from tests.test_uplink import commit_alarm

POISON = {
    "a date before year 1 once in UTC": None,   # filled in with a real event id below
    "deep nesting": b'{"event_id": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
    "an integer of 5,000 digits": b'{"event_id": ' + b"9" * 5000 + b"}",
    "invalid UTF-8": b'{"event_id": "\xff\xfe"}',
    "JSON that is not an object": b'["event_id"]',
    "an offset that overflows": b'{"event_id": "01234567-89ab-7def-8123-456789abcdef",'
                                b' "acknowledged_at": "2026-01-01T00:00:00+99:00"}',
}


def rejections(police) -> list[dict]:
    return police.on("rejected")


def props(**values) -> Properties:
    properties = Properties(PacketTypes.PUBLISH)
    for name, value in values.items():
        setattr(properties, name, value)
    return properties


def publish(police: PlatformStandIn, leaf: str, payload: bytes, *, retain: bool = False,
            properties: Properties | None = None) -> None:
    police.client.publish(f"{police.prefix}/{leaf}", payload, qos=1, retain=retain,
                          properties=properties).wait_for_publish(10)


def signed(police: PlatformStandIn, leaf: str, body: dict, **kwargs) -> bytes:
    """``body`` signed as the platform signs it (the duty desk's key for ``ack``, the
    administrator's for commands) and published; returns the message."""
    signer = DUTY_DESK if leaf == "ack" else ADMIN
    payload = signer.sign(f"{police.prefix}/{leaf}", body)
    publish(police, leaf, payload, **kwargs)
    return payload


@dataclass
class Uplinked:
    path: Path
    config: Config
    police: PlatformStandIn
    uplink: DaemonProcess


def connected_uplink(make_config, daemons, platform, **sections) -> Uplinked:
    """An uplink process, connected, and a platform stand-in that has seen its birth."""
    path, config = make_config(**sections)
    police = platform(config)
    uplink = daemons("uplink", path)
    online(police)
    return Uplinked(path, config, police, uplink)


def delivered_alarm(config, police) -> str:
    """An alarm committed and seen at the platform."""
    alarm = commit_alarm(config)
    police.wait_for(lambda p: [e for e in p.events() if e["id"] == alarm], what="the alarm")
    return alarm


# -- class 1: one inbound message stops all delivery ---------------------------------------

@pytest.mark.parametrize("edge_of_the_calendar", ["0001-01-01T00:00:00+14:00",
                                                  "9999-12-31T23:59:59-14:00"])
def test_an_acknowledgement_dated_beyond_the_calendar_is_rejected_and_the_next_alarm_is_delivered(
        make_config, daemons, platform, open_outbox, edge_of_the_calendar):
    up = connected_uplink(make_config, daemons, platform)
    config, police, uplink = up.config, up.police, up.uplink
    first = delivered_alarm(config, police)

    signed(police, "ack", {"event_id": first, "acknowledged_at": edge_of_the_calendar})
    [rejected] = police.wait_for(rejections, what="the rejection")
    assert rejected["event_id"] == first and "acknowledged_at" in rejected["reason"]

    delivered_alarm(config, police)  # the next alarm
    outbox = open_outbox(config)
    assert outbox.event_states([first])[first] == "sent"  # not acknowledged by nonsense
    police.acknowledge(first, by="operator 7")
    poll_until(lambda: outbox.event_states([first])[first] == "acknowledged",
               what="a proper acknowledgement")
    assert uplink.process.poll() is None


def test_messages_that_break_the_code_are_each_rejected_once_and_never_come_back(
        make_config, daemons, platform):
    up = connected_uplink(make_config, daemons, platform)
    config, police = up.config, up.police
    alarm = delivered_alarm(config, police)
    poison = dict(POISON)
    poison["a date before year 1 once in UTC"] = json.dumps(
        {"event_id": alarm, "acknowledged_at": "0001-01-01T00:00:00+14:00"}).encode()
    for payload in poison.values():
        publish(police, "ack", payload)  # as they are: the gate refuses them
    inside = [json.loads(payload) for payload in poison.values() if payload.startswith(b"{")
              and payload.isascii() and len(payload) < 1000]
    for body in inside:
        signed(police, "ack", body)   # signed: they reach the parser
    expected = len(poison) + len(inside)
    answered = police.wait_for(lambda p: len(rejections(p)) >= expected and rejections(p),
                               what="a rejection of each")
    assert len(answered) == expected
    delivered_alarm(config, police)  # the next alarm


def test_a_restarted_uplink_is_not_handed_the_poison_again(make_config, daemons, platform):
    up = connected_uplink(make_config, daemons, platform)
    path, police, uplink = up.path, up.police, up.uplink
    publish(police, "ack", POISON["deep nesting"])
    police.wait_for(lambda p: len(rejections(p)) == 1, what="the rejection")
    uplink.stop()
    daemons("uplink", path)
    online(police, session=2)
    publish(police, "ack", b"marker")  # after anything the broker would hand back
    police.wait_for(lambda p: len(rejections(p)) >= 2, what="the marker's rejection")
    assert [r["payload_excerpt"] for r in rejections(police)][1:] == ["marker"]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_retained_command_is_refused_and_runs_no_test(broker, make_config, daemons,
                                                        open_outbox, protocol):
    path, config = make_config(broker={"protocol": protocol})
    police = PlatformStandIn(broker.host, broker.port, config.topic_prefix,
                             client_id=f"platform-retained-{protocol}").start()
    try:
        signed(police, "cmd/test", {"schema": "guardpost/cmd-test@1",
                                    "request_id": "retained-1"}, retain=True)
        daemons("uplink", path)
        online(police)
        publish(police, "ack", b"marker")  # handled after the retained message, if it came
        police.wait_for(lambda p: [r for r in rejections(p) if r["payload_excerpt"] == "marker"],
                        what="the marker's rejection")
        if protocol == "3.1.1":  # MQTT 5: the subscription asks the broker not to send it
            assert any("retained" in r["reason"] for r in rejections(police))
        tests = open_outbox(config).db.execute("SELECT count(*) FROM alarm_tests").fetchone()[0]
        assert tests == 0
    finally:
        police.stop()
    assert not police.schema_problems


def test_an_acknowledgement_the_outbox_cannot_record_is_neither_rejected_nor_lost(
        make_config, daemons, platform, open_outbox):
    """Our failure, not the message's: it is not refused, not acknowledged to the broker,
    and recorded once the storage works again."""
    up = connected_uplink(make_config, daemons, platform)
    config, police, uplink = up.config, up.police, up.uplink
    alarm = delivered_alarm(config, police)
    outbox = open_outbox(config)
    poll_until(lambda: outbox.event_states([alarm])[alarm] == "sent", what="the PUBACK")
    with outbox.transaction() as conn:  # a storage failure, as SQLite reports one
        conn.execute("CREATE TRIGGER broken_disk BEFORE UPDATE ON events"
                     " WHEN NEW.state = 'acknowledged'"
                     " BEGIN SELECT RAISE(ABORT, 'disk I/O error (simulated)'); END")
    police.acknowledge(alarm)
    uplink.wait_for_line("disk I/O error (simulated)")
    with outbox.transaction() as conn:
        conn.execute("DROP TRIGGER broken_disk")
    poll_until(lambda: outbox.event_states([alarm])[alarm] == "acknowledged", timeout=15,
               what="the acknowledgement once storage works")
    assert rejections(police) == [] and uplink.process.poll() is None


def vm_hwm_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_100_mb_message_over_mqtt_3_1_1_is_refused_without_the_uplink_holding_it(
        broker, make_config, daemons, open_outbox):
    path, config = make_config(broker={"protocol": "3.1.1"})
    police = PlatformStandIn(broker.host, broker.port, config.topic_prefix,
                             protocol=paho.MQTTv311, client_id="platform-large").start()
    try:
        uplink = daemons("uplink", path)
        online(police)
        before = vm_hwm_kb(uplink.pid)
        publish(police, "cmd/test", b'{"schema": "guardpost/cmd-test@1", "request_id": "x", '
                b'"by": "' + b"A" * 100_000_000 + b'"}')
        [rejected] = police.wait_for(rejections, timeout=60, what="the rejection")
        grown_mb = (vm_hwm_kb(uplink.pid) - before) / 1024
        assert grown_mb < 20, f"the uplink grew by {grown_mb:.0f} MB for a 100 MB message"
        assert rejected["reason"].startswith("too large")
        assert open_outbox(config).db.execute("SELECT count(*) FROM alarm_tests").fetchone()[0] == 0
        delivered_alarm(config, police)
    finally:
        police.stop()
    assert not police.schema_problems


# -- class 6: floods and storms --------------------------------------------------------------

def test_a_flood_of_bad_messages_is_answered_at_a_limited_rate_and_counted_in_health(
        make_config, daemons, platform):
    up = connected_uplink(make_config, daemons, platform,
                          uplink={"heartbeat_interval": 1})
    config, police = up.config, up.police
    flood = 2_000
    infos = [police.client.publish(f"{police.prefix}/ack", b"{not json %d" % n, qos=1)
             for n in range(flood)]
    alarm = commit_alarm(config)  # pressed in the middle of the flood
    for info in infos:
        info.wait_for_publish(30)
    police.wait_for(lambda p: [e for e in p.events() if e["id"] == alarm], what="the alarm")

    def accounted(p) -> int:
        """Refusals answered one by one, and those counted in a summary."""
        answered = rejections(p)
        return (len([r for r in answered if r["payload_size"]])
                + sum(r.get("suppressed", 0) for r in answered))

    police.wait_for(lambda p: accounted(p) >= flood, timeout=30,
                    what="every bad message answered or summarised")
    answered = len(rejections(police))
    assert answered < 20, f"{answered} rejections published for {flood} bad messages"
    beats = len(police.on("health"))
    counted = police.wait_for(
        lambda p: len(p.on("health")) > beats and p.on("health")[-1]["inbound"], timeout=10,
        what="the flood counted in health")
    assert counted["rejected"] == flood and counted["unanswered"] >= flood - answered


def test_platform_tests_asked_for_every_half_second_run_once_a_minute(make_config, daemons,
                                                                      platform, open_outbox):
    up = connected_uplink(make_config, daemons, platform)
    config, police = up.config, up.police
    stop = threading.Event()
    count = 0

    def platform_asking() -> None:
        nonlocal count
        while count < 4 and not stop.wait(0.5 if count else 0):
            count += 1
            signed(police, "cmd/test", {"schema": "guardpost/cmd-test@1",
                                        "request_id": f"storm-{count}"})

    asking = threading.Thread(target=platform_asking)
    asking.start()
    asking.join(30)
    replies = police.wait_for(lambda p: len(p.on("reply/test")) >= 4 and p.on("reply/test"),
                              what="four replies")
    assert [r["status"] for r in replies] == ["accepted", "refused", "refused", "refused"]
    assert all(0 < r["retry_after_s"] <= 60 for r in replies[1:])
    tests = open_outbox(config).db.execute("SELECT count(*) FROM alarm_tests").fetchone()[0]
    assert tests == 1


# -- class 11: the contract, as written -------------------------------------------------------

def test_events_carry_their_id_as_mqtt5_correlation_data(make_config, daemons, platform):
    up = connected_uplink(make_config, daemons, platform)
    config, police = up.config, up.police
    alarm = delivered_alarm(config, police)
    received = next(m for m in police.messages if m.leaf == "event/alarm")
    assert received.properties.CorrelationData == alarm.encode()
    assert received.properties.ResponseTopic == f"{config.topic_prefix}/ack"
    assert received.properties.ContentType == "application/json"


def test_a_test_command_without_its_schema_is_rejected_and_runs_no_test(make_config, daemons,
                                                                       platform, open_outbox):
    up = connected_uplink(make_config, daemons, platform)
    config, police = up.config, up.police
    signed(police, "cmd/test", {"request_id": "no-schema"})
    [rejected] = police.wait_for(rejections, what="the rejection")
    assert rejected["request_id"] == "no-schema" and "schema" in rejected["reason"]
    assert open_outbox(config).db.execute("SELECT count(*) FROM alarm_tests").fetchone()[0] == 0


def test_a_request_sent_again_is_answered_where_the_new_request_asks(make_config, daemons,
                                                                     platform, open_outbox):
    up = connected_uplink(make_config, daemons, platform)
    config, police = up.config, up.police
    command = {"schema": "guardpost/cmd-test@1", "request_id": "r-1"}
    signed(police, "cmd/test", command, properties=props(
        ResponseTopic=f"{config.topic_prefix}/reply/first", CorrelationData=b"first"))
    police.wait_for(lambda p: p.on("reply/first"), what="the first acceptance")
    signed(police, "cmd/test", command, properties=props(  # the same request, signed anew
        ResponseTopic=f"{config.topic_prefix}/reply/second", CorrelationData=b"second"))
    [again] = police.wait_for(lambda p: p.on("reply/second"), what="the second acceptance")
    assert again["status"] == "accepted"
    second = next(m for m in police.messages if m.leaf == "reply/second")
    assert second.properties.CorrelationData == b"second"

    # The test finishes (as the self-test daemon records it): the result goes where the
    # request that is still waiting for it asked.
    outbox = open_outbox(config)
    with outbox.transaction() as conn:
        conn.execute("UPDATE alarm_tests SET state = 'passed'")
    from edge.runtime.wake import wake
    wake(config.storage.runtime_dir, "uplink")
    results = police.wait_for(lambda p: [r for r in p.on("reply/second")
                                         if r["status"] == "passed"], what="the result")
    assert results and [r for r in police.on("reply/first") if r["status"] == "passed"] == []


def test_a_rejection_carries_the_requests_correlation_and_quotes_its_payload_verbatim(
        make_config, daemons, platform):
    up = connected_uplink(make_config, daemons, platform)
    police = up.police
    binary = b"\xff\x00garbage"
    publish(police, "ack", binary, properties=props(CorrelationData=b"\x01\x02"))
    text = signed(police, "cmd/test", {"schema": "guardpost/cmd-test@1", "request_id": "r-9",
                                       "by": 7}, properties=props(CorrelationData=b"r-9"))
    first, second = police.wait_for(lambda p: len(rejections(p)) >= 2 and rejections(p),
                                    what="two rejections")
    assert first["payload_encoding"] == "base64"
    assert base64.b64decode(first["payload_excerpt"]) == binary
    assert second["payload_encoding"] == "utf-8"
    assert second["payload_excerpt"] == text[:EXCERPT_BYTES].decode()
    assert second["request_id"] == "r-9"
    received = [m for m in police.messages if m.leaf == "rejected"]
    assert [m.properties.CorrelationData for m in received] == [b"\x01\x02", b"r-9"]
