"""Issue 13: only the police platform can acknowledge or command a device, and nothing can
be replayed. Played as an attacker would, against real daemons, a real broker and a real
outbox: forged, moved, expired, replayed and unauthorised messages are rejected with their
reason, counted in health, and change nothing (the LED, the SMS second path, the latch);
the platform's own signed messages work, commands included."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from edge.contract.events import utc_now
from edge.contract.messages import COMMAND_LIMITS, ack_payload
from edge.contract.signing import KINDS
from edge.runtime.control import request
from edge.store.outbox import Outbox
from tests.support.daemons import poll_until
from tests.support.modem_sim import ModemSimulator
from tests.support.sim_clock import TestClock
from tests.support.trust import DUTY_DESK, STRANGER
from tests.test_alarm_path import online, press

DUTY = ["+8613800000001"]


@pytest.fixture
def modem():
    with ModemSimulator() as sim:
        yield sim


def rejections(police) -> list[dict]:
    return police.on("rejected")


def led(config) -> str:
    return request(config.storage.runtime_dir / "button.ctl", {"op": "status"})["led"]


def state_of(config, event_id: str) -> str:
    with Outbox(config.storage.database, config.identity) as outbox:
        return outbox.event_states([event_id])[event_id]


def latest_health(police, after: int) -> dict:
    return police.wait_for(lambda p: len(p.on("health")) > after and p.on("health")[-1],
                           what="a heartbeat")


def test_forged_moved_expired_and_replayed_acknowledgements_change_nothing(
        make_config, daemons, platform, modem, tmp_path):
    path, config = make_config(
        uplink={"heartbeat_interval": 1},
        modem={"port": modem.port, "status_interval_s": 5},
        fallback={"duty_numbers": DUTY, "ack_timeout_s": 3})
    clock = TestClock(tmp_path / "clock.json", synced=True)  # the window applies
    police = platform(config)
    for name in ("button", "uplink", "fallback"):
        daemons(name, path, extra_env=clock.env())
    online(police)
    alarm = press(config)["id"]
    police.wait_for(lambda p: [e for e in p.events() if e["id"] == alarm], what="the alarm")
    prefix, now = config.topic_prefix, utc_now()
    topic = f"{prefix}/ack"
    body = json.loads(DUTY_DESK.ack(prefix, alarm, by="attacker")[1])["body"]
    tampered = DUTY_DESK.ack(prefix, alarm, by="110 desk")[1].replace(b"110 desk", b"attacker")
    stranger = STRANGER.ack(prefix, alarm)[1]
    other_device = DUTY_DESK.ack(prefix.replace("/gate-1", "/gate-2"), alarm)[1]
    forgeries = {
        "not believed: not a signed envelope": ack_payload(alarm, by="attacker"),
        "not believed: bad signature": tampered,
        "not believed: unknown key": stranger,
        "not believed: signed more than 40 s ago": DUTY_DESK.sign(
            topic, body, at=now - timedelta(seconds=60)),
        "not believed: signed more than 20 s ahead": DUTY_DESK.sign(
            topic, body, at=now + timedelta(seconds=60)),
        "not believed: signed for another topic": other_device,
        "event_id: Field required": DUTY_DESK.sign(topic, {"by": "attacker"}),
    }
    beats = len(police.on("health"))
    for payload in forgeries.values():
        police.publish("ack", payload)
    answered = police.wait_for(lambda p: len(rejections(p)) >= len(forgeries)
                               and rejections(p), what="a rejection of each")
    for (expected, _), rejected in zip(forgeries.items(), answered, strict=True):
        assert rejected["reason"].startswith(expected), (expected, rejected["reason"])

    # Nothing changed: the alarm is not acknowledged, the LED does not say "police received
    # it", and the SMS second path goes ahead as if no acknowledgement had come.
    assert state_of(config, alarm) == "sent"
    [(number, _)] = modem.wait_for_messages(1, timeout=30)
    assert number == DUTY[0]
    assert led(config) != "steady"
    health = latest_health(police, beats)["inbound"]
    assert all(health["untrusted"][kind] >= 1 for kind in
               ("malformed", "bad_signature", "unknown_key", "stale", "future", "wrong_topic"))
    assert health["accepted"] == 0

    # The platform's own acknowledgement is believed; sent again, it is a replay.
    topic, valid = DUTY_DESK.ack(prefix, alarm, by="110 desk 7")
    police.publish("ack", valid)
    poll_until(lambda: state_of(config, alarm) == "acknowledged", what="the acknowledgement")
    poll_until(lambda: led(config) == "steady", what="the LED: police received it")
    police.publish("ack", valid)
    replay = police.wait_for(lambda p: len(rejections(p)) > len(forgeries)
                             and rejections(p)[-1], what="the replay's rejection")
    assert replay["reason"].startswith("not believed: nonce already used")
    with Outbox(config.storage.database, config.identity) as outbox:
        assert outbox.event(alarm).acknowledged_by == "110 desk 7"


def test_commands_need_the_command_role_are_rate_limited_and_do_what_they_say(
        make_config, daemons, platform, open_outbox):
    path, config = make_config(
        inputs={"gate": {"pin": 17, "mode": "audible"}},
        outputs={"status_led": {"pin": 22}, "siren": {"pin": 25, "sound_for_s": 0}})
    police = platform(config)
    button = daemons("button", path)
    uplink = daemons("uplink", path)
    online(police)
    alarm = press(config)["id"]
    outbox = open_outbox(config)
    assert outbox.latches.get("gate").alarm_id == alarm

    # A duty desk may acknowledge, not command: its reset is refused, the latch stays.
    police.command("reset", {"schema": "guardpost/cmd-reset@1", "request_id": "desk-1"},
                   signer=DUTY_DESK)
    [refused] = police.wait_for(rejections, what="the desk's reset refused")
    assert refused["reason"] == "not believed: key test-duty-desk may not command"
    assert outbox.latches.get("gate") is not None

    police.command("silence", {"schema": "guardpost/cmd-silence@1", "request_id": "s-1",
                               "by": "110 admin"})
    silenced = police.wait_for(lambda p: [r for r in p.on("reply/silence")
                                          if r["status"] == "done"], what="the siren silenced")
    assert silenced[0]["result"]["siren"] == "silenced"
    button.wait_for_line("siren silenced by 110 admin")
    assert outbox.latches.get("gate") is not None  # silenced, still latched

    police.command("reset", {"schema": "guardpost/cmd-reset@1", "request_id": "r-1",
                             "by": "110 admin"})
    [reset] = police.wait_for(lambda p: p.on("reply/reset"), what="the reset's reply")
    assert reset["status"] == "done" and reset["result"]["reset"][0]["input"] == "gate"
    assert outbox.latches.get("gate") is None
    resets = police.wait_for(lambda p: p.events("reset"), what="the reset event")
    assert resets[0]["detail"]["by"] == "platform: 110 admin"

    _, burst = COMMAND_LIMITS["ping"]
    for n in range(burst + 2):
        police.command("ping", {"schema": "guardpost/cmd-ping@1", "request_id": f"p-{n}"})
    pings = police.wait_for(lambda p: len(p.on("reply/ping")) >= burst + 2 and p.on("reply/ping"),
                            what="every ping answered")
    assert [p["status"] for p in pings].count("done") >= burst
    over = [p for p in pings if p["status"] == "refused"]
    assert over and all(p["retry_after_s"] > 0 for p in over)
    assert "device_time" in pings[0]["result"]

    # A command accepted before a restart is still a replay after it.
    sent = police.command("ping", {"schema": "guardpost/cmd-ping@1", "request_id": "again"})
    police.wait_for(lambda p: [r for r in p.on("reply/ping") if r["request_id"] == "again"],
                    what="the ping's answer")
    uplink.stop()
    daemons("uplink", path)
    online(police, session=2)
    before = len(rejections(police))
    police.publish("cmd/ping", sent)
    replay = police.wait_for(lambda p: len(rejections(p)) > before and rejections(p)[-1],
                             what="the replay refused")
    assert replay["reason"].startswith("not believed: nonce already used")
    assert not police.schema_problems


def test_a_snapshot_command_brings_a_picture_of_each_camera(make_config, daemons, platform,
                                                            tmp_path):
    from drivers.camera.testcard import write_video

    video = tmp_path / "camera.avi"
    write_video(video, [("counter", 20.0)], fps=10.0)
    path, config = make_config(cameras={"gate": {"source": str(video), "rate": 2,
                                                  "loop": True}})
    police = platform(config)
    daemons("camera", path)
    daemons("uplink", path)
    online(police)
    police.command("snapshot", {"schema": "guardpost/cmd-snapshot@1", "request_id": "c-1"})
    accepted = police.wait_for(lambda p: p.on("reply/snapshot"), what="the acceptance")[0]
    assert accepted["status"] == "accepted"
    snapshot_id = accepted["result"]["snapshot_id"]
    done = police.wait_for(lambda p: [r for r in p.on("reply/snapshot") if r["status"] == "done"],
                           what="the camera's answer")
    assert done[0]["result"]["cameras"] == ["gate"]
    pictures = police.wait_for(lambda p: [s for s in p.snapshots
                                          if s[0]["event_id"] == snapshot_id],
                               timeout=20, what="the picture")
    description, jpeg, _ = pictures[0]
    assert description["phase"] == "now" and jpeg[:2] == b"\xff\xd8"
    assert not police.schema_problems


def test_the_health_schema_names_every_kind_of_untrusted_message():
    from tests.support.contract import validator

    schema = validator("health").schema
    untrusted = schema["properties"]["inbound"]["properties"]["untrusted"]
    assert sorted(untrusted["required"]) == sorted(KINDS)


def test_what_the_platform_module_signs_follows_the_published_schemas():
    from edge.contract.messages import COMMANDS, command_from_body
    from tests.support.contract import problems
    from tests.support.trust import ADMIN

    prefix = "guardpost/v1/test-school/gate-1"
    _, ack = DUTY_DESK.ack(prefix, "01a23c19-d487-73b4-8000-0000009b4fd0", by="110 desk")
    envelope = json.loads(ack)
    assert problems("signed", envelope) == [] and problems("ack", envelope["body"]) == []
    for name in COMMANDS:
        body = {"schema": f"guardpost/cmd-{name}@1", "request_id": f"{name}-1", "by": "admin"}
        envelope = json.loads(ADMIN.command(prefix, name, body)[1])
        assert problems("signed", envelope) == []
        assert problems("cmd-test" if name == "test" else "cmd", envelope["body"]) == []
        assert command_from_body(name, envelope["body"]).request_id == f"{name}-1"
