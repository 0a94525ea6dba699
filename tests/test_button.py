"""The button daemon's own promises: every press decided, and test windows that can never
turn an alarm into a test or a test into a false alarm. In-process daemons on gpiozero's
MockFactory (or a lagging variant of its pins), real outbox files."""

from __future__ import annotations

import fcntl
import os
import threading

import pytest
from gpiozero.pins.mock import MockFactory

from drivers.gpio import press_filter
from drivers.gpio.sim import LaggingPin
from edge.daemons.button.daemon import ButtonDaemon
from edge.runtime.control import request
from tests.support.daemons import in_process, poll_until

RELAY = {"test_relay": {"pin": 5}}


def kinds(outbox) -> list[tuple[str, int]]:
    return [tuple(row) for row in outbox.db.execute("SELECT kind, code FROM events ORDER BY seq")]


def in_thread(function, *args) -> tuple[threading.Thread, list]:
    """Run a blocking control request on a thread; its answer lands in the list."""
    answer: list = []
    thread = threading.Thread(target=lambda: answer.append(function(*args)), daemon=True)
    thread.start()
    return thread, answer


def test_every_press_in_a_fast_series_is_decided(make_config):
    """Issue 11, class 13: of 1,500 presses of 20 ms, each released just past the bounce
    time, 2 were neither accepted nor rejected (the worker read the pin closed again
    before the next press's edge reached it, and took it for bounce). Every press of such
    a series must get its answer, and be an alarm or a repeat of it."""
    presses = int(os.environ.get("GUARDPOST_SOAK_PRESSES", "500"))
    _, config = make_config(inputs={"gate": {"pin": 17, "min_press_ms": 10}})
    button = ButtonDaemon(config)
    with in_process(button):
        for number in range(presses):
            reply = button._sim_press({"input": "gate", "hold": 0.02})
            assert reply.get("ok") and reply.get("accepted"), f"press {number}: {reply}"
        assert button.recorder.unrecorded == 0


def test_a_test_press_decided_long_after_the_pulse_is_still_the_test(make_config,
                                                                     open_outbox,
                                                                     monkeypatch):
    """The input worker lags past the relay pulse and past the test's own patience (the
    pin driver's thread under load: here, edges delivered 5 s late, and a press filter
    told to wait that long for them). The press the pulse caused began in the test's
    window, so it is recorded as that test when it is decided: never an alarm, a false
    call to the police."""

    class FiveSecondsLate(LaggingPin):
        lag = 5.0

    monkeypatch.setattr(press_filter, "EDGE_GRACE_S", 10.0)
    _, config = make_config(outputs=RELAY)
    outbox = open_outbox(config)
    factory = MockFactory(pin_class=FiveSecondsLate)
    with in_process(ButtonDaemon(config, pin_factory=factory)) as button:
        answer = request(config.storage.runtime_dir / "button.ctl",
                         {"op": "relay-test", "code": 602}, timeout=30)
        assert not answer["ok"] and answer["stage"] == "edge"
        assert "did not see the relay pulse" in answer["error"]
        poll_until(lambda: kinds(outbox), timeout=30, what="the late test press")
        assert kinds(outbox) == [("test", 602)]
        assert button._latched_inputs() == set()


def test_the_installers_press_is_a_test_only_on_the_input_it_names(make_config, open_outbox):
    """`guardpost doctor` asks for a press of one input: a press on another input in the
    meantime is a real alarm, not the installer's test."""
    inputs = {"gate": {"pin": 17}, "desk": {"pin": 27}}
    _, config = make_config(inputs=inputs)
    outbox = open_outbox(config)
    control = config.storage.runtime_dir / "button.ctl"
    with in_process(ButtonDaemon(config)) as button:
        asking, answer = in_thread(request, control,
                                   {"op": "test-press", "input": "gate", "timeout": 30}, 40)
        poll_until(lambda: button.windows.busy() == {"gate": "commissioning"},
                   what="the window to open")
        assert button._sim_press({"input": "desk", "hold": 0.05})["event"]["kind"] == "alarm"
        assert button._sim_press({"input": "gate", "hold": 0.05})["event"]["kind"] == "test"
        asking.join(30)
        assert answer[0]["ok"] and answer[0]["input"] == "gate"
        assert kinds(outbox) == [("alarm", 120), ("test", 601)]
        assert button.windows.busy() == {}


def test_one_input_has_one_test_window_at_a_time(make_config):
    """A relay test cannot start while the installer's window is open on its input (two
    owners could each take the other's press for theirs)."""
    _, config = make_config(outputs=RELAY)
    control = config.storage.runtime_dir / "button.ctl"
    with in_process(ButtonDaemon(config)) as button:
        asking, answer = in_thread(request, control,
                                   {"op": "test-press", "input": "gate", "timeout": 30}, 40)
        poll_until(lambda: button.windows.busy(), what="the window to open")
        refused = request(control, {"op": "relay-test", "code": 601})
        assert not refused["ok"] and "already under a test (commissioning)" in refused["error"]
        assert button._sim_press({"input": "gate", "hold": 0.05})["event"]["kind"] == "test"
        asking.join(30)
        assert answer[0]["ok"]


def test_a_press_waiting_for_the_disk_is_counted_and_the_watchdog_still_fed(
        make_config, daemons, listener):
    """Another writer holds the outbox's write lock (a prune, a hung process). A press is
    then only in the button daemon's memory: `guardpost status` must say so, and the
    daemon must keep feeding systemd's watchdog (a restart now would lose the press)."""
    path, config = make_config()
    button = daemons("button", path, extra_env={"WATCHDOG_USEC": "2000000"})
    control = config.storage.runtime_dir / "button.ctl"
    with open(f"{config.storage.database}.writelock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _, pressed = in_thread(request, control,
                                   {"op": "press", "input": "gate", "hold": 0.05}, 30)
            poll_until(lambda: request(control, {"op": "status"})["unrecorded_presses"] == 1,
                       what="the press to be counted as unrecorded")
            listener.receive()
            pings = listener.seen.get(button.pid, []).count("WATCHDOG=1")

            def fed_again(notify) -> bool:
                return notify.seen.get(button.pid, []).count("WATCHDOG=1") >= pings + 3
            assert listener.wait_until(fed_again, 15), "the watchdog was not fed meanwhile"
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    poll_until(lambda: pressed, what="the press to be recorded")
    assert pressed[0]["ok"] and pressed[0]["event"]["kind"] == "alarm"
    assert request(control, {"op": "status"})["unrecorded_presses"] == 0


@pytest.mark.slow
def test_every_press_of_a_long_series_is_decided(make_config, monkeypatch):
    monkeypatch.setenv("GUARDPOST_SOAK_PRESSES", "3000")
    test_every_press_in_a_fast_series_is_decided(make_config)
