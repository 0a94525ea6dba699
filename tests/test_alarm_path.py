"""The alarm path end to end: daemons as processes, a real Mosquitto, real SQLite files.

Each story is one a guard, an installer or the police platform would tell.
"""

from __future__ import annotations

import contextlib
import fcntl
import threading
from collections import defaultdict

import pytest

from edge.contract.events import ContactId, EventDraft, EventKind, utc_now
from edge.daemons.button.daemon import ButtonDaemon
from edge.daemons.button.latch import AlarmLatch
from edge.daemons.uplink.daemon import MARK_BATCH
from edge.runtime.control import request
from edge.store.outbox import Outbox
from tests.support.daemons import in_process, poll_until


def press(config, input_name="gate", hold=0.05) -> dict:
    reply = request(config.storage.runtime_dir / "button.ctl",
                    {"op": "press", "input": input_name, "hold": hold})
    assert reply["ok"] and reply["accepted"], reply
    return reply["event"]


def online(stand_in, session=None):
    return stand_in.wait_for(lambda p: [s for s in p.on("status") if s["state"] == "online"
                                        and (session is None or s["session"] == session)],
                             what="the device's birth")


def test_a_press_reaches_the_police_and_their_acknowledgement_lights_the_led(device,
                                                                             open_outbox):
    running = device()
    config, police, button = running.config, running.police, running.button

    event = press(config)

    [alarm] = police.wait_for(lambda p: [e for e in p.events("alarm") if e["id"] == event["id"]],
                              what="the alarm")
    assert alarm["code"] == ContactId.PANIC and alarm["input"] == "gate"
    assert alarm["seq"] == event["seq"] and alarm["ack_required"] is True
    assert alarm["site_id"] == "test-school" and alarm["location"] == "测试 South gate"
    received = next(m for m in police.messages if m.leaf == "event/alarm")
    assert received.properties.ResponseTopic == f"{config.topic_prefix}/ack"
    assert received.properties.ContentType == "application/json"

    # The guard's feedback: one chirp when recorded, then steady light and two chirps
    # once the platform's acknowledgement is durable on the device.
    recorded = button.wait_for_line("ALARM recorded")
    assert "buzzer: 1 chirp" in button.lines[recorded + 1]
    steady = button.wait_for_line("status LED: steady")
    assert button.wait_for_line("buzzer: 2 chirps") < steady
    status = request(config.storage.runtime_dir / "button.ctl", {"op": "status"})
    assert status["led"] == "steady"
    row = open_outbox(config).get_event_row(event["id"])
    assert row["state"] == "acknowledged" and row["acknowledged_by"] == "test platform"


def test_presses_during_a_network_outage_arrive_in_order_without_gaps_when_it_returns(
        broker, make_config, daemons, platform, open_outbox):
    path, config = make_config()
    police = platform(config, ack=True)
    button = daemons("button", path)
    uplink = daemons("uplink", path)
    online(police)

    broker.stop()
    uplink.wait_for_line("disconnected from the broker")
    committed = [press(config) for _ in range(3)]
    assert [e["repeat"] for e in committed] == [0, 1, 2]
    summary = open_outbox(config).summary()
    assert summary.counts["queued"]["alarm"] == 3
    fast = button.wait_for_line("status LED: fast-blink")

    broker.start()
    arrived = police.wait_for(lambda p: len(p.events("alarm")) >= 3 and p.events("alarm"),
                              what="the three alarms")
    assert [e["id"] for e in arrived] == [e["id"] for e in committed]
    seqs = [e["seq"] for e in arrived]
    assert seqs == list(range(seqs[0], seqs[0] + 3))
    assert [e.get("repeat_of") for e in arrived] == [None, committed[0]["id"], committed[0]["id"]]
    button.wait_for_line("status LED: steady", after=fast)


def _backlog(config, count: int) -> list[str]:
    """Commit ``count`` events in one transaction, as a long outage would leave them."""
    with Outbox(config.storage.database, config.identity) as outbox, outbox.transaction():
        ids = []
        for n in range(count):
            kind = EventKind.FAULT if n % 2 == 0 else EventKind.RESTORE
            ids.append(outbox.append(EventDraft(
                kind=kind, code=ContactId.PANIC_ZONE_TROUBLE, occurred_at=utc_now(),
                clock_synced=True, boot_id="test", input="gate")).id)
        return ids


@pytest.mark.slow
def test_kill_9_of_the_uplink_while_draining_10000_events_loses_nothing(
        make_config, daemons, platform, open_outbox):
    path, config = make_config()
    committed = _backlog(config, 10_000)
    police = platform(config)
    uplink = daemons("uplink", path)
    first = online(police)[0]
    outbox = open_outbox(config)
    # The subscriber lags behind the broker; the kill must land mid-drain on the device.
    poll_until(lambda: outbox.backlog()["queued"] <= 7_500, what="a quarter drained")

    uplink.kill()

    # The broker saw the connection die and published the will of that very session.
    will = police.wait_for(lambda p: [s for s in p.on("status") if s["state"] == "offline"],
                           what="the will")[0]
    assert will == will | {"session": first["session"], "reason": "connection lost"}
    left = outbox.backlog()["queued"]
    assert 0 < left < 10_000

    daemons("uplink", path)
    online(police, session=first["session"] + 1)
    police.wait_for(lambda p: len(p.unique_events) >= 10_000, timeout=120,
                    what="the whole backlog")

    assert {e["id"] for e in police.events()} == set(committed)
    assert sorted(e["seq"] for e in police.events()) == list(range(1, 10_001))
    duplicates = police.event_copies - 10_000
    # Only what was in flight, or PUBACKed but not yet recorded, at the moment of the kill.
    assert duplicates <= config.uplink.inflight_window + MARK_BATCH
    poll_until(lambda: outbox.backlog()["queued"] == 0, what="every row marked sent")


def test_a_thousand_presses_on_four_inputs_with_resets_are_all_delivered(
        make_config, daemons, platform, open_outbox):
    inputs = {name: {"pin": pin, "min_press_ms": 0, "bounce_ms": 0}
              for name, pin in (("gate", 5), ("side", 6), ("back", 13), ("desk", 19))}
    path, config = make_config(inputs=inputs, uplink={"inflight_window": 50})
    police = platform(config)
    daemons("uplink", path)
    online(police)

    # The button daemon runs in this process so that the test can drive its mock pins
    # from several threads at once, as four guards would.
    with in_process(ButtonDaemon(config)) as button:
        go = threading.Barrier(len(inputs) + 1)

        def guard(name: str) -> None:
            contact = button.contacts[name]
            go.wait()
            for _ in range(250):
                contact.press()
                contact.release()

        guards = [threading.Thread(target=guard, args=(n,)) for n in inputs]
        for g in guards:
            g.start()
        resets = 0
        with Outbox(config.storage.database, config.identity) as outbox:
            latch = AlarmLatch(outbox, config.inputs)
            go.wait()
            while any(g.is_alive() for g in guards):
                resets += len(latch.reset(by="test supervisor"))
                guards[0].join(0.02)
            for g in guards:
                g.join()
        police.wait_for(lambda p: len(p.unique_events) >= 1_000 + resets, timeout=60,
                        what="1,000 alarms and the resets")

    events = sorted(police.events(), key=lambda e: e["seq"])
    assert [e["seq"] for e in events] == list(range(1, 1_000 + resets + 1))
    per_input = defaultdict(list)
    for e in events:
        per_input[e["input"]].append(e)
    for name, stream in per_input.items():
        assert sum(e["kind"] == "alarm" for e in stream) == 250, name
        latched_alarm, repeats = None, 0
        for e in stream:  # the latch rules hold at every step, in commit order
            if e["kind"] == "reset":
                assert e["detail"]["alarm_id"] == latched_alarm
                latched_alarm = None
            elif latched_alarm is None:
                assert "repeat_of" not in e
                latched_alarm, repeats = e["id"], 0
            else:
                repeats += 1
                assert (e["repeat_of"], e["repeat"]) == (latched_alarm, repeats)


def test_a_restarted_button_daemon_keeps_the_alarm_latched(device, daemons):
    running = device()
    path, config, police, button = running.path, running.config, running.police, running.button
    first = press(config)
    button.wait_for_line("status LED: steady")
    button.kill()

    restarted = daemons("button", path)
    # Still in alarm after the restart, and still acknowledged: steady, without new chirps.
    restarted.wait_for_line("status LED: steady")
    assert not any("chirp" in line for line in restarted.lines)
    again = press(config)
    assert again["repeat_of"] == first["id"]
    police.wait_for(lambda p: [e for e in p.events() if e["id"] == again["id"]],
                    what="the repeat")
    with contextlib.suppress(AssertionError):
        restarted.wait_for_line("buzzer: 2 chirps", timeout=10)


def test_a_press_that_cannot_be_recorded_is_kept_and_retried_until_it_is(make_config,
                                                                         open_outbox):
    """The disk refuses the commit (here: a trigger standing in for a full disk). The press
    is not dropped: the LED shows the fault, and the alarm is recorded once writing works."""
    _, config = make_config()
    outbox = open_outbox(config)
    outbox.db.execute("CREATE TRIGGER full_disk BEFORE INSERT ON events "
                      "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    with in_process(ButtonDaemon(config)) as button:
        button.contacts["gate"].press_for(0.03)
        poll_until(lambda: button.indicators.pattern == "fault", what="the fault pattern")
        status = request(config.storage.runtime_dir / "button.ctl", {"op": "status"})
        assert status["unrecorded_presses"] == 1
        assert outbox.summary().last_seq == 0

        outbox.db.execute("DROP TRIGGER full_disk")
        poll_until(lambda: outbox.summary().last_seq == 1, what="the retried commit")
        [row] = outbox.db.execute("SELECT kind, input FROM events").fetchall()
        assert row == ("alarm", "gate")
        poll_until(lambda: button.indicators.pattern == "fast-blink", what="the LED to recover")


def test_a_commit_that_hangs_shows_the_fault_instead_of_pretending(make_config, open_outbox):
    """Another writer holds the outbox's write lock (a hung process, a dying SD card): the
    guard's LED must not say "recorded"; once the lock is free the alarm is committed."""
    _, config = make_config()
    outbox = open_outbox(config)
    with in_process(ButtonDaemon(config)) as button, \
            open(f"{config.storage.database}.writelock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            button.contacts["gate"].press_for(0.03)
            poll_until(lambda: button.indicators.pattern == "fault", what="the fault pattern")
            assert outbox.summary().last_seq == 0
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
        poll_until(lambda: outbox.summary().last_seq == 1, what="the commit")
        poll_until(lambda: button.indicators.pattern == "fast-blink", what="the LED to recover")


def test_the_siren_sounds_for_audible_inputs_only_and_stops_at_the_reset(make_config):
    """Local alerting: an `audible` input (Contact ID 123) sounds the siren relay until the
    reset (sound_for_s = 0); a `silent` one (122) neither sounds it nor chirps."""
    from edge.daemons.button.latch import reset_alarms

    inputs = {"gate": {"pin": 17, "mode": "audible"}, "desk": {"pin": 27, "mode": "silent"}}
    _, config = make_config(inputs=inputs,
                            outputs={"siren": {"pin": 24, "sound_for_s": 0}})
    with in_process(ButtonDaemon(config)) as button:
        siren, buzzer = button.indicators.siren_relay, button.indicators.buzzer
        event = press(config, "desk")
        assert event["code"] == ContactId.SILENT_PANIC
        assert not siren.value and buzzer.pin.states[-1].state == 0 \
            and len(buzzer.pin.states) == 1  # never sounded: a silent alarm stays silent
        event = press(config, "gate")
        assert event["code"] == ContactId.AUDIBLE_PANIC
        assert siren.value  # on, and stays on: until the reset
        press(config, "gate")  # a repeat while latched does not restart anything
        assert siren.value
        reset_alarms(config, by="guard Wang")
        button.wake()
        poll_until(lambda: not siren.value, what="the siren to stop at the reset")
