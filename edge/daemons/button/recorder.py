"""The recorder: every accepted press committed durably, in order, until it sticks.

One thread, with its own outbox connection. An alarm goes through the latch
(:mod:`.latch`): a new alarm, or a repeat of the latched one; a test press (the relay's,
the installer's) is a test event and never latches. Each commit waits for the outbox's
write lock only for a bounded time: a commit that times out, or that the disk refuses,
is a failed commit, tried again with growing pauses (up to a second) for as long as it
takes. Meanwhile the press is counted as unrecorded (``guardpost status``) and the LED
shows the fault.

Group commit: a press that finds the recorder idle is committed alone, at once; presses
that arrive while a commit is under way (several inputs, a storm of taps) are committed
together by the next one, in order, with one write to disk for all of them. The disk's
flush, not the number of presses, sets the pace.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from drivers.gpio import PressReport
from edge.config import Config
from edge.contract.events import Event, EventDraft, EventKind, utc_iso
from edge.daemons.button.latch import AlarmLatch, LatchBatch
from edge.daemons.button.windows import TestSpec, Waiter
from edge.runtime.clock import boot_id
from edge.store.outbox import ALARM_COMMIT_TIMEOUT_S, Outbox

log = logging.getLogger(__name__)

FIRST_RETRY_S = 0.05
LAST_RETRY_S = 1.0
STOP_WAIT_S = 10.0
OPEN_WAIT_S = 30.0
GROUP_MAX = 64  # presses committed in one transaction at most


@dataclass(frozen=True)
class AcceptedPress:
    """A press the input filter accepted, on its way to the outbox."""

    report: PressReport
    occurred_at: datetime
    test: TestSpec | None = None  # a test press, not an alarm
    waiter: Waiter | None = None  # told the outcome of this press alone (not by input)


_STOP = object()


class Recorder:
    """Commits :class:`AcceptedPress` items; ``recorded(press, event)`` runs after each."""

    def __init__(self, config: Config, recorded: Callable[[AcceptedPress, Event], None],
                 failing: Callable[[], None]):
        self.config = config
        self._recorded = recorded
        self._failing = failing            # the LED: a commit failed
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._count_lock = threading.Lock()
        self._unrecorded = 0               # submitted, not yet durable
        self.commit_started: float | None = None  # monotonic; set while a commit runs
        self.failing_since: float | None = None   # monotonic; the last commit failed
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._opened = threading.Event()
        self._open_error: BaseException | None = None

    @property
    def unrecorded(self) -> int:
        """Accepted presses not yet on disk: waiting, being committed, or being retried."""
        return self._unrecorded

    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        """Start the thread and wait until its outbox connection is open: the daemon
        must not say it is ready before a press can be recorded."""
        self._thread.start()
        if not self._opened.wait(OPEN_WAIT_S):
            raise RuntimeError(f"the recorder could not open the outbox in {OPEN_WAIT_S:g} s")
        if self._open_error is not None:
            raise RuntimeError(f"the recorder cannot open the outbox: {self._open_error}")

    def submit(self, press: AcceptedPress) -> None:
        with self._count_lock:
            self._unrecorded += 1
        self._queue.put(press)

    def stop(self) -> None:
        """Commit what was accepted before, then end (the inputs are closed first)."""
        self._queue.put(_STOP)
        self._thread.join(STOP_WAIT_S)
        if self._thread.is_alive():
            log.critical("recorder did not finish; %d press(es) may not be recorded",
                         self._unrecorded)

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        cfg = self.config
        backlog: collections.deque[AcceptedPress] = collections.deque()
        stopping, pause, group_max = False, FIRST_RETRY_S, GROUP_MAX
        try:
            opened = Outbox(cfg.storage.database, cfg.identity, checkpoint=False)
        except BaseException as err:
            self._open_error = err
            raise
        finally:
            self._opened.set()
        with opened as outbox:
            latch = AlarmLatch(outbox, cfg.inputs)
            while not (stopping and not backlog):
                try:
                    item = self._queue.get(timeout=pause if backlog else None)
                except queue.Empty:
                    item = None
                while item is not None:  # and whatever else is waiting already
                    if item is _STOP:
                        stopping = True
                    else:
                        backlog.append(item)
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        item = None
                while backlog:
                    group = [backlog[i] for i in range(min(group_max, len(backlog)))]
                    try:
                        events = self._commit(outbox, latch, group)
                    except Exception:
                        log.critical("could not record a press of %s (%d waiting); retrying",
                                     group[0].report.input, len(backlog), exc_info=True)
                        self.failing_since = self.failing_since or time.monotonic()
                        self._failing()
                        if stopping:
                            self._give_up(backlog)
                            return
                        pause, group_max = min(LAST_RETRY_S, pause * 2), 1
                        break
                    pause, group_max, self.failing_since = FIRST_RETRY_S, GROUP_MAX, None
                    for press, event in zip(group, events, strict=True):
                        backlog.popleft()
                        with self._count_lock:
                            self._unrecorded -= 1
                        try:
                            self._recorded(press, event)
                        except Exception:  # feedback failing must not stop the recording
                            log.exception("feedback for %s failed", event.id)

    def _commit(self, outbox: Outbox, latch: AlarmLatch,
                group: list[AcceptedPress]) -> list[Event]:
        """One transaction for the group: all of it on disk when this returns, or none."""
        self.commit_started = time.monotonic()
        try:
            with outbox.transaction(ALARM_COMMIT_TIMEOUT_S):
                batch = latch.batch()
                events = [Event(event_id, seq, self._draft(batch, press, event_id))
                          for press, (seq, event_id) in zip(
                              group, outbox.reserve_events(len(group)), strict=True)]
                outbox.insert_events(events)
                batch.write()
                return events
        finally:
            self.commit_started = None

    @staticmethod
    def _draft(batch: LatchBatch, press: AcceptedPress, event_id: str) -> EventDraft:
        if press.test is not None:
            # A test (601/602) through the real wiring: never an alarm, never latches.
            return EventDraft(
                kind=EventKind.TEST, code=press.test.code, occurred_at=press.occurred_at,
                clock_synced=batch.clock_synced, boot_id=boot_id(),
                input=press.report.input, detail=press.test.detail)
        return batch.alarm(press.report.input, press.occurred_at, press.report.duration,
                           event_id)

    @staticmethod
    def _give_up(backlog) -> None:
        # The process is ending and the disk refuses: all that is left is to put each
        # press in the journal for a person.
        for lost in backlog:
            log.critical("NOT RECORDED: press of %s at %s", lost.report.input,
                         utc_iso(lost.occurred_at))
