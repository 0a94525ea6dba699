"""The recorder: every accepted press committed durably, in order, until it sticks.

One thread, with its own outbox connection. An alarm goes through the latch
(:mod:`.latch`): a new alarm, or a repeat of the latched one; a test press (the relay's,
the installer's) is a test event and never latches. Each commit waits for the outbox's
write lock only for a bounded time: a commit that times out, or that the disk refuses,
is a failed commit, tried again with growing pauses (up to a second) for as long as it
takes. Meanwhile the press is counted as unrecorded (``guardpost status``) and the LED
shows the fault.

A full disk does not stop it: the recorder's connection draws on the alarm reserve
(:mod:`edge.store.reserve`) and tries again at once; a damaged outbox is moved aside and
the press goes into the new one. Presses it still holds when the daemon stops are
written to a file allocated ahead (:mod:`.spill`) and committed first at the next start.

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
from edge.contract.events import ContactId, Event, EventDraft, EventKind, utc_iso
from edge.daemons.button.latch import AlarmLatch, LatchBatch
from edge.daemons.button.spill import PressSpill
from edge.daemons.button.windows import TestSpec, Waiter
from edge.runtime.clock import boot_id
from edge.store.outbox import ALARM_COMMIT_TIMEOUT_S, DiskFull, Outbox, OutboxReplaced

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
        self.spill = PressSpill(config.storage.database)

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
            opened = Outbox(cfg.storage.database, cfg.identity, checkpoint=False,
                            alarm_path=True)
        except BaseException as err:
            self._open_error = err
            raise
        finally:
            self._opened.set()
        with opened as outbox:
            latch = AlarmLatch(outbox, cfg.inputs)
            spilled = self._from_spill()
            backlog.extend(spilled)
            with self._count_lock:
                self._unrecorded += len(spilled)
            self.spill.prepare()
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
                    except (DiskFull, OutboxReplaced) as err:
                        if isinstance(err, OutboxReplaced) or err.released:
                            continue  # room was made, or a new file is in place: at once
                        log.critical("could not record a press of %s (%d waiting): %s; "
                                     "retrying", group[0].report.input, len(backlog), err)
                        if self._fail(stopping, backlog):
                            return
                        pause, group_max = min(LAST_RETRY_S, pause * 2), 1
                        break
                    except Exception:
                        log.critical("could not record a press of %s (%d waiting); retrying",
                                     group[0].report.input, len(backlog), exc_info=True)
                        if self._fail(stopping, backlog):
                            return
                        pause, group_max = min(LAST_RETRY_S, pause * 2), 1
                        break
                    pause, group_max, self.failing_since = FIRST_RETRY_S, GROUP_MAX, None
                    if spilled:
                        self.spill.clear()  # committed: they must not come back again
                        spilled = []
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

    def _fail(self, stopping: bool, backlog) -> bool:
        """A commit failed: show it; when stopping, keep the presses for the next start
        (True: the thread is done)."""
        self.failing_since = self.failing_since or time.monotonic()
        self._failing()
        if stopping:
            self._keep_for_next_start(backlog)
        return stopping

    def _keep_for_next_start(self, backlog) -> None:
        # The process is ending and the outbox refuses: the presses go into the file
        # allocated for them, committed first at the next start, and into the journal.
        presses = [{"input": p.report.input, "occurred_at": utc_iso(p.occurred_at),
                    "duration": p.report.duration, "reason": p.report.reason,
                    "test": {"code": int(p.test.code), "detail": dict(p.test.detail)}
                    if p.test else None} for p in backlog]
        try:
            kept = self.spill.write(presses)
        except OSError as err:
            log.critical("could not keep presses for the next start: %s", err)
            kept = 0
        for index, lost in enumerate(backlog):
            log.critical("%s: press of %s at %s", "KEPT FOR THE NEXT START" if index < kept
                         else "NOT RECORDED", lost.report.input, utc_iso(lost.occurred_at))

    def _from_spill(self) -> list[AcceptedPress]:
        """Presses kept at the last stop, to be committed before any new one."""
        presses = []
        for kept in self.spill.take():
            try:
                report = PressReport(kept["input"], True, kept.get("reason", "kept"), 0.0,
                                     float(kept.get("duration", 0.0)), 0.0)
                test = kept.get("test")
                presses.append(AcceptedPress(
                    report, datetime.fromisoformat(kept["occurred_at"]),
                    TestSpec(ContactId(test["code"]), test["detail"]) if test else None))
            except (KeyError, TypeError, ValueError) as err:
                log.error("a press kept at the last stop cannot be read (%s): %r", err, kept)
        if presses:
            log.warning("committing %d press(es) kept at the last stop", len(presses))
        return [p for p in presses if p.report.input in self.config.inputs]
