"""The judge itself, fed by a fake device on a real broker: it must see each way the
device could break its contract, or the scenarios' verdicts would prove nothing."""

from __future__ import annotations

import time
import uuid

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

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
from edge.contract.messages import status_payload
from tests.proof.judge import Judge
from tests.proof.presser import CONFIRMED, UNREACHABLE, Press
from tests.support.device_keys import EVENT_SIGNER

IDENTITY = Identity("test-school", "gate-1", "测试 South gate")
PREFIX = "guardpost/v1/test-school/gate-1"
BOOT = str(uuid.uuid4())


def alarm(seq: int, *, kind: EventKind = EventKind.ALARM) -> Event:
    code = ContactId.PANIC if kind == EventKind.ALARM else ContactId.SELF_TEST_FAILURE
    return Event(str(uuid7()), seq, EventDraft(kind, code, utc_now(), False, BOOT, input="gate"))


class FakeDevice:
    """Publishes what a test tells it to, as the device's uplink would (QoS 1)."""

    def __init__(self, broker):
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="fake-device",
                                  protocol=paho.MQTTv5)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.session = 0

    def event(self, event: Event, payload: bytes | None = None) -> None:
        # Signed as the uplink signs (the judge verifies every event's signature).
        payload = EVENT_SIGNER.sign(payload or event.payload(IDENTITY))
        self.client.publish(f"{PREFIX}/{event.topic_suffix}", payload, qos=1).wait_for_publish(5)

    def birth(self) -> None:
        self.session += 1
        self.client.publish(f"{PREFIX}/status", status_payload(
            IDENTITY, state="online", session=self.session, version="0.1.0",
            config="0123456789abcdef", boot_id=BOOT, protocol="5",
            connected_at=utc_iso(utc_now())), qos=1, retain=True).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def stand(broker):
    judge = Judge(broker.host, broker.port, PREFIX, republish_after_s=10, republish_max_s=600)
    judge.start()
    device = FakeDevice(broker)
    yield judge, device
    device.close()
    judge.stop()


def confirmed(*events: Event) -> list[Press]:
    now = time.monotonic()
    return [Press(n, now, now, CONFIRMED, e.id, e.seq) for n, e in enumerate(events, 1)]


def arrived(judge: Judge, copies: int) -> None:
    judge.wait_for(lambda j: j.event_copies >= copies, what=f"{copies} copies")


def test_a_device_that_keeps_its_contract_is_found_to_keep_it(stand):
    judge, device = stand
    first, second = alarm(1), alarm(2)
    device.birth()
    device.event(first)
    device.birth()        # a new connection: one copy more is allowed
    device.event(first)
    device.event(second)
    arrived(judge, 3)
    presses = [*confirmed(first, second), Press(3, 0, 0, UNREACHABLE)]
    verdict = judge.verdict("kept", presses, injections=1)
    assert verdict.ok, verdict.explain()
    assert (verdict.delivered, verdict.duplicates, verdict.unconfirmed) == (2, 1, {UNREACHABLE: 1})


def test_a_confirmed_alarm_that_never_arrives_is_lost(stand):
    judge, device = stand
    first, never, third = alarm(1), alarm(2), alarm(3)
    device.event(first)
    device.event(third)
    arrived(judge, 2)
    verdict = judge.verdict("lost", confirmed(first, never, third), injections=0)
    assert verdict.lost == [never.id]
    assert any("seq 2 never arrived" in p for p in verdict.problems)


def test_first_arrivals_out_of_order_within_a_priority_are_caught_where_promised(stand):
    judge, device = stand
    first, second, fault = alarm(1), alarm(2), alarm(3, kind=EventKind.FAULT)
    device.event(fault)   # another priority: may come first
    device.event(second)
    device.event(first)
    arrived(judge, 3)
    promised = judge.verdict("order", confirmed(first, second), injections=0)
    assert [p for p in promised.problems if "arrived first after" in p] == [
        "alarm seq 1 arrived first after seq 2" + promised.problems[0].split("seq 2")[1]]
    assert judge.verdict("order", confirmed(first, second), injections=0,
                         order_promised=False).ok


def test_copies_that_differ_or_exceed_the_bound_are_caught(stand):
    judge, device = stand
    event = alarm(1)
    device.birth()
    device.event(event)
    device.event(event)   # no new connection, no reconnection, no pause: not allowed
    device.event(event, event.payload(IDENTITY).replace(b'"gate"', b'"desk"'))
    arrived(judge, 3)
    problems = judge.verdict("copies", confirmed(event), injections=0).problems
    assert any("1 of 3 copies differ" in p for p in problems), problems
    assert any("3 copies over" in p and "allows 1" in p for p in problems), problems


def test_the_bound_grows_with_each_republication_pause():
    judge = Judge("127.0.0.1", 1, PREFIX, republish_after_s=10, republish_max_s=30)
    assert [judge.republications_within(s) for s in (9.9, 10, 29.9, 30, 60, 90)] == \
        [0, 1, 1, 2, 3, 4]
