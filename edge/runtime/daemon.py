"""The skeleton every Guardpost daemon runs on: start-up, watchdog, stop, timers, state.

A daemon is a subclass of :class:`Daemon` that says what it opens (:meth:`Daemon.start`),
what it does when woken or when a timer is due, and what it reports. The skeleton does
the rest the same way for all five:

- one copy per device (a lock file in the runtime directory), and a wake-up socket that
  other processes nudge (:mod:`edge.runtime.wake`);
- ``READY=1`` only after :meth:`Daemon.start` has opened everything the daemon needs,
  ``STOPPING=1`` when it stops, and everything opened closed in reverse order;
- systemd's watchdog fed from the main loop itself, so a loop that is stuck stops
  feeding it (and no wait in the loop is longer than half the watchdog's timeout);
- periodic work on the monotonic clock (:meth:`Daemon.every`): a wall clock stepped by
  NTP at boot never moves a timer;
- the daemon's state for ``guardpost status`` saved in the outbox, a failure to save it
  logged and never fatal;
- a bounded wait that runs out in the loop's work (the outbox's write lock held too long
  by another writer: :class:`edge.store.lock.LockTimeout` is a ``TimeoutError``), and a
  write the disk refused (:class:`edge.store.trouble.DiskFull`, also a ``TimeoutError``),
  tried again at its next turn instead of stopping the daemon;
- a damaged outbox met by a read: moved aside and a new one opened
  (:meth:`edge.store.outbox.Outbox.repair`), and the loop goes on; a new outbox put in
  place by another daemon is followed at the next turn.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from edge.config import Config
from edge.runtime.instance import only_instance
from edge.runtime.sdnotify import Watchdog, notify
from edge.runtime.wake import Waker
from edge.store.outbox import LOOP_WRITE_TIMEOUT_S, Outbox
from edge.store.trouble import Trouble, classify

log = logging.getLogger(__name__)

IDLE_WAIT_S = 3600.0  # the longest the loop sleeps when nothing is scheduled
STATE_WRITE_TIMEOUT_S = 0.5  # the loop waits no longer for the outbox to take its state


@dataclass
class Timer:
    """Work done every ``interval`` seconds of the monotonic clock."""

    interval: float
    action: Callable[[], None]
    due: float

    def run_if_due(self, now: float) -> None:
        if now >= self.due:
            # From now, not from the old due time: a loop held up for a while runs the
            # work once, not once for every interval it missed.
            self.due = now + self.interval
            self.action()


class Daemon:
    """Base of the daemons; see the module docstring for what it does for them."""

    name: ClassVar[str]
    # Records or delivers alarms: may write from the alarm reserve on a full disk.
    alarm_path: ClassVar[bool] = False

    def __init__(self, config: Config):
        self.config = config
        self.identity = config.identity
        self.ready = threading.Event()  # set with READY=1, for in-process users (tests)
        self.stop_event = threading.Event()
        self.waker: Waker | None = None
        self.watchdog = Watchdog()
        self.monotonic: Callable[[], float] = time.monotonic  # tests may travel in time
        self._loop_timers: list[Timer] = []
        self._outboxes: list[Outbox] = []

    # -- what a daemon provides ----------------------------------------------------------

    def start(self, stack: contextlib.ExitStack) -> str:
        """Open what the daemon needs, registering each closer on ``stack``; return the
        one-line status systemd shows. Raise to refuse to start."""
        raise NotImplementedError

    def woken(self) -> None:
        """Another process (or :meth:`wake`) asked this daemon to look again."""

    def step(self) -> int | None:
        """Called at every turn of the loop, before it waits; return an exit code to stop
        the daemon with it."""
        return None

    def next_wakeup(self) -> float | None:
        """Seconds until the daemon has work the timers do not know of (None: none)."""
        return None

    def wait(self, timeout: float) -> bool:
        """Wait for a wake-up (True) or ``timeout`` seconds; the uplink also waits for
        its network socket here."""
        return self.waker.wait(timeout)

    def state(self) -> dict:
        """What ``guardpost status`` shows of this daemon."""
        return {"daemon": self.name}

    def stopping(self) -> None:
        """The loop has ended; the resources of :meth:`start` are still open."""

    # -- what the skeleton provides --------------------------------------------------------

    def every(self, seconds: float, action: Callable[[], None], *,
              first_in: float | None = None) -> Timer:
        """Run ``action`` every ``seconds`` (first after ``first_in``, default one interval)."""
        timer = Timer(seconds, action,
                      self.monotonic() + (seconds if first_in is None else first_in))
        self._loop_timers.append(timer)
        return timer

    def open_outbox(self, stack: contextlib.ExitStack, *, checkpoint: bool = True) -> Outbox:
        """The main loop's own outbox connection, closed with the daemon. Its writes wait
        for the lock LOOP_WRITE_TIMEOUT_S at most: a longer wait would hold up the
        watchdog and the wake-ups; one that runs out is tried again at the next turn."""
        outbox = stack.enter_context(Outbox(self.config.storage.database, self.identity,
                                            checkpoint=checkpoint,
                                            write_timeout=LOOP_WRITE_TIMEOUT_S,
                                            alarm_path=self.alarm_path))
        self._outboxes.append(outbox)
        return outbox

    def wake(self) -> None:
        if self.waker is not None:
            self.waker.wake()

    def save_state(self, outbox, state: dict | None = None) -> None:
        """Record ``state`` (default :meth:`state`) in the outbox for ``guardpost status``;
        never fatal."""
        try:
            body = json.dumps(self.state() if state is None else state, ensure_ascii=False,
                              default=str)
            outbox.daemons.save(self.name, body, timeout=STATE_WRITE_TIMEOUT_S)
        except Exception as err:
            log.warning("could not record the %s daemon's state: %s", self.name, err)

    def run(self, stop: threading.Event) -> int:
        """Run until ``stop`` is set (or :meth:`step` returns an exit code)."""
        self.stop_event = stop
        cfg = self.config
        code = 0
        with contextlib.ExitStack() as stack:
            stack.enter_context(only_instance(cfg.storage.runtime_dir, self.name))
            self.waker = stack.enter_context(contextlib.closing(
                Waker(cfg.storage.runtime_dir, self.name)))
            status = self.start(stack)
            self.ready.set()
            notify("READY=1", f"STATUS={status}")
            while not stop.is_set():
                self.watchdog.ping()
                for outbox in self._outboxes:
                    self._bounded(outbox.follow)
                now = self.monotonic()
                for timer in self._loop_timers:
                    self._bounded(timer.run_if_due, now)
                code = self._bounded(self.step)
                if code is not None or stop.is_set():
                    break
                if self.wait(self._wait_budget()):
                    self._bounded(self.woken)
            notify("STOPPING=1")
            self.stopping()
        return code or 0

    def _bounded(self, work, *args):
        """Run loop work; a bounded wait that ran out (the outbox's write lock held by
        another writer for longer than this work may wait) is tried again at its next
        turn, not a crash. Anything else is a bug, and stops the daemon."""
        try:
            return work(*args)
        except TimeoutError as err:
            log.warning("%s: %s; trying again", self.name, err)
            return None
        except sqlite3.DatabaseError as err:
            if not self._outboxes or classify(err, self._outboxes[0].path.parent) \
                    is not Trouble.DAMAGED:
                raise
            log.critical("%s: the outbox is damaged (%s); moving it aside", self.name, err)
            self._outboxes[0].repair(str(err))
            return None

    def _wait_budget(self) -> float:
        """Until the next timer, and never past half the watchdog's timeout."""
        now = self.monotonic()
        budget = min((t.due - now for t in self._loop_timers), default=IDLE_WAIT_S)
        extra = self.next_wakeup()
        if extra is not None:
            budget = min(budget, extra)
        if self.watchdog.interval is not None:
            budget = min(budget, self.watchdog.interval)
        return max(0.0, budget)
