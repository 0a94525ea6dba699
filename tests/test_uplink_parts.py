"""The uplink's parts on their own, in this process, with behavioural fakes where the real
thing cannot be made to fail on demand."""

from __future__ import annotations

import json
import time

import paho.mqtt.client as paho

from edge.contract.events import ContactId, EventDraft, EventKind, utc_now
from edge.contract.messages import Topics
from edge.daemons.button.latch import AlarmLatch
from edge.daemons.uplink.inbound import Inbound
from edge.daemons.uplink.lane import SideLane
from edge.daemons.uplink.resend import Resend
from edge.daemons.uplink.window import PublishWindow
from edge.store.outbox import Outbox
from edge.store.snapshots import SnapshotStore
from tests.support.trust import DUTY_DESK


class AckingClient:
    """What the inbound side needs of paho: acknowledging a message to the broker."""

    def __init__(self):
        self.acked: list[int] = []

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append(mid)


class OutboxWithADefect(Outbox):
    """An outbox whose recording of one event's acknowledgement hits a bug (not a storage
    error): whatever else is recorded with it must not suffer."""

    defective_id: str | None = None

    def mark_acknowledged(self, acks, nonces=None):
        acks = list(acks)
        if any(event_id == self.defective_id for event_id, _, _ in acks):
            raise ValueError("a defect")
        return super().mark_acknowledged(acks, nonces)


def message(topic: str, payload: bytes, mid: int) -> paho.MQTTMessage:
    received = paho.MQTTMessage(mid=mid, topic=topic.encode())
    received.payload, received.qos = payload, 1
    return received


def test_a_defect_recording_one_acknowledgement_rejects_it_alone(make_config):
    _, config = make_config()
    topics, lane, client = Topics(config.topic_prefix), SideLane(), AckingClient()
    inbound = Inbound(config, topics, lane)
    with OutboxWithADefect(config.storage.database, config.identity) as outbox:
        latch = AlarmLatch(outbox, config.inputs)
        alarms = [latch.press("gate").id for _ in range(3)]
        outbox.defective_id = alarms[1]
        for mid, alarm in enumerate(alarms, start=1):
            inbound.on_message(client, None, message(*DUTY_DESK.ack(config.topic_prefix, alarm),
                                                     mid))

        assert inbound.settle(client, outbox, Resend(10, 600), time.monotonic())

        states = outbox.event_states(alarms)
        assert [states[a] for a in alarms] == ["acknowledged", "queued", "acknowledged"]
        assert sorted(client.acked) == [1, 2, 3]  # none comes back
        assert inbound.counts["rejected"] == 1 and inbound.counts["accepted"] == 2
        assert len(lane) == 1  # the rejection of the one, waiting for a slot


class RecordingClient:
    """What the publish window needs of paho: publish, and a message id for each."""

    class _Info:
        def __init__(self, mid: int):
            self.mid = mid

    def __init__(self):
        self.published: list[tuple[str, int]] = []   # (topic, seq)

    def publish(self, topic, payload, qos=0, retain=False, properties=None):
        self.published.append((topic, json.loads(payload)["seq"]))
        return self._Info(len(self.published))


def test_an_alarm_published_again_goes_before_a_newer_one_of_its_priority(make_config):
    """After a move to another broker (no session there), the alarm the platform never
    acknowledged and the alarm pressed since go out in sequence order; an alarm still
    overtakes a test published again."""
    _, config = make_config(inputs={"gate": {"pin": 17}, "office": {"pin": 27}})
    topics, client = Topics(config.topic_prefix), RecordingClient()
    with Outbox(config.storage.database, config.identity) as outbox:
        latch = AlarmLatch(outbox, config.inputs)
        old = latch.press("gate")
        test = outbox.commit_event(EventDraft(
            kind=EventKind.TEST, code=ContactId.MANUAL_TEST, occurred_at=utc_now(),
            clock_synced=True, boot_id="b", detail={}))
        outbox.mark_sent([old.seq, test.seq])
        new = latch.press("office")
        now = time.monotonic()
        resend = Resend(10, 600)
        resend.load(outbox, now)
        resend.session_lost(now)      # the new broker has no session: both due at once
        window = PublishWindow(config, topics, SnapshotStore(
            outbox, config.storage.spool_dir, 10_000_000), resend, lambda: None)
        window.connected(18, None, now)
        window.fill(client, outbox, now)
    assert [seq for _, seq in client.published] == [old.seq, new.seq, test.seq]
