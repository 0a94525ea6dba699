"""The SMS second path end to end: a real broker that goes down, the daemons as processes,
and the modem simulator on a real pseudo-terminal."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from datetime import datetime, timedelta

import pytest

from edge.contract.events import utc_now
from edge.daemons.fallback import FallbackDaemon
from edge.daemons.selftest.daemon import SelfTestDaemon
from edge.daemons.uplink.linkstate import LinkStateFile
from edge.store.outbox import Outbox
from tests.support.daemons import in_process, poll_until
from tests.support.modem_sim import ModemSimulator
from tests.test_alarm_path import online, press
from tests.test_config import guardpost

DUTY = ["+8613800138000", "13900139000"]


@pytest.fixture
def modem():
    with ModemSimulator() as sim:
        yield sim


def sms_config(make_config, sim, **fallback):
    return make_config(modem={"port": sim.port, "status_interval_s": 5},
                       fallback={"duty_numbers": DUTY, **fallback})


def sms_device(make_config, daemons, platform, sim, *, ack: bool, **fallback):
    """Button, uplink and fallback daemons as processes, and a platform that has seen the
    device's birth."""
    path, config = sms_config(make_config, sim, **fallback)
    police = platform(config, ack=ack)
    for name in ("button", "uplink", "fallback"):
        daemons(name, path)
    online(police)
    return path, config, police


def notification(outbox: Outbox, event_id: str) -> dict | None:
    cursor = outbox.db.execute("SELECT * FROM sms_notifications WHERE event_id = ?", (event_id,))
    row = cursor.fetchone()
    return dict(zip([c[0] for c in cursor.description], row, strict=True)) if row else None


def uplink_connected(outbox: Outbox) -> bool:
    state = outbox.daemons.all().get("uplink")
    return bool(state and json.loads(state[0])["connected"])


class OffsetClock:
    """Real time, moved forward by the test (the fallback's hour of rate limiting)."""

    def __init__(self):
        self.offset = timedelta()

    def __call__(self):
        return utc_now() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset.total_seconds()


def test_broker_down_press_goes_by_sms_and_reaches_the_platform_when_it_returns(
        make_config, daemons, platform, broker, modem):
    # An hour-long timeout: an SMS can only come from the rule "uplink down: at once".
    _, config, police = sms_device(make_config, daemons, platform, modem, ack=True,
                                   ack_timeout_s=600)
    with Outbox(config.storage.database, config.identity) as outbox:
        broker.stop()
        poll_until(lambda: not uplink_connected(outbox), what="the uplink to notice")
        alarm = press(config)
        messages = modem.wait_for_messages(2)
        assert sorted(number for number, _ in messages) == sorted(DUTY)
        text = messages[0][1]
        assert "测试 South gate" in text and alarm["id"] in text and "紧急报警" in text
        row = poll_until(lambda: (n := notification(outbox, alarm["id"]))
                         and n["state"] == "sent" and n)
        assert row["reason"] == "uplink down" and row["attempts"] == 1
        recipients = json.loads(row["recipients"])
        assert {n: r["state"] for n, r in recipients.items()} == dict.fromkeys(DUTY, "sent")
        assert all(r["references"] and r["parts"] >= 1 for r in recipients.values())

        broker.start()
        notice = police.wait_for(lambda p: p.events("fallback"), timeout=30,
                                 what="the platform to learn of the SMS")[0]
        [delivered] = police.events("alarm")
        assert delivered["id"] == alarm["id"]
        assert notice["code"] == 354 and notice["detail"]["event_ids"] == [alarm["id"]]
        assert notice["detail"]["path"] == "sms" and notice["detail"]["text"] == text
        assert notice["seq"] > delivered["seq"]  # it follows the alarm


def test_an_alarm_acknowledged_in_time_sends_no_sms(make_config, daemons, platform, modem):
    _, config, police = sms_device(make_config, daemons, platform, modem, ack=True,
                                   ack_timeout_s=5)
    with Outbox(config.storage.database, config.identity) as outbox:
        alarm = press(config)
        row = poll_until(lambda: (n := notification(outbox, alarm["id"]))
                         and n["state"] != "watching" and n, what="the fallback's decision")
        assert row["state"] == "acknowledged"
        assert modem.sent == [] and police.events("fallback") == []


def test_silence_from_the_platform_means_one_sms_per_alarm_not_per_repeat(
        make_config, daemons, platform, modem):
    _, config, _ = sms_device(make_config, daemons, platform, modem, ack=False,
                              ack_timeout_s=1)
    with Outbox(config.storage.database, config.identity) as outbox:
        alarm = press(config)
        modem.wait_for_messages(2)
        row = poll_until(lambda: (n := notification(outbox, alarm["id"]))
                         and n["state"] == "sent" and n)
        assert row["reason"] == "no acknowledgement within 1 s"
        repeat = press(config)
        assert repeat["repeat_of"] == alarm["id"]
        poll_until(lambda: outbox.db.execute(
            "SELECT value FROM counters WHERE name = 'fallback_seen'").fetchone()[0]
            >= repeat["seq"], what="the fallback to see the repeat")
        assert len(modem.messages()) == 2 and notification(outbox, repeat["id"]) is None


def test_a_failed_send_is_retried_and_alarms_over_the_hourly_limit_go_together(
        make_config, daemons, modem):
    path, config = make_config(
        modem={"port": modem.port},
        fallback={"duty_numbers": DUTY[:1], "ack_timeout_s": 1, "retry_s": 1,
                  "max_sms_per_hour": 1})
    daemons("button", path)  # no uplink: nothing is ever acknowledged
    clock = OffsetClock()
    with in_process(on_clock(config, clock)) as fallback, \
            Outbox(config.storage.database, config.identity) as outbox:
        modem.set(fail_sends=1, send_error=500)
        first = press(config)
        fallback.wake()
        row = poll_until(lambda: (n := notification(outbox, first["id"]))
                         and n["state"] == "sent" and n, what="the retried SMS")
        assert row["attempts"] == 2
        recipient = json.loads(row["recipients"])[DUTY[0]]
        assert recipient["state"] == "sent" and len(recipient["sent"]) == 1

        later = []
        for _ in range(2):  # two more alarms (reset in between): the hour's SMS is spent
            guardpost("reset", "-c", str(path))
            later.append(press(config)["id"])
        fallback.wake()
        poll_until(lambda: all((n := notification(outbox, i)) and n["state"] == "due"
                               and n["attempts"] == 0 for i in later),
                   what="alarms held back by the rate limit")
        assert len(modem.messages()) == 1
        clock.offset = timedelta(hours=1, minutes=1)
        fallback.wake()
        [(_, together)] = modem.wait_for_messages(2)[1:]
        assert "（2起）" in together and later[0] in together  # both, in one SMS
        notices = poll_until(lambda: (n := [json.loads(p)["detail"]["event_ids"] for (p,) in
                                            outbox.db.execute("SELECT payload FROM events WHERE"
                                                              " kind = 'fallback' ORDER BY seq")])
                             and len(n) == 2 and n, what="the second fallback event")
        assert notices == [[first["id"]], later]


def on_clock(config, clock) -> FallbackDaemon:
    """A fallback daemon whose wall clock and monotonic clock are the test's."""
    return FallbackDaemon(config, clock=clock, monotonic=clock.monotonic)


class StoppedClock:
    """Time that moves only when the test moves it: the pauses between retries."""

    def __init__(self):
        self.now = utc_now()
        self.mono = time.monotonic()

    def __call__(self):
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.mono += seconds


def test_an_alarm_the_modem_cannot_send_is_retried_ever_more_slowly_and_never_given_up(
        make_config, daemons, modem):
    path, config = make_config(modem={"port": modem.port},
                               fallback={"duty_numbers": DUTY[:1], "retry_s": 10,
                                         "max_attempts": 1})
    daemons("button", path)  # no uplink: nothing is ever acknowledged
    clock = StoppedClock()
    modem.set(registration=0)  # no network: the module cannot send at all
    with in_process(on_clock(config, clock)) as fallback, \
            Outbox(config.storage.database, config.identity) as outbox:
        alarm = press(config)
        fallback.wake()
        pauses = []
        for _ in range(7):
            row = poll_until(lambda: (n := notification(outbox, alarm["id"]))
                             and n["next_attempt_at"] and
                             datetime.fromisoformat(n["next_attempt_at"]) > clock.now and n,
                             what="the next retry to be planned")
            # Attempts count refusals of the message, not a module that cannot send.
            assert row["state"] == "due" and row["attempts"] == 0
            pauses.append((datetime.fromisoformat(row["next_attempt_at"])
                           - clock.now).total_seconds())
            clock.advance(pauses[-1])
            fallback.wake()
        assert pauses == [10, 20, 40, 80, 160, 300, 300]  # longer each time, up to 5 min
        assert json.loads(row["recipients"])[DUTY[0]]["unable"] == 7

        modem.set(registration=1)  # the network is back: the alarm goes, once
        assert modem.wait_for_messages(1)[0][0] == DUTY[0]
        row = poll_until(lambda: (n := notification(outbox, alarm["id"]))
                         and n["state"] == "sent" and n, what="the SMS path to finish")
        assert row["attempts"] == 1 and len(modem.messages()) == 1


def test_a_number_refused_max_attempts_times_is_given_up_the_others_still_get_it(
        make_config, daemons, modem):
    path, config = make_config(modem={"port": modem.port},
                               fallback={"duty_numbers": DUTY, "retry_s": 10,
                                         "max_attempts": 2})
    daemons("button", path)
    clock = StoppedClock()
    modem.set(refused_numbers=(DUTY[1],), send_error=500)
    with in_process(on_clock(config, clock)) as fallback, \
            Outbox(config.storage.database, config.identity) as outbox:
        alarm = press(config)
        fallback.wake()
        row = poll_until(lambda: (n := notification(outbox, alarm["id"]))
                         and n["attempts"] == 1 and n["next_attempt_at"] and n,
                         what="the first sending")
        clock.advance((datetime.fromisoformat(row["next_attempt_at"])
                       - clock.now).total_seconds())
        fallback.wake()
        row = poll_until(lambda: (n := notification(outbox, alarm["id"]))
                         and n["state"] != "due" and n, what="the SMS path to finish")
        recipients = json.loads(row["recipients"])
        assert row["state"] == "sent" and row["attempts"] == 2
        assert recipients[DUTY[0]]["state"] == "sent"  # one SMS, not one per retry
        assert (recipients[DUTY[1]]["state"], recipients[DUTY[1]]["refusals"]) == ("stopped", 2)
        assert f"gave up on {DUTY[1]} after 2 refusals" in row["reason"]
        assert [number for number, _ in modem.messages()] == DUTY[:1]


def test_modem_state_is_shown_and_a_missing_sim_is_a_fault(make_config, daemons, modem):
    path, config = make_config(modem={"port": modem.port, "status_interval_s": 5},
                               fallback={"duty_numbers": DUTY[:1]},
                               health={"interval_s": 5, "fail_after": 1, "restore_after": 1})
    daemons("button", path)
    daemons("fallback", path)
    clock = OffsetClock()
    with Outbox(config.storage.database, config.identity) as outbox:
        poll_until(lambda: "fallback" in outbox.daemons.all(), what="the modem's state")
    with in_process(SelfTestDaemon(config, clock=clock, clock_synced=lambda: True)) as st, \
            Outbox(config.storage.database, config.identity) as outbox:
        poll_until(lambda: st.runs >= 1, what="a check run")
        status = guardpost("status", "-c", str(path)).stdout
        assert "modem    EC25 on" in status and "SIM READY, network home (CHINA MOBILE)" \
            in status and "-73 dBm (CSQ 20)" in status, status
        assert "check    modem            ok" in status

        modem.set(sim="absent")
        poll_until(lambda: "SIM not inserted" in outbox.daemons.all()["fallback"][0],
                   what="the fallback to read the missing SIM")
        runs = st.runs
        clock.offset += timedelta(seconds=config.health.interval_s)
        st.wake()
        poll_until(lambda: st.runs > runs, what="a check run")
        [(code, detail)] = [(c, json.loads(p)["detail"]) for c, p in outbox.db.execute(
            "SELECT code, payload FROM events WHERE kind = 'fault'")
            if json.loads(p)["detail"]["check"] == "modem"]
        assert code == 350
        assert detail["summary"] == "SIM not inserted"
        assert "PROBLEM: SIM not inserted" in guardpost("status", "-c", str(path)).stdout


def test_a_rejected_pin_is_never_offered_again(make_config, modem):
    modem.set(sim="SIM PIN", pin="4321")
    _, config = make_config(modem={"port": modem.port, "pin": "1111"},
                            fallback={"duty_numbers": DUTY[:1]})
    for _ in range(2):  # the second start remembers the first one's rejection
        daemon = FallbackDaemon(config)
        with in_process(daemon):
            poll_until(lambda d=daemon: d.status_reads >= 1, what="the modem status")
    assert modem.commands.count("AT+CPIN=1111") == 1
    assert modem.state.wrong_pins == 1 and modem.state.sim == "SIM PIN"
    assert "already rejected once: not retrying" in daemon.modem_status["error"]


def test_a_pin_refused_while_sending_is_not_offered_again_after_a_restart(make_config, daemons,
                                                                         modem):
    path, config = make_config(modem={"port": modem.port, "pin": "1111"},
                               fallback={"duty_numbers": DUTY[:1], "retry_s": 1})
    daemons("button", path)
    clock = StoppedClock()  # no second status read: the PIN goes in on the send path
    with in_process(on_clock(config, clock)) as fallback, \
            Outbox(config.storage.database, config.identity) as outbox:
        poll_until(lambda: fallback.status_reads >= 1, what="the modem's first reading")
        modem.set(sim="SIM PIN", pin="4321")  # the module restarted: its SIM wants the PIN

        def unable(times: int):
            return poll_until(lambda: (n := notification(outbox, alarm["id"])) and json.loads(
                n["recipients"]).get(DUTY[0], {}).get("unable") == times and n["next_attempt_at"]
                and datetime.fromisoformat(n["next_attempt_at"]) > clock.now and n,
                what=f"failed try {times}")

        alarm = press(config)
        fallback.wake()
        row = unable(1)  # +CMS ERROR: 310, the SIM is not ready; the port is reopened ...
        clock.advance((datetime.fromisoformat(row["next_attempt_at"])
                       - clock.now).total_seconds())
        fallback.wake()
        unable(2)  # ... where the PIN is entered, and refused
    assert modem.commands.count("AT+CPIN=1111") == 1
    # Killed (or stopped) now, before any status read: the next start remembers.
    daemon = FallbackDaemon(config)
    with in_process(daemon):
        poll_until(lambda: daemon.status_reads >= 1, what="the modem status")
    assert modem.commands.count("AT+CPIN=1111") == 1 and modem.state.wrong_pins == 1
    assert "already rejected once" in daemon.modem_status["error"]


def test_doctor_reads_the_modem_when_no_daemon_owns_it(make_config, modem):
    from edge.tools.doctor import FAIL, PASS, Doctor, Step

    path, config = make_config(modem={"port": modem.port})
    doctor = Doctor(path, say=lambda line: None)
    doctor.config = config
    step = Step("4G modem")
    doctor.check_modem(step)
    assert step.status == PASS and step.detail.startswith("EC25: SIM ready, registered (home)")
    modem.set(sim="absent")
    step = Step("4G modem")
    doctor.check_modem(step)
    assert (step.status, step.detail) == (FAIL, "SIM not inserted")
    modem.set(sim="READY", garbled={"AT+CSQ": "+CSQ: --,99"})
    step = Step("4G modem")
    doctor.check_modem(step)
    assert (step.status, step.detail) == (FAIL, "AT+CSQ: unreadable answer '--,99'")


def test_an_unplugged_modem_is_reported_and_the_daemon_keeps_running(make_config, modem):
    _, config = make_config(modem={"port": modem.port, "status_interval_s": 5},
                            fallback={"duty_numbers": DUTY[:1]})
    clock = OffsetClock()
    with in_process(on_clock(config, clock)) as daemon:
        poll_until(lambda: daemon.status_reads >= 1 and daemon.modem_status["present"],
                   what="the modem's first reading")
        modem.hang_up()  # the USB modem is pulled out: its port now fails with EIO
        for reads in (2, 3):  # the read that meets the dead port, then one without a port
            clock.offset += timedelta(seconds=config.modem.status_interval_s)
            daemon.wake()
            poll_until(lambda n=reads: daemon.status_reads >= n, what="the next reading")
            assert daemon.modem_status["present"] is False
        assert "No such file" in daemon.modem_status["error"]


def test_a_garbled_signal_answer_at_start_is_reported_not_a_crash(make_config, modem):
    modem.set(garbled={"AT+CSQ": "+CSQ: --,99"})
    _, config = make_config(modem={"port": modem.port}, fallback={"duty_numbers": DUTY[:1]})
    with in_process(FallbackDaemon(config)) as daemon:
        poll_until(lambda: daemon.status_reads >= 1, what="the modem's first reading")
        assert "AT+CSQ" in daemon.modem_status["error"]


def test_a_daemon_killed_after_the_first_of_two_numbers_sends_only_to_the_second_after_restart(
        make_config, daemons, listener, modem):
    path, config = sms_config(make_config, modem)
    daemons("button", path)  # no uplink: the SMS goes at once
    # systemd's watchdog is on; half its timeout (the ordinary pings) is far away.
    fallback = daemons("fallback", path, extra_env={"WATCHDOG_USEC": str(3600 * 10**6)})
    modem.set(dead_after_messages=1)  # the module hangs after the first SMS: so does the daemon
    alarm = press(config)

    def stuck_on_the_second_number() -> bool:
        listener.receive()  # read the notify socket as systemd does, or the pings block
        return len(modem.messages()) == 1 and modem.parts_begun() == len(modem.sent) + 1

    poll_until(stuck_on_the_second_number, what="the daemon to start on the second number")
    assert [number for number, _ in modem.messages()] == DUTY[:1]
    # Long waits on the modem are not silence: the daemon pinged after each exchange.
    listener.receive()
    assert listener.seen[fallback.pid].count("WATCHDOG=1") > 1
    fallback.kill()  # the watchdog's SIGKILL (or systemd's, at stop)

    modem.set(dead=False)
    daemons("fallback", path)
    with Outbox(config.storage.database, config.identity) as outbox:
        row = poll_until(lambda: (n := notification(outbox, alarm["id"]))
                         and n["state"] == "sent" and n, what="the SMS path to finish")
        assert sorted(number for number, _ in modem.messages()) == sorted(DUTY)  # once each
        assert row["attempts"] == 2
        [notice] = [json.loads(p)["detail"] for (p,) in outbox.db.execute(
            "SELECT payload FROM events WHERE kind = 'fallback'")]
        assert notice["event_ids"] == [alarm["id"]]  # the platform hears of both SMS
        assert {n: r["state"] for n, r in notice["recipients"].items()} == dict.fromkeys(
            DUTY, "sent")


class SteppedClock(StoppedClock):
    """A wall clock that NTP steps by hours, beside a monotonic clock that never jumps."""

    def step(self, hours: float) -> None:
        self.now += timedelta(hours=hours)

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.mono += seconds


@contextlib.contextmanager
def uplink_says_connected(config):
    """A connected uplink as the fallback daemon sees it: its link-state file, rewritten
    every half second by its loop (here, by a thread of the test)."""
    stop = threading.Event()

    def keep_saying() -> None:
        link = LinkStateFile(config.storage.runtime_dir)
        while not stop.is_set():
            link.update(True)
            stop.wait(0.1)

    saying = threading.Thread(target=keep_saying, daemon=True)
    saying.start()
    try:
        yield
    finally:
        stop.set()
        saying.join(5)


def test_the_sms_timer_runs_on_the_monotonic_clock_whatever_ntp_does_to_the_wall_clock(
        make_config, daemons, modem):
    """At boot a Pi's clock jumps by hours when NTP first syncs: the alarm's wait for the
    platform's acknowledgement must neither end at the jump nor grow by it."""
    path, config = make_config(modem={"port": modem.port},
                               fallback={"duty_numbers": DUTY[:1], "ack_timeout_s": 60})
    daemons("button", path)
    clock = SteppedClock()
    with in_process(on_clock(config, clock)) as fallback, uplink_says_connected(config), \
            Outbox(config.storage.database, config.identity) as outbox:

        def connected_uplink_looks_again() -> None:
            """The uplink stays connected (and never acknowledges); the fallback makes one
            full pass of decisions."""
            passes = fallback.passes
            fallback.wake()
            poll_until(lambda: fallback.passes >= passes + 2, what="a pass of the fallback")

        connected_uplink_looks_again()
        alarm = press(config)
        poll_until(lambda: notification(outbox, alarm["id"]), what="the watch to start")
        for step_hours, elapsed_s in ((+5, 10), (-8, 20), (+3, 29.5)):
            clock.step(step_hours)
            clock.advance(elapsed_s)  # 59.5 s in all: not yet due
            connected_uplink_looks_again()
            assert notification(outbox, alarm["id"])["state"] == "watching"
            assert modem.sent == []
        clock.advance(0.5)  # 60 s of monotonic time since the alarm
        connected_uplink_looks_again()
        assert modem.wait_for_messages(1)[0][0] == DUTY[0]
        row = poll_until(lambda: (n := notification(outbox, alarm["id"]))
                         and n["state"] == "sent" and n)
        assert row["reason"] == "no acknowledgement within 60 s"
