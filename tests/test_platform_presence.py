"""The platform's presence (edge.contract.presence): the rules on their own, then end to end
with a real broker that publishes a real platform's will, the daemons as processes and the
modem simulator: a device that knows the platform is offline sends its SMS at once."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from datetime import timedelta

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge.contract.events import utc_now
from edge.contract.presence import (
    MAX_INSTANCES,
    Presence,
    PresenceBoard,
    platform_id_of,
    presence_body,
    presence_from_body,
)
from edge.contract.signing import Keyring, open_envelope
from edge.daemons.uplink.linkstate import LinkStateFile, read_link_state
from edge.platform.presence import PlatformPresence
from edge.store.outbox import Outbox
from tests.support.contract import problems
from tests.support.daemons import poll_until
from tests.support.modem_sim import ModemSimulator
from tests.support.trust import DUTY_DESK, STRANGER
from tests.test_alarm_path import press
from tests.test_fallback import DUTY, notification

ROOT = "guardpost/v1"


@pytest.fixture
def modem():
    with ModemSimulator() as sim:
        yield sim


# -- the rules ---------------------------------------------------------------------------

def test_the_newest_session_wins_and_within_one_offline_outranks_online():
    board = PresenceBoard()
    assert board.state == "unknown"
    assert board.offer(Presence("desk-1", "online", 100))
    assert board.state == "online"
    # a will of an earlier connection, arriving late: ignored
    assert not board.offer(Presence("desk-1", "offline", 99))
    assert board.state == "online"
    # this connection's will
    assert board.offer(Presence("desk-1", "offline", 100))
    assert board.state == "offline"
    # the same session's online again (a broker replaying the birth) does not undo the will
    assert not board.offer(Presence("desk-1", "online", 100))
    assert board.offer(Presence("desk-1", "online", 101))
    assert board.state == "online"


def test_one_instance_online_is_enough_and_every_instance_offline_is_offline():
    board = PresenceBoard()
    board.offer(Presence("desk-1", "offline", 1))
    board.offer(Presence("desk-2", "online", 1))
    assert board.state == "online"
    assert board.summary() == {"state": "online",
                               "instances": {"desk-1": "offline", "desk-2": "online"}}
    board.offer(Presence("desk-2", "offline", 1))
    assert board.state == "offline"
    assert board.withdraw("desk-2") is False   # desk-1 is still offline
    assert board.withdraw("desk-1") is True
    assert board.state == "unknown"


def test_the_board_is_bounded():
    board = PresenceBoard()
    for n in range(MAX_INSTANCES + 5):
        board.offer(Presence(f"desk-{n}", "offline", 1))
    assert len(board.summary()["instances"]) == MAX_INSTANCES
    board.offer(Presence("desk-0", "online", 2))   # a known one is still heard
    assert board.state == "online"


def test_topics_and_bodies():
    assert platform_id_of(ROOT, f"{ROOT}/_platform/desk-1/presence") == "desk-1"
    for other in (f"{ROOT}/_platform/a/b/presence", f"{ROOT}/_platform//presence",
                  f"{ROOT}/site/dev/status", "other/_platform/desk-1/presence"):
        assert platform_id_of(ROOT, other) is None
    assert presence_from_body(presence_body("d", "online", 5)) == Presence("d", "online", 5)
    for bad in ({**presence_body("d", "online", 5), "extra": 1},
                presence_body("d", "away", 5), presence_body("d", "online", -1),
                {**presence_body("d", "online", 5), "session": "5"},
                presence_body("-d", "online", 5)):
        with pytest.raises(ValueError, match="not a presence message"):
            presence_from_body(bad)


def test_what_the_platform_side_publishes_is_signed_valid_and_ordered():
    keyring = Keyring()
    keyring.add(DUTY_DESK.key_id, _raw(DUTY_DESK), ["ack"])
    presence = PlatformPresence(DUTY_DESK, ROOT, "desk-1")
    topic, online, will = presence.connecting()
    first_session = presence.session
    opened = [open_envelope(payload, topic, keyring, "ack", now=utc_now(), clock_synced=True,
                            newest_accepted=None, seen_nonce=lambda n: False).body
              for payload in (online, will, presence.stopping()[1])]
    assert [b["state"] for b in opened] == ["online", "offline", "offline"]
    assert {b["session"] for b in opened} == {first_session}
    assert [b.get("reason") for b in opened] == [None, "connection lost", "shutdown"]
    for body in opened:
        assert problems("presence", body) == []
    presence.connecting()
    assert presence.session > first_session   # even within the same millisecond


def _raw(signer) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return signer.private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                        serialization.PublicFormat.Raw)


def test_the_link_state_file_carries_the_presence_to_the_fallback(tmp_path):
    link = LinkStateFile(tmp_path)
    link.update(True, platform="online")
    assert read_link_state(tmp_path).can_deliver
    link.update(True, platform="offline")
    reading = read_link_state(tmp_path)
    assert reading.connected and not reading.can_deliver
    assert reading.why == "the platform is offline (its presence)"
    link.update(True, platform="unknown")
    assert read_link_state(tmp_path).can_deliver   # no presence: as before presence existed
    link.update(False, platform="online")
    assert not read_link_state(tmp_path).can_deliver


# -- end to end ----------------------------------------------------------------------------

class PlatformInstance:
    """A platform instance that publishes its presence as the contract says: online on
    connect, offline as its will. :meth:`vanish` cuts its TCP connection without a
    DISCONNECT, so that the broker publishes the will."""

    def __init__(self, broker, signer=DUTY_DESK, platform_id: str = "desk-1"):
        self.presence = PlatformPresence(signer, ROOT, platform_id)
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"presence-{platform_id}",
                                  protocol=paho.MQTTv5)
        topic, self.online, will = self.presence.connecting()
        self.client.will_set(topic, will, qos=1, retain=True)
        self._connected = threading.Event()
        self.client.on_connect = lambda *a: self._connected.set()
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        assert self._connected.wait(10)
        self.client.publish(topic, self.online, qos=1, retain=True).wait_for_publish(10)

    def vanish(self) -> None:
        self.client.loop_stop()
        sock = self.client.socket()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def uplink_platform(outbox: Outbox) -> str | None:
    state = outbox.daemons.all().get("uplink")
    return json.loads(state[0]).get("platform", {}).get("state") if state else None


def test_a_platform_gone_offline_makes_the_alarm_go_by_sms_at_once(
        make_config, daemons, platform, broker, modem):
    # No acknowledgement and a ten-minute timeout: only the presence can send this SMS now.
    path, config = make_config(modem={"port": modem.port, "status_interval_s": 5},
                               fallback={"duty_numbers": DUTY, "ack_timeout_s": 600},
                               uplink={"heartbeat_interval": 2})
    police = platform(config)
    for name in ("button", "uplink", "fallback"):
        daemons(name, path)
    desk = PlatformInstance(broker)
    with Outbox(config.storage.database, config.identity) as outbox:
        poll_until(lambda: uplink_platform(outbox) == "online", what="the presence, online")
        desk.vanish()   # the broker publishes its will: offline, same session
        poll_until(lambda: uplink_platform(outbox) == "offline", what="the will")
        alarm = press(config)
        messages = modem.wait_for_messages(2)
        assert sorted(number for number, _ in messages) == sorted(DUTY)
        row = poll_until(lambda: (n := notification(outbox, alarm["id"]))
                         and n["state"] == "sent" and n)
        assert row["reason"] == "platform offline"
        # The alarm went to the broker all the same: a platform that comes back finds it.
        police.wait_for(lambda p: [e for e in p.events("alarm") if e["id"] == alarm["id"]],
                        what="the alarm on the broker")
        health = police.wait_for(lambda p: [h for h in p.on("health")
                                            if h.get("platform", {}).get("state") == "offline"],
                                 what="a heartbeat saying so")[-1]
        assert health["platform"]["instances"] == {"desk-1": "offline"}

        # Back online (a new session): believed at once.
        PlatformInstance(broker)
        poll_until(lambda: uplink_platform(outbox) == "online", what="the platform back")


def _forged_by_a_stranger(topic: str) -> bytes:
    return STRANGER.sign(topic, presence_body("desk-1", "offline", 2 ** 52))


def _unsigned(topic: str) -> bytes:
    return json.dumps(presence_body("desk-1", "offline", 2 ** 52)).encode()


@pytest.mark.parametrize(("forge", "reason"), [
    (_forged_by_a_stranger, "not believed: unknown key"),
    (_unsigned, "not believed: not a signed envelope"),
])
def test_a_presence_not_signed_by_a_duty_desk_key_changes_nothing(
        make_config, daemons, platform, broker, forge, reason):
    path, config = make_config()
    police = platform(config)
    daemons("button", path)
    daemons("uplink", path)
    desk = PlatformInstance(broker, platform_id="desk-1")   # the real one: online
    with Outbox(config.storage.database, config.identity) as outbox:
        poll_until(lambda: uplink_platform(outbox) == "online", what="the real presence")
    # (not retained: a retained forgery would replace the real one on the broker, which
    # then leaves the device knowing nothing - its behaviour without presence; the
    # broker's ACL keeps everyone but the platform from publishing there)
    topic = desk.presence.topic
    police.client.publish(topic, forge(topic), qos=1)
    [rejection] = police.wait_for(lambda p: [r for r in p.on("rejected")
                                             if r["reason"].startswith(reason)],
                                  what="the rejection")
    assert rejection["topic"] == topic
    # The forgery was handled (its rejection is out) and the real presence still holds.
    with Outbox(config.storage.database, config.identity) as outbox:
        assert uplink_platform(outbox) == "online"


def test_an_expired_signature_does_not_matter_for_a_retained_presence(
        make_config, daemons, platform, broker):
    """A presence is retained: signed when its instance connected, read hours later."""
    path, config = make_config()
    police = platform(config)
    old = PlatformPresence(DUTY_DESK, ROOT, "desk-9")
    old.session = 1
    topic = old.topic
    body = presence_body("desk-9", "offline", 1, "connection lost")
    police.client.publish(topic, DUTY_DESK.sign(topic, body, at=utc_now() - timedelta(hours=5)),
                          qos=1, retain=True).wait_for_publish(10)
    daemons("button", path)
    daemons("uplink", path)
    with Outbox(config.storage.database, config.identity) as outbox:
        poll_until(lambda: uplink_platform(outbox) == "offline", what="the old presence")
