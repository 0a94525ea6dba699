"""The end-to-end alarm test: the real alarm path, exercised and timed.

A test is requested (by the schedule, by ``guardpost test-alarm``, or by the platform's
``cmd/test``), recorded in the outbox's ``alarm_tests`` table, and run:

    test relay pulse (button daemon) -> the real input sees a press -> test event
      (601 manual / 602 periodic) committed -> uplink -> broker PUBACK -> platform ack

Each stage's time is taken from the outbox, where every daemon records it, so the figures
are those of the real path. Without a test relay the event is committed here instead
("software"), and labelled as not covering the wiring. The result is stored, published as
a ``test-result`` event, and a failed test raises a fault (Contact ID 307, check
``alarm-test``) that the next passing test restores.

Only one test runs at a time on a device (a lock file in the runtime directory), whoever
started it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from edge.config import Config
from edge.contract.events import (
    ContactId,
    EventDraft,
    EventKind,
    Qualifier,
    utc_iso,
    utc_now,
    uuid7,
)
from edge.runtime.clock import boot_id, clock_synchronised, wall_ns
from edge.runtime.control import ControlUnavailable
from edge.runtime.control import request as control_request
from edge.runtime.wake import wake
from edge.store.alarm_tests import TestResult
from edge.store.outbox import Outbox
from edge.store.rows import EventRow

log = logging.getLogger(__name__)

STAGES = ("edge", "committed", "sent", "acknowledged")
TRIGGERS = ("schedule", "manual", "platform")
CHECK_NAME = "alarm-test"
POLL_S = 0.05       # how often a running test looks at its event's row
BUTTON_SLACK_S = 15  # the button daemon's answer: the pulse, then recording
# A test cut short by its process stopping (an upgrade, a power cut) runs again; cut
# short this often, it counts as failed: something stops the device whenever it tests.
MAX_INTERRUPTIONS = 3

Progress = Callable[[str, dict], None]


class TestBusy(Exception):
    """Another alarm test is running on this device."""


@dataclass
class TestOutcome:
    test_id: str
    passed: bool
    method: str
    trigger: str
    code: int
    failed_stage: str | None = None
    reason: str | None = None
    event_id: str | None = None
    times: dict[str, str | None] = field(default_factory=dict)   # stage -> UTC time
    stages_ms: dict[str, float | None] = field(default_factory=dict)
    cut_short: bool = False  # stopped while waiting for a stage, not failed by it

    def as_dict(self) -> dict:
        return {"test_id": self.test_id, "result": "passed" if self.passed else "failed",
                "method": self.method, "trigger": self.trigger, "code": self.code,
                "covers_wiring": self.method == "relay", "failed_stage": self.failed_stage,
                "reason": self.reason, "event_id": self.event_id, "times": self.times,
                "stages_ms": self.stages_ms}


def code_for(trigger: str) -> ContactId:
    """602 periodic for the schedule; a person asked for the others (601 manual)."""
    return ContactId.PERIODIC_TEST if trigger == "schedule" else ContactId.MANUAL_TEST


def request_test(outbox: Outbox, trigger: str, *, scheduled_for: datetime | None = None,
                 request: dict | None = None, at: datetime | None = None) -> str | None:
    """Record that a test is wanted; returns its id, or None if that schedule slot
    already has its test (a slot runs once, across restarts)."""
    if trigger not in TRIGGERS:
        raise ValueError(f"trigger must be one of {TRIGGERS}")
    test_id = str(uuid7(wall_ns()))
    inserted = outbox.alarm_tests.request(test_id, trigger, int(code_for(trigger)),
                                          requested_at=at or utc_now(),
                                          scheduled_for=scheduled_for, request=request)
    return test_id if inserted else None


def requested_tests(outbox: Outbox, triggers: tuple[str, ...] = TRIGGERS) -> list[str]:
    """Tests waiting to run, oldest first, of these triggers."""
    return outbox.alarm_tests.requested(triggers)


def latest_test(outbox: Outbox) -> dict | None:
    """The last finished alarm test, whoever ran it (the schedule, a person, the platform)."""
    r = outbox.alarm_tests.latest_finished()
    if r is None:
        return None
    return {"test_id": r.id, "result": r.state, "method": r.method, "trigger": r.trigger,
            "code": r.code, "covers_wiring": r.method == "relay",
            "failed_stage": r.failed_stage, "reason": r.reason, "event_id": r.event_id,
            "at": r.finished_at,
            "stages_ms": {"edge_to_commit": r.edge_to_commit_ms,
                          "commit_to_sent": r.commit_to_sent_ms,
                          "sent_to_ack": r.sent_to_ack_ms, "total": r.total_ms}}


def _ms(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    delta = datetime.fromisoformat(end) - datetime.fromisoformat(start)
    return round(delta.total_seconds() * 1000, 3)


def stage_times(row: EventRow) -> tuple[dict[str, str | None], dict[str, float | None]]:
    """The stage times of an event's outbox row, and the latency of each step."""
    # The acknowledgement as this device received it: one clock for every stage.
    times = {"edge": row.occurred_at, "committed": row.committed_at, "sent": row.sent_at,
             "acknowledged": row.ack_received_at or row.acknowledged_at}
    stages_ms = {
        "edge_to_commit": _ms(times["edge"], times["committed"]),
        "commit_to_sent": _ms(times["committed"], times["sent"]),
        "sent_to_ack": _ms(times["sent"], times["acknowledged"]),
        "total": _ms(times["edge"], times["acknowledged"]),
    }
    return times, stages_ms


def follow_event(outbox: Outbox, event_id: str, timeout: float,
                 progress: Progress | None = None, stop: threading.Event | None = None,
                 tick: Callable[[], None] | None = None) -> EventRow:
    """Watch an event's row until the platform acknowledges it or ``timeout`` passes;
    ``progress(stage, row)`` is called once as each stage appears (the row as a
    dictionary), ``tick()`` at every look (a daemon feeds its watchdog there). Returns
    the row."""
    pause = stop or threading.Event()
    deadline = time.monotonic() + timeout
    told: set[str] = set()
    while True:
        row = outbox.event(event_id)
        for stage, stamp in (("committed", row.committed_at), ("sent", row.sent_at),
                             ("acknowledged", row.acknowledged_at)):
            if stamp and stage not in told:
                told.add(stage)
                if progress:
                    progress(stage, row.as_dict())
        if row.state == "acknowledged" or time.monotonic() >= deadline:
            return row
        if tick:
            tick()
        # The outbox is the meeting point of the daemons; a test is rare and short, so
        # watching its row closely costs nothing worth a new wake-up channel.
        if pause.wait(min(POLL_S, max(0.0, deadline - time.monotonic()))):
            return row


@contextlib.contextmanager
def _test_lock(runtime_dir) -> Iterator[None]:
    runtime_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(runtime_dir / "alarm-test.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o660)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TestBusy("another alarm test is running on this device") from None
        yield
    finally:
        os.close(fd)


class AlarmTestRunner:
    """Runs requested tests; used by the self-test daemon and ``guardpost test-alarm``."""

    def __init__(self, config: Config, outbox: Outbox, *, progress: Progress | None = None,
                 stop: threading.Event | None = None, tick: Callable[[], None] | None = None):
        self.config = config
        self.outbox = outbox
        self.progress = progress or (lambda stage, info: None)
        self.stop = stop or threading.Event()
        self.tick = tick

    def run(self, test_id: str) -> TestOutcome | None:
        """Run one requested test to its end; None if it was not waiting to run."""
        with _test_lock(self.config.storage.runtime_dir):
            method = "relay" if self.config.outputs.test_relay is not None else "software"
            started = self.outbox.alarm_tests.start(test_id, at=utc_now(), method=method,
                                                    input_name=self.config.test_input)
            if started is None:
                return None
            trigger, code = started.trigger, started.code
            outcome = TestOutcome(test_id, passed=False, method=method, trigger=trigger,
                                  code=code)
            self.progress("started", {"test_id": test_id, "method": method,
                                      "trigger": trigger, "code": code})
            try:
                self._exercise(outcome)
            except Exception as err:  # the test fails; the daemon running it goes on
                log.exception("alarm test %s", test_id)
                outcome.failed_stage = outcome.failed_stage or "edge"
                outcome.reason = f"internal error: {err}"
            if outcome.cut_short:
                # Cut short by a stop, not failed: the path was not seen to fail.
                self._interrupted(outcome)
            else:
                self._finish(outcome)
            return outcome

    def recover_interrupted(self) -> int:
        """Tests left "running" by a process that died mid-test (a power cut, a kill):
        run again, or failed once cut short too often. Returns how many were found."""
        try:
            with _test_lock(self.config.storage.runtime_dir):
                rows = self.outbox.alarm_tests.running()
                for row in rows:
                    outcome = TestOutcome(row.id, passed=False, method=row.method,
                                          trigger=row.trigger, code=row.code,
                                          failed_stage="edge",
                                          reason="the process running it stopped",
                                          event_id=row.event_id)
                    self._interrupted(outcome)
                return len(rows)
        except TestBusy:
            return 0  # one is running now: a "running" row is that one

    # -- the stages ------------------------------------------------------------------

    def _exercise(self, outcome: TestOutcome) -> None:
        detail = {"purpose": "alarm-test", "test_id": outcome.test_id,
                  "trigger": outcome.trigger}
        if outcome.method == "relay":
            event_id = self._pulse_relay(outcome, detail)
        elif self.config.alarm_test.software_without_relay:
            event_id = self._inject(outcome, detail)
        else:
            outcome.failed_stage = "edge"
            outcome.reason = "no test relay is configured and software tests are not allowed"
            return
        if event_id is None:
            return
        outcome.event_id = event_id
        self.progress("edge", self.outbox.get_event_row(event_id))
        wake(self.config.storage.runtime_dir, "uplink")
        row = follow_event(self.outbox, event_id, self.config.alarm_test.ack_timeout_s,
                           self.progress, self.stop, self.tick)
        outcome.times, outcome.stages_ms = stage_times(row)
        missing = next((s for s in STAGES if not outcome.times[s]), None)
        if missing is None:
            outcome.passed = True
        elif self.stop.is_set():
            outcome.cut_short = True
            outcome.failed_stage = missing
            outcome.reason = f"stopped while waiting for the event to be {missing}"
        else:
            outcome.failed_stage = missing
            outcome.reason = {
                "sent": "the test event did not reach the broker within "
                        f"{self.config.alarm_test.ack_timeout_s:g} s (uplink or network down)",
                "acknowledged": "the platform did not acknowledge the test within "
                                f"{self.config.alarm_test.ack_timeout_s:g} s",
            }.get(missing, f"stage {missing} not reached")

    def _pulse_relay(self, outcome: TestOutcome, detail: dict) -> str | None:
        cfg = self.config
        timeout = cfg.outputs.test_relay.pulse_ms / 1000 + BUTTON_SLACK_S
        try:
            answer = control_request(cfg.storage.runtime_dir / "button.ctl",
                                     {"op": "relay-test", "code": outcome.code,
                                      "detail": detail}, timeout=timeout)
        except (ControlUnavailable, OSError) as err:
            outcome.failed_stage = "edge"
            outcome.reason = f"the button daemon is not answering ({err})"
            return None
        if not answer.get("ok"):
            outcome.failed_stage = answer.get("stage", "edge")
            outcome.reason = answer.get("error", "the button daemon refused the test")
            if answer.get("event"):
                outcome.event_id = answer["event"]["id"]
            if answer.get("alarm"):
                outcome.reason += f" (alarm {answer['alarm']['id']})"
            return None
        return answer["event"]["id"]

    def _inject(self, outcome: TestOutcome, detail: dict) -> str:
        event = self.outbox.commit_event(EventDraft(
            kind=EventKind.TEST, code=ContactId(outcome.code), occurred_at=utc_now(),
            clock_synced=clock_synchronised(), boot_id=boot_id(),
            detail={**detail, "method": "software", "covers_wiring": False}))
        return event.id

    # -- the record ------------------------------------------------------------------

    def _interrupted(self, outcome: TestOutcome) -> None:
        """A test that did not run to its end: a person's is cancelled (they stopped it);
        the schedule's and the platform's run again, up to MAX_INTERRUPTIONS times."""
        if outcome.trigger == "manual":
            self.outbox.alarm_tests.end_without_result(
                outcome.test_id, "cancelled", at=utc_now(), reason="stopped before its end")
            log.info("alarm test %s cancelled before its end", outcome.test_id)
            return
        count = self.outbox.alarm_tests.interrupted(outcome.test_id, MAX_INTERRUPTIONS)
        if count < MAX_INTERRUPTIONS:
            log.warning("alarm test %s was cut short (%d time(s)): it will run again",
                        outcome.test_id, count)
            return
        outcome.failed_stage = outcome.failed_stage or "edge"
        outcome.reason = (f"cut short {count} times ({outcome.reason}): the device stops "
                          "whenever it tests")
        self._finish(outcome)

    def _finish(self, outcome: TestOutcome) -> None:
        """Store the result, publish it, and raise or restore the alarm-test fault."""
        t, ms = outcome.times, outcome.stages_ms
        detail = {"test_id": outcome.test_id, "event_id": outcome.event_id,
                  "result": "passed" if outcome.passed else "failed",
                  "trigger": outcome.trigger, "method": outcome.method,
                  "covers_wiring": outcome.method == "relay", "stages_ms": ms}
        if not outcome.passed:
            detail.update(failed_stage=outcome.failed_stage, reason=outcome.reason)
        tests = self.outbox.alarm_tests
        with self.outbox.transaction():
            previous = tests.latest_finished()
            result = self.outbox.append(self._draft(EventKind.TEST_RESULT, outcome.code,
                                                    detail))
            tests.record_result(outcome.test_id, TestResult(
                state="passed" if outcome.passed else "failed", finished_at=utc_iso(utc_now()),
                failed_stage=outcome.failed_stage, reason=outcome.reason,
                event_id=outcome.event_id, times=t, stages_ms=ms, result_event_id=result.id))
            was_failing = previous is not None and previous.state == "failed"
            if outcome.passed == was_failing:  # a change: fault on failure, restore on pass
                self.outbox.append(self._draft(
                    EventKind.RESTORE if outcome.passed else EventKind.FAULT,
                    ContactId.SELF_TEST_FAILURE,
                    {"check": CHECK_NAME, "test_id": outcome.test_id,
                     **({} if outcome.passed else {"failed_stage": outcome.failed_stage,
                                                    "reason": outcome.reason})}))
        wake(self.config.storage.runtime_dir, "uplink")
        if outcome.passed:
            log.info("alarm test %s passed: %s", outcome.test_id, ms)
        else:
            log.warning("alarm test %s FAILED at %s: %s", outcome.test_id,
                        outcome.failed_stage, outcome.reason)
        self.progress("finished", outcome.as_dict())

    def _draft(self, kind: EventKind, code: int, detail: dict) -> EventDraft:
        return EventDraft(kind=kind, code=code, occurred_at=utc_now(),
                          clock_synced=clock_synchronised(), boot_id=boot_id(),
                          input=self.config.test_input,
                          qualifier=Qualifier.RESTORE if kind == EventKind.RESTORE
                          else Qualifier.NEW, detail=detail)
