"""The end-to-end alarm test and the health checks, on real parts.

A real Mosquitto, the uplink as its own process, the button daemon in this process on
gpiozero's MockFactory with the test relay's output wired (in the fake) across the panic
input, and the self-test daemon on a clock the test moves: a month passes in no time.
"""

from __future__ import annotations

import contextlib
import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.contract.events import utc_iso
from edge.contract.messages import TEST_COMMAND_SCHEMA
from edge.daemons.button.daemon import ButtonDaemon
from edge.daemons.selftest.alarmtest import AlarmTestRunner, latest_test, request_test
from edge.daemons.selftest.daemon import AlarmTestSchedule, SelfTestDaemon
from edge.daemons.selftest.health import CheckResult, CheckTracker, HealthChecks
from edge.store.outbox import Outbox
from tests.support.daemons import in_process, poll_until
from tests.support.trust import ADMIN
from tests.test_config import guardpost

SHANGHAI = ZoneInfo("Asia/Shanghai")
RELAY = {"test_relay": {"pin": 24, "pulse_ms": 200}}


class FakeClock:
    """The self-test daemon's clocks, moved by the test: the wall clock, and a monotonic
    one that moves with it (a test may also step the wall clock alone)."""

    def __init__(self, start: datetime):
        self.now = start
        self.elapsed = 0.0  # monotonic seconds

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta
        self.elapsed += delta.total_seconds()

    def monotonic(self) -> float:
        return 1000.0 + self.elapsed


def alarm_tests_in(outbox: Outbox) -> list[dict]:
    cursor = outbox.db.execute("SELECT * FROM alarm_tests ORDER BY requested_at")
    names = [c[0] for c in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def kinds(outbox: Outbox) -> list[tuple[str, int]]:
    return [(k, c) for k, c in outbox.db.execute("SELECT kind, code FROM events ORDER BY seq")]


@contextlib.contextmanager
def selftest_daemon(config, clock, **kwargs):
    daemon = SelfTestDaemon(config, clock=clock, clock_synced=lambda: True,
                            monotonic=clock.monotonic, **kwargs)
    with in_process(daemon):
        poll_until(lambda: daemon.runs >= 1, what="the first check run")
        yield daemon


def test_relay_config_must_name_its_input_and_outlast_the_press_filter(tmp_path):
    base = tmp_path / "base.toml"
    from tests.conftest import sim_document, write_toml

    doc = sim_document(tmp_path, 1883, inputs={"a": {"pin": 17}, "b": {"pin": 18}},
                       outputs={"test_relay": {"pin": 24}})
    result = guardpost("config", "check", str(write_toml(base, doc)))
    assert result.returncode == 78
    assert "outputs.test_relay.input: required with more than one input" in result.stderr
    doc = sim_document(tmp_path, 1883, inputs={"a": {"pin": 17, "hold_ms": 500}},
                       outputs={"test_relay": {"pin": 24, "pulse_ms": 300}})
    result = guardpost("config", "check", str(write_toml(base, doc)))
    assert result.returncode == 78 and "outputs.test_relay.pulse_ms: must be at least 550" \
        in result.stderr
    doc = sim_document(tmp_path, 1883, alarm_test={"schedule": "every monday"})
    result = guardpost("config", "check", str(write_toml(base, doc)))
    assert result.returncode == 78 and "alarm_test.schedule: 'every monday' is not a cron" \
        in result.stderr
    doc = sim_document(tmp_path, 1883, device={"timezone": "Mars/Olympus"})
    result = guardpost("config", "check", str(write_toml(base, doc)))
    assert result.returncode == 78 and "device.timezone: unknown time zone" in result.stderr


def test_schedule_slots_are_local_time_and_twice_a_week_works():
    monthly = AlarmTestSchedule("0 10 1 * *", SHANGHAI)
    # 02:30 UTC on 1 December is 10:30 in Shanghai: the December slot has passed.
    now = datetime(2026, 12, 1, 2, 30, tzinfo=UTC)
    assert monthly.latest_slot(now) == datetime(2026, 12, 1, 10, 0, tzinfo=SHANGHAI)
    assert monthly.next_slot(now) == datetime(2027, 1, 1, 10, 0, tzinfo=SHANGHAI)
    exactly = datetime(2026, 12, 1, 10, 0, tzinfo=SHANGHAI)
    assert monthly.latest_slot(exactly) == exactly  # a slot at `now` is due now
    twice = AlarmTestSchedule("0 10 * * 1,4", SHANGHAI)
    week = [twice.next_slot(datetime(2026, 11, 23, tzinfo=SHANGHAI))]
    week.append(twice.next_slot(week[0]))
    assert [d.strftime("%a %H:%M") for d in week] == ["Mon 10:00", "Thu 10:00"]


def test_a_wall_clock_hour_that_happens_twice_is_one_slot():
    # New York, 3 November 2024: 01:30 comes at 05:30 UTC (summer time) and again at
    # 06:30 UTC. Both are the one slot, so one test.
    nightly = AlarmTestSchedule("30 1 * * *", ZoneInfo("America/New_York"))
    slots = {utc_iso(nightly.latest_slot(datetime(2024, 11, 3, h, m, tzinfo=UTC)))
             for h, m in ((5, 45), (6, 30), (6, 45), (7, 45), (23, 0))}
    assert slots == {"2024-11-03T05:30:00.000000Z"}
    # ... and the next slot is always ahead: never the passed one (the daemon would spin).
    for minute in range(0, 120, 7):
        now = datetime(2024, 11, 3, 5, 31, tzinfo=UTC) + timedelta(minutes=minute)
        assert nightly.next_slot(now) > now
    assert utc_iso(nightly.next_slot(datetime(2024, 11, 3, 6, 0, tzinfo=UTC))) == \
        "2024-11-04T06:30:00.000000Z"


def test_scheduled_test_fires_at_its_time_through_the_relay_and_passes(make_config, daemons,
                                                                       platform):
    path, config = make_config(outputs=RELAY)
    police = platform(config, ack=True)
    daemons("uplink", path)
    clock = FakeClock(datetime(2026, 12, 1, 9, 59, 30, tzinfo=SHANGHAI))
    with in_process(ButtonDaemon(config)) as button, selftest_daemon(config, clock) as selftest, \
            Outbox(config.storage.database, config.identity) as outbox:
        assert alarm_tests_in(outbox) == []  # half a minute early: nothing yet
        clock.now = datetime(2026, 12, 1, 10, 0, 0, tzinfo=SHANGHAI)
        selftest.wake()
        [row] = poll_until(lambda: [t for t in alarm_tests_in(outbox)
                                    if t["state"] in ("passed", "failed")], what="the test")
        assert row["state"] == "passed", row
        assert (row["trigger"], row["method"], row["code"]) == ("schedule", "relay", 602)
        assert row["scheduled_for"] == "2026-12-01T02:00:00.000000Z"
        for column in ("edge_to_commit_ms", "commit_to_sent_ms", "sent_to_ack_ms", "total_ms"):
            assert row[column] is not None and row[column] >= 0, column
        assert row["total_ms"] == pytest.approx(row["edge_to_commit_ms"] + row["commit_to_sent_ms"]
                                                + row["sent_to_ack_ms"], abs=0.01)
        [result] = police.wait_for(lambda p: p.events("test-result"), what="the result")
        [test] = police.events("test")
        assert test["code"] == 602 and test["id"] == row["event_id"]
        assert test["detail"]["method"] == "relay" and test["detail"]["covers_wiring"] is True
        assert result["detail"]["result"] == "passed"
        assert result["detail"]["test_id"] == row["id"]
        assert police.events("alarm") == []  # a test, never an alarm
        assert not button.inputs.is_active("gate")  # the relay let go

        # The same slot never runs twice, even after the daemon starts again.
        selftest.wake()
    clock.advance(timedelta(minutes=5))
    with selftest_daemon(config, clock), \
            Outbox(config.storage.database, config.identity) as outbox:
        assert len(alarm_tests_in(outbox)) == 1
        health = police.wait_for(lambda p: [h for h in p.on("health") if h.get("last_test")],
                                 what="the health with the last test")
        assert health[-1]["last_test"]["result"] == "passed"


def test_missed_slot_runs_once_the_clock_is_synchronised(make_config):
    """Off at the slot, and NTP not yet synchronised at boot: the test waits for a true
    clock, then catches up (within catch_up_hours), once."""
    _, config = make_config(alarm_test={"catch_up_hours": 6, "ack_timeout_s": 1})
    synced = threading.Event()
    clock = FakeClock(datetime(2026, 12, 1, 13, 0, tzinfo=SHANGHAI))  # 3 h after the slot
    daemon = SelfTestDaemon(config, clock=clock, clock_synced=synced.is_set)
    with in_process(daemon), Outbox(config.storage.database, config.identity) as outbox:
        poll_until(lambda: daemon.runs >= 1, what="the first check run")
        assert alarm_tests_in(outbox) == []
        synced.set()
        daemon.wake()
        [row] = poll_until(lambda: alarm_tests_in(outbox), what="the catch-up test")
        assert row["scheduled_for"] == "2026-12-01T02:00:00.000000Z"
        # No button daemon here: the software path is taken only without a relay; this
        # configuration has none, so it is a software test that cannot pass (no uplink).
    clock.now = datetime(2026, 12, 1, 20, 0, tzinfo=SHANGHAI)  # beyond catch-up: nothing new
    with selftest_daemon(config, clock), \
            Outbox(config.storage.database, config.identity) as outbox:
        assert len(alarm_tests_in(outbox)) == 1


def test_unacknowledged_test_fails_at_that_stage_and_raises_a_fault_then_a_restore(
        make_config, daemons, platform):
    path, config = make_config(outputs=RELAY, alarm_test={"ack_timeout_s": 1})
    police = platform(config, ack=False)
    daemons("uplink", path)
    with in_process(ButtonDaemon(config)):
        failed = guardpost("test-alarm", "-c", str(path))
        assert failed.returncode == 1, failed.stdout + failed.stderr
        out = failed.stdout
        assert "by test relay (covers the wiring)" in out
        assert "edge" in out and "committed" in out and "the broker has it" in out
        assert "FAILED at stage acknowledged: the platform did not acknowledge" in out
        [fault] = police.wait_for(lambda p: p.events("fault"), what="the fault")
        assert (fault["code"], fault["detail"]["check"]) == (307, "alarm-test")

        police.ack = True
        passed = guardpost("test-alarm", "-c", str(path))
        assert passed.returncode == 0, passed.stdout
        assert "the platform acknowledged it (test platform)" in passed.stdout
        assert "PASSED in" in passed.stdout
        [restore] = police.wait_for(lambda p: p.events("restore"), what="the restore")
        assert restore["detail"]["check"] == "alarm-test" and restore["qualifier"] == 3
        results = [e["detail"]["result"] for e in police.wait_for(
            lambda p: len(p.events("test-result")) == 2 and p.events("test-result"))]
        assert results == ["failed", "passed"]
        assert [e["code"] for e in police.events("test")] == [601, 601]  # a person asked
        assert police.events("alarm") == []


def _press_with_the_relay(button: ButtonDaemon, hold: threading.Event) -> None:
    """A guard presses the button the moment the relay closes, and holds it until
    ``hold`` is set: longer than the pulse."""
    relay_pin = button.indicators.test_relay.pin
    wiring = relay_pin.on_change

    def also_press(level: bool) -> None:
        wiring(level)
        if level:
            button.contacts["gate"].press()
            threading.Thread(target=lambda: (hold.wait(30),
                                             button.contacts["gate"].release())).start()

    relay_pin.on_change = also_press


def test_a_real_press_during_the_test_is_delivered_as_an_alarm(make_config, daemons, platform):
    path, config = make_config(outputs=RELAY)
    police = platform(config, ack=True)
    daemons("uplink", path)
    released = threading.Event()
    with in_process(ButtonDaemon(config)) as button, \
            Outbox(config.storage.database, config.identity) as outbox:
        _press_with_the_relay(button, released)
        try:
            outcome = AlarmTestRunner(config, outbox).run(request_test(outbox, "manual"))
        finally:
            released.set()
        assert not outcome.passed and outcome.failed_stage == "edge"
        assert "a person pressed the button; recorded as an ALARM" in outcome.reason
        [alarm] = police.wait_for(lambda p: p.events("alarm"), what="the alarm")
        assert alarm["code"] == 120 and alarm["input"] == "gate"
        # The pulse's edge was the test's; the hold beyond it a person's alarm, stamped
        # with the same edge: nothing swallowed, nothing delayed by more than the pulse.
        [test] = police.wait_for(lambda p: p.events("test"), what="the test event")
        assert test["occurred_at"] == alarm["occurred_at"]
        assert outcome.event_id == test["id"]

        # Latched now: a test is refused, and makes no event on the input at all.
        before = kinds(outbox)
        outcome = AlarmTestRunner(config, outbox).run(request_test(outbox, "manual"))
        assert not outcome.passed and "latched by an alarm: reset it first" in outcome.reason
        assert [k for k in kinds(outbox)[len(before):] if k[0] in ("alarm", "test")] == []


def test_a_tap_as_the_pulse_ends_is_an_alarm_though_the_filter_takes_it_for_bounce(
        make_config, daemons, platform):
    # A guard taps the button just as the relay lets go, for 36 ms: to the press filter
    # that is bounce of the test press (no press of its own); it is still a person, as
    # its edges say: the input active for more than min_press_ms (10) after the relay's
    # release time (15 ms here) is a finger, however late the judging thread looks.
    path, config = make_config(outputs={"test_relay": {"pin": 24, "pulse_ms": 200,
                                                       "release_ms": 15}},
                               inputs={"gate": {"pin": 17, "bounce_ms": 10}})
    police = platform(config, ack=True)
    daemons("uplink", path)
    with in_process(ButtonDaemon(config)) as button, \
            Outbox(config.storage.database, config.identity) as outbox:
        relay_pin = button.indicators.test_relay.pin
        wiring, contact = relay_pin.on_change, button.contacts["gate"]
        tapped = threading.Event()

        def tap_as_it_lets_go(level: bool) -> None:
            if not level:
                contact.press(by="guard")  # the finger lands as the relay opens
            wiring(level)
            if not level:
                threading.Thread(target=lambda: (threading.Event().wait(0.036),
                                                 contact.release(by="guard"),
                                                 tapped.set())).start()

        relay_pin.on_change = tap_as_it_lets_go
        outcome = AlarmTestRunner(config, outbox).run(request_test(outbox, "manual"))
        assert tapped.wait(5)
        assert not outcome.passed and outcome.failed_stage == "edge"
        assert "recorded as an ALARM" in outcome.reason
        [alarm] = police.wait_for(lambda p: p.events("alarm"), what="the alarm")
        assert alarm["code"] == 120


def test_a_held_button_is_recorded_even_when_the_test_press_cannot_be_recorded_in_time(
        make_config):
    # The outbox takes no writes while the test runs (a writer holding it, a stalling SD
    # card) and a guard holds the button past the pulse. The daemon cannot tell the runner
    # the test's outcome in time, but the guard's alarm is queued, and recorded once the
    # outbox takes writes again.
    import fcntl
    import logging

    _, config = make_config(outputs=RELAY)
    gave_up = threading.Event()

    class GaveUp(logging.Handler):
        def emit(self, record):
            if "not recorded within" in record.getMessage():
                gave_up.set()

    handler = GaveUp()
    logging.getLogger("edge.daemons.button").addHandler(handler)
    try:
        with in_process(ButtonDaemon(config)) as button, \
                Outbox(config.storage.database, config.identity) as outbox, \
                open(f"{config.storage.database}.writelock", "rb") as writer:
            button.outcome_wait_s = 0.5
            relay_pin = button.indicators.test_relay.pin
            wiring = relay_pin.on_change

            def stall_and_hold(level: bool) -> None:
                if level:
                    fcntl.flock(writer, fcntl.LOCK_EX)  # from now on, no write goes in
                    button.contacts["gate"].press(by="guard")
                wiring(level)

            relay_pin.on_change = stall_and_hold
            test_id = request_test(outbox, "manual")

            def run_test() -> None:  # its own connection, as `guardpost test-alarm` has
                with Outbox(config.storage.database, config.identity) as own:
                    AlarmTestRunner(config, own).run(test_id)

            runner = threading.Thread(target=run_test)
            runner.start()
            assert gave_up.wait(30)
            fcntl.flock(writer, fcntl.LOCK_UN)
            runner.join(30)
            poll_until(lambda: ("alarm", 120) in kinds(outbox), what="the guard's alarm")
            button.contacts["gate"].release(by="guard")
            row = outbox.db.execute("SELECT state, failed_stage FROM alarm_tests").fetchone()
            assert row == ("failed", "edge")  # a person pressed: never a passing test
    finally:
        logging.getLogger("edge.daemons.button").removeHandler(handler)


def test_a_press_held_before_the_test_stays_an_alarm_and_the_test_does_not_pulse(
        make_config, daemons, platform):
    path, config = make_config(outputs=RELAY)
    police = platform(config, ack=True)
    daemons("uplink", path)
    with in_process(ButtonDaemon(config)) as button, \
            Outbox(config.storage.database, config.identity) as outbox:
        button.contacts["gate"].press()
        try:
            police.wait_for(lambda p: p.events("alarm"), what="the alarm")
            pulses = len(button.indicators.test_relay.pin.states)
            outcome = AlarmTestRunner(config, outbox).run(request_test(outbox, "manual"))
        finally:
            button.contacts["gate"].release()
        assert not outcome.passed
        assert "is active (a press under way)" in outcome.reason
        assert len(button.indicators.test_relay.pin.states) == pulses  # never energised


def test_a_cut_relay_wire_fails_the_test_at_the_edge(make_config):
    _, config = make_config(outputs=RELAY)
    with in_process(ButtonDaemon(config)) as button, \
            Outbox(config.storage.database, config.identity) as outbox:
        button.indicators.test_relay.pin.on_change = None  # the relay no longer reaches
        outcome = AlarmTestRunner(config, outbox).run(request_test(outbox, "manual"))
        assert not outcome.passed and outcome.failed_stage == "edge"
        assert "did not see the relay pulse" in outcome.reason
        assert [k for k in kinds(outbox)] == [("test-result", 601), ("fault", 307)]


def test_platform_cmd_test_is_answered_with_the_result(make_config, daemons, platform, broker):
    path, config = make_config(outputs=RELAY)
    police = platform(config, ack=True)
    daemons("uplink", path)
    clock = FakeClock(datetime(2026, 12, 15, 9, 0, tzinfo=SHANGHAI))
    prefix = config.topic_prefix
    replies: list[tuple[str, dict, bytes | None]] = []
    got = threading.Condition()

    def on_message(client, userdata, message):
        with got:
            replies.append((message.topic, json.loads(message.payload),
                            getattr(message.properties, "CorrelationData", None)))
            got.notify_all()

    requester = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="police-requester",
                            protocol=paho.MQTTv5)
    requester.on_message = on_message
    requester.connect(broker.host, broker.port)
    requester.loop_start()
    try:
        requester.subscribe(f"{prefix}/reply/#", qos=1)[0]
        with in_process(ButtonDaemon(config)), selftest_daemon(config, clock):
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = f"{prefix}/reply/police-desk-7"
            props.CorrelationData = b"\x01\x02case-42"
            command = {"schema": TEST_COMMAND_SCHEMA, "request_id": "req-42", "by": "110 desk 7"}
            requester.publish(*ADMIN.command(prefix, "test", command),
                              qos=1, properties=props).wait_for_publish(5)
            with got:
                assert got.wait_for(lambda: len(replies) >= 2, timeout=30), replies
            # The same request again (the platform did not hear the answer and asks once
            # more, signed anew): the same test answered again, never a second pulse.
            requester.publish(*ADMIN.command(prefix, "test", command),
                              qos=1, properties=props).wait_for_publish(5)
            with got:
                assert got.wait_for(lambda: len(replies) >= 4, timeout=30), replies
            requester.publish(f"{prefix}/cmd/test", b"{not json", qos=1).wait_for_publish(5)
            [rejected] = police.wait_for(lambda p: p.on("rejected"), what="the rejection")
            assert rejected["topic"] == f"{prefix}/cmd/test"
            assert rejected["reason"].startswith("not believed: not JSON")
    finally:
        requester.disconnect()
        requester.loop_stop()
    (topic, accepted, corr1), (_, result, corr2) = replies[:2]
    assert topic == f"{prefix}/reply/police-desk-7"
    assert accepted["status"] == "accepted" and accepted["request_id"] == "req-42"
    assert result["status"] == "passed" and result["test_id"] == accepted["test_id"]
    assert result["result"]["method"] == "relay" and result["result"]["stages_ms"]["total"] > 0
    assert corr1 == corr2 == b"\x01\x02case-42"
    again = sorted((r["status"], r["test_id"]) for _, r, _ in replies[2:])
    assert again == [("accepted", result["test_id"]), ("passed", result["test_id"])]
    [test] = police.events("test")
    assert test["code"] == 601 and test["detail"]["trigger"] == "platform"


def test_hysteresis_one_fault_one_restore_and_flapping_is_damped():
    tracker = CheckTracker(fail_after=2, restore_after=3)

    def feed(*oks):
        return [tracker.update(CheckResult("disk", ok, "")) for ok in oks]

    # A check failing every other run (a loose connector) raises its one fault...
    assert feed(True, False, True, False, True) == [None, None, None, "fault", None]
    assert feed(False, True, False, True, True) == [None] * 5  # ...flapping: no storm
    assert feed(True) == ["restore"]                             # three passes in a row
    assert feed(False, True, True, True, True, False) == [None] * 6  # failures far apart
    assert feed(False) == ["fault"]                              # two of the last five
    assert feed(None, None) == [None, None]  # an unreadable sensor does not clear a fault
    assert feed(None) == ["restore"]         # three runs of not applying: it is gone
    assert feed(None, False, None, False) == [None, None, None, "fault"]  # n/a is neutral
    assert feed(True, None, True, None, True) == [None] * 4 + ["restore"]  # a flaky sensor
    assert feed(False, False) == [None, "fault"]
    saved = json.loads(json.dumps(tracker.state))
    again = CheckTracker(2, 3, saved)  # survives a restart: still the one fault
    assert [again.update(CheckResult("disk", ok, "")) for ok in (False, True, True, True)] \
        == [None, None, None, "restore"]
    older = CheckTracker(2, 3, {"disk": {"fault": True, "streak": 1}})  # saved by 0.5
    assert older.faulted("disk")


def test_a_check_that_raises_is_a_failed_check_and_the_others_still_run(make_config,
                                                                       tmp_path):
    # The uplink's saved state is not what the broker check expects (a garbled row, a
    # daemon of another version): that check fails on its own, the others still report.
    _, config = make_config()
    with Outbox(config.storage.database, config.identity) as outbox:
        checks = HealthChecks(config, outbox, sys_root=tmp_path / "empty",
                              clock_synced=lambda: True)
        outbox.daemons.save("uplink", json.dumps(["not", "a", "state"]))
        results = {r.name: r for r in checks.run(integrity_due=True)}
    assert results["broker"].ok is False and results["broker"].code == 350  # as its restore
    assert "could not run" in results["broker"].summary
    assert results["modem"].ok is None  # reads another daemon's state: unaffected
    assert results["database"].ok is True and results["clock"].ok is True
    assert results["disk"].ok is True and results["button"].ok is False  # daemon not up
    assert len(results) == 12


def _sysfs(root: Path, celsius: float, throttled: int | None = None) -> Path:
    zone = root / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text(f"{int(celsius * 1000)}\n")
    return root


def test_failing_check_raises_one_fault_and_recovery_one_restore(make_config, tmp_path,
                                                                 platform, daemons):
    path, config = make_config(health={"interval_s": 60, "fail_after": 2, "restore_after": 2,
                                       "max_cpu_celsius": 70})
    police = platform(config, ack=True)
    daemons("uplink", path)
    root = _sysfs(tmp_path / "fake-root", 45.0)
    clock = FakeClock(datetime(2026, 12, 3, 12, 0, tzinfo=SHANGHAI))
    with in_process(ButtonDaemon(config)), selftest_daemon(config, clock, sys_root=root) as st, \
            Outbox(config.storage.database, config.identity) as outbox:

        def run_once(celsius: float) -> None:
            _sysfs(root, celsius)
            runs = st.runs
            clock.advance(timedelta(seconds=60))
            st.wake()
            poll_until(lambda: st.runs > runs, what="a check run")

        for celsius in (85, 40, 85, 40, 85, 85, 85, 40, 85, 40, 40, 40):
            run_once(celsius)
        temperature = [(k, json.loads(p)["detail"]["check"]) for k, p in outbox.db.execute(
            "SELECT kind, payload FROM events WHERE kind IN ('fault', 'restore')")
            if json.loads(p)["detail"]["check"] == "cpu-temperature"]
        assert temperature == [("fault", "cpu-temperature"), ("restore", "cpu-temperature")]
        health = police.wait_for(
            lambda p: [h for h in p.on("health")
                       if h.get("checks", {}).get("cpu-temperature", {}).get("value", {})
                       .get("celsius") == 40.0 and not h["checks"]["cpu-temperature"]["fault"]],
            what="the health after the restore")
        assert health[-1]["checks"]["button"]["ok"] is True
        assert health[-1]["checks"]["wiring"]["ok"] is None  # no supervision loop wired
        status = guardpost("status", "-c", str(path))
        assert "check    cpu-temperature  ok" in status.stdout, status.stdout


def test_a_cut_supervision_loop_is_a_panic_zone_trouble(make_config, tmp_path):
    _, config = make_config(inputs={"gate": {"pin": 17, "supervision_pin": 5}},
                            health={"fail_after": 1, "restore_after": 1})
    clock = FakeClock(datetime(2026, 12, 3, 12, 0, tzinfo=SHANGHAI))
    with in_process(ButtonDaemon(config)) as button, \
            selftest_daemon(config, clock, sys_root=tmp_path / "empty") as st, \
            Outbox(config.storage.database, config.identity) as outbox:
        button.supervision["gate"].pin.drive_high()  # the cable is cut: the pull-up wins
        runs = st.runs
        clock.advance(timedelta(hours=1))
        st.wake()
        poll_until(lambda: st.runs > runs, what="a check run")
        [(kind, payload)] = outbox.db.execute(
            "SELECT kind, payload FROM events WHERE code = 375").fetchall()
        assert kind == "fault" and json.loads(payload)["detail"]["check"] == "wiring"
        assert not any(e == ("alarm", 120) for e in kinds(outbox))


def test_power_check_reads_the_boards_tool_under_its_own_root_never_the_hosts(make_config,
                                                                              tmp_path):
    # A fake root brings its own vcgencmd: the check must ask that one (which reports a
    # weak supply now), not whatever this host has on PATH.
    _, config = make_config()
    root = tmp_path / "pi-root"
    tool = root / "usr/bin/vcgencmd"
    tool.parent.mkdir(parents=True)
    tool.write_text("#!/bin/sh\necho throttled=0x50005\n")
    tool.chmod(0o755)
    with Outbox(config.storage.database, config.identity) as outbox:
        checks = HealthChecks(config, outbox, sys_root=root)

        power = checks.check_power()
        tool.unlink()
        unknown = checks.check_power()

    assert power.ok is False and "under-voltage and throttled now" in power.summary
    assert power.value["under_voltage_since_boot"] is True
    assert unknown.ok is None  # no source at all under this root: not applicable


def test_a_test_cut_short_runs_again_a_persons_is_cancelled_and_too_many_cuts_fail(
        make_config):
    # No uplink here: a test can only be cut short, which is what this is about.
    _, config = make_config()  # no relay: the software test
    with Outbox(config.storage.database, config.identity) as outbox:
        slot = datetime(2026, 12, 1, 10, 0, tzinfo=SHANGHAI)
        scheduled = request_test(outbox, "schedule", scheduled_for=slot)
        manual = request_test(outbox, "manual")

        # A daemon stopping mid-test (an upgrade): the schedule's test waits to run again.
        stop = threading.Event()
        runner = AlarmTestRunner(config, outbox, stop=stop,
                                 progress=lambda stage, info: stage == "edge" and stop.set())
        outcome = runner.run(scheduled)
        assert not outcome.passed
        states = dict(outbox.db.execute("SELECT id, state FROM alarm_tests"))
        assert states[scheduled] == "requested"

        # A power cut mid-test leaves rows "running": found at the next start.
        with outbox.transaction() as conn:
            conn.execute("UPDATE alarm_tests SET state = 'running'")
        assert AlarmTestRunner(config, outbox).recover_interrupted() == 2
        states = dict(outbox.db.execute("SELECT id, state FROM alarm_tests"))
        assert states == {scheduled: "requested", manual: "cancelled"}

        # Cut short a third time: failed, with the alarm-test fault, not run for ever.
        with outbox.transaction() as conn:
            conn.execute("UPDATE alarm_tests SET state = 'running' WHERE id = ?", (scheduled,))
        AlarmTestRunner(config, outbox).recover_interrupted()
        row = outbox.db.execute("SELECT state, reason, interruptions FROM alarm_tests"
                                " WHERE id = ?", (scheduled,)).fetchone()
        assert row[0] == "failed" and "cut short 3 times" in row[1] and row[2] == 3
        faults = [json.loads(p)["detail"] for k, p in outbox.db.execute(
            "SELECT kind, payload FROM events WHERE kind = 'fault'")]
        assert [f["check"] for f in faults] == ["alarm-test"]
        assert [k for k, _ in kinds(outbox) if k == "test-result"] == ["test-result"]


def test_a_test_asked_for_while_another_runs_is_refused_not_failed(make_config):
    # Another test holds the device (as the self-test daemon's would): a person's test is
    # refused, and neither counts as a failed test nor moves the alarm-test fault.
    import fcntl
    import os

    path, config = make_config()
    config.storage.runtime_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(config.storage.runtime_dir / "alarm-test.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        refused = guardpost("test-alarm", "-c", str(path))
    finally:
        os.close(fd)
    assert refused.returncode == 75 and "not run: another alarm test" in refused.stderr
    with Outbox(config.storage.database, config.identity) as outbox:
        assert [r[0] for r in outbox.db.execute("SELECT state FROM alarm_tests")] == ["refused"]
        assert latest_test(outbox) is None
        assert [k for k, _ in kinds(outbox) if k in ("fault", "test-result")] == []


def test_a_storm_of_platform_tests_pulses_the_relay_once_and_every_tap_is_an_alarm(
        make_config, daemons, platform):
    """Issue 11, classes 6 and 7: a `cmd/test` every half second kept the test relay
    pulsing, and 10 of 20 short taps by a guard recorded nothing (while the relay closes
    the contact, a tap on the button cannot be seen). Platform tests are now at least
    `alarm_test.min_interval_s` apart (the others refused, with the time left), and the
    relay at least 5 s apart whoever asks: through the storm the relay pulses once, and
    every tap is recorded as an alarm."""
    path, config = make_config(outputs=RELAY)
    police = platform(config, ack=True)
    daemons("uplink", path)
    clock = FakeClock(datetime(2026, 12, 15, 9, 0, tzinfo=SHANGHAI))
    storming = threading.Event()

    def storm() -> None:
        number = 0
        while not storming.wait(0.5):
            number += 1
            police.command("test", {"schema": TEST_COMMAND_SCHEMA,
                                    "request_id": f"storm-{number}"})

    with in_process(ButtonDaemon(config)) as button, selftest_daemon(config, clock):
        relay = button.indicators.test_relay.pin
        relay.clear_states()
        stormer = threading.Thread(target=storm, daemon=True)
        stormer.start()
        try:
            police.wait_for(lambda p: [r for r in p.on("reply/test") if r["status"] == "passed"],
                            timeout=30, what="the first test's result")
            taps = [button._sim_press({"input": "gate", "hold": 0.03}) for _ in range(20)]
            refused = police.wait_for(
                lambda p: [r for r in p.on("reply/test") if r["status"] == "refused"],
                what="a request inside the interval refused")
        finally:
            storming.set()
            stormer.join(5)
        assert all(tap["ok"] and tap["event"]["kind"] == "alarm" for tap in taps), taps
        assert sum(1 for state in relay.states if state.state) == 1  # energised once
        assert "retry_after_s" in refused[0]
        taps_ids = {tap["event"]["id"] for tap in taps}
        police.wait_for(lambda p: taps_ids <= {e["id"] for e in p.events("alarm")},
                        what="every tap at the platform")
