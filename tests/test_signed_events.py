"""Signed events end to end: real button and uplink daemons, a real Mosquitto; an alarm
arrives signed with the device's key, a republished alarm is the same bytes, and
``guardpost verify`` judges the captured message."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edge.contract import event_signature
from edge.contract.event_signature import EventSigner
from edge.platform import EventNotVerified, verify_event
from tests.support.device_keys import EVENT_PUBLIC_KEY, EVENT_SIGNER, OTHER_KEY
from tests.test_alarm_path import press


def guardpost(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge", *args], input=stdin,
                          capture_output=True, timeout=60)


def test_an_alarm_arrives_signed_by_its_device_and_again_as_the_same_bytes(
        make_config, daemons, platform, tmp_path):
    path, config = make_config(uplink={"republish_after_s": 1})
    police = platform(config)  # it does not acknowledge: the device publishes the alarm again
    daemons("button", path)
    daemons("uplink", path)
    alarm = press(config)

    copies = police.wait_for(
        lambda p: (found := [m for m in list(p.messages) if m.leaf == "event/alarm"])
        and len(found) >= 2 and found, what="the alarm and its republication")
    first, again = copies[0], copies[1]
    assert first.payload == again.payload  # Ed25519 is deterministic: same bytes
    event = verify_event(first.payload, EVENT_PUBLIC_KEY, topic=first.topic)
    assert (event["id"], event["seq"]) == (alarm["id"], alarm["seq"])
    with pytest.raises(EventNotVerified, match="bad signature"):
        verify_event(first.payload, OTHER_KEY.public_key(), topic=first.topic)
    assert not police.schema_problems  # the stand-in verified every copy too
    police.acknowledge(alarm["id"])

    # `guardpost verify` on the captured message (as mosquitto_sub prints it: a newline).
    capture = tmp_path / "alarm.json"
    capture.write_bytes(first.payload + b"\n")
    own = guardpost("verify", str(capture), "--config", str(path))  # the device's own key
    assert own.returncode == 0, own.stderr
    assert own.stdout.decode().startswith(f"VERIFIED: alarm #{alarm['seq']} of "
                                          "test-school/gate-1")
    other = EventSigner(OTHER_KEY).public_key
    wrong = guardpost("verify", str(capture), "--public-key", other, "--json")
    assert wrong.returncode == 1
    assert json.loads(wrong.stdout) == {
        "verified": False, "reason": "bad signature: not signed by this device's key"}

    registry = tmp_path / "device-keys.toml"
    registry.write_text(f'[devices]\n"test-school/gate-1" = "{EVENT_SIGNER.public_key}"\n')
    found = guardpost("verify", "--device-keys", str(registry), "--json", "--topic", first.topic,
                      stdin=first.payload)
    assert found.returncode == 0 and json.loads(found.stdout)["event"] == event
    moved = guardpost("verify", "--device-keys", str(registry), "--topic",
                      first.topic.replace("/gate-1/", "/gate-2/"), stdin=first.payload)
    assert moved.returncode == 1 and b"NOT VERIFIED: signed for another topic" in moved.stdout
    damaged = first.payload.replace(b'"kind":"alarm"', b'"kind":"test" ')
    assert guardpost("verify", "--device-keys", str(registry), stdin=damaged).returncode == 1
    assert guardpost("verify", "--public-key", "not-a-key", stdin=b"").returncode == 64


def test_the_console_verifies_every_event_and_marks_one_that_does_not_verify_loudly(
        make_config, daemons, platform, tmp_path):
    path, config = make_config()
    police = platform(config, ack=True)
    daemons("button", path)
    daemons("uplink", path)
    registry = tmp_path / "device-keys.json"
    registry.write_text(json.dumps({"devices": {"test-school/gate-1": EVENT_SIGNER.public_key}}))
    watch = subprocess.Popen([sys.executable, "-m", "edge", "watch", "--device-keys",
                              str(registry), "--count", "2", "-c", str(path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        # Subscribed (persistent session) once the retained birth comes through.
        while "STATUS online" not in watch.stdout.readline():
            pass
        alarm = press(config)
        [real] = police.wait_for(lambda p: [m for m in list(p.messages)
                                            if m.leaf == "event/alarm"], what="the alarm")
        # The same event, signed by a key that is not the device's.
        recorded = real.payload[:-event_signature.SUFFIX_BYTES] + b"}"
        police.publish("event/alarm", EventSigner(OTHER_KEY).sign(recorded))
        lines = list(watch.stdout)
        assert watch.wait(30) == 0
    finally:
        watch.kill()
    events = [line for line in lines if "ALARM" in line]
    assert len(events) == 2 and all(alarm["id"] in line for line in events)
    assert events[0].rstrip().endswith("[signature verified]")
    assert "!! NOT VERIFIED (bad signature: not signed by this device's key) !!" in events[1]
    # The stand-in caught the same forgery (it verifies every event); nothing else.
    assert police.schema_problems == [f"{real.topic}: device signature: bad signature: not "
                                      "signed by this device's key"]
    police.schema_problems.clear()
