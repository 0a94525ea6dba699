"""The skeleton every daemon runs on (edge/runtime/daemon.py): start-up, timers on the
monotonic clock, stop, and a failure to save the state that is never fatal."""

from __future__ import annotations

import contextlib
import threading

from edge.runtime.daemon import Daemon
from tests.support.daemons import in_process, poll_until


class Ticking(Daemon):
    """A daemon that counts its timer's runs, on a monotonic clock the test moves."""

    name = "ticking"

    def __init__(self, config):
        super().__init__(config)
        self.now = 100.0
        self.monotonic = lambda: self.now
        self.ticks = 0
        self.turns = 0
        self.closed = threading.Event()

    def start(self, stack: contextlib.ExitStack) -> str:
        stack.callback(self.closed.set)
        self.every(60, self._tick)
        return "ticking"

    def _tick(self) -> None:
        self.ticks += 1

    def step(self) -> int | None:
        self.turns += 1
        if self.turns == 2:
            raise TimeoutError("the outbox's write lock was held for more than 0.5 s")
        return None


def test_timers_follow_the_monotonic_clock_and_run_once_for_a_long_gap(make_config):
    """A timer is due by the monotonic clock alone (NTP stepping the wall clock by hours at
    boot moves nothing); a loop held up for many intervals runs the work once, not once
    for every interval it missed. A bounded wait that ran out (the second turn's) is
    tried again, not the end of the daemon."""
    _, config = make_config()
    daemon = Ticking(config)
    with in_process(daemon):
        for turn in (2, 3):  # the second one's bounded wait runs out
            daemon.wake()
            poll_until(lambda turn=turn: daemon.turns >= turn, what=f"turn {turn}")
        turns = daemon.turns
        daemon.wake()
        poll_until(lambda: daemon.turns > turns, what="a turn of the loop")
        assert daemon.ticks == 0  # not yet due: 60 s of its own clock have not passed
        daemon.now += 60
        daemon.wake()
        poll_until(lambda: daemon.ticks == 1, what="the timer")
        daemon.now += 3600  # an hour in one go
        daemon.wake()
        poll_until(lambda: daemon.ticks == 2, what="the timer again")
        turns = daemon.turns
        daemon.wake()
        poll_until(lambda: daemon.turns > turns, what="another turn")
        assert daemon.ticks == 2
    assert daemon.closed.is_set()  # what start() opened is closed when it stops


def test_a_state_the_outbox_cannot_take_is_logged_not_fatal(make_config, caplog):
    _, config = make_config()

    class FullDisk:
        def save(self, name, state, *, timeout=None):
            raise OSError(28, "No space left on device")

    class Refusing:
        daemons = FullDisk()

    Ticking(config).save_state(Refusing())
    assert "could not record the ticking daemon's state" in caplog.text
