"""The self-test daemon (``guardpost run selftest``): health checks and the alarm test.

- Every ``health.interval_s`` it runs the checks of :mod:`.health`, records them
  (``guardpost status``; the uplink publishes them in the retained ``health``) and raises
  a fault, or a restore, through the hysteresis of :class:`.health.CheckTracker`.
- On the ``alarm_test.schedule`` (cron, in the site's time zone) it requests an
  end-to-end alarm test, and it runs every requested test (the schedule's, and the
  platform's ``cmd/test``, which the uplink records) with :mod:`edge.daemons.selftest.alarmtest`.

A schedule slot is requested once (the outbox keeps a unique row per slot), so a restart
never runs it twice; a slot missed while the device was off, or while its clock was not
yet synchronised (the wall clock is meaningless then), still runs within
``alarm_test.catch_up_hours``. Time comes from an injectable clock, so tests travel
through a month without waiting for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from croniter import croniter

from edge import __version__
from edge.config import Config
from edge.contract.events import ContactId, EventDraft, EventKind, Qualifier, utc_iso, utc_now
from edge.daemons.selftest.alarmtest import (
    AlarmTestRunner,
    TestBusy,
    latest_test,
    request_test,
    requested_tests,
)
from edge.daemons.selftest.health import CheckResult, CheckTracker, HealthChecks
from edge.runtime.clock import boot_id, clock_synchronised
from edge.runtime.daemon import Daemon
from edge.runtime.wake import wake
from edge.store import salvage
from edge.store.outbox import Outbox
from edge.store.reserve import SpaceReserve

log = logging.getLogger(__name__)

MAX_WAIT_S = 30.0   # the loop looks at the clock at least this often
SALVAGE_EVERY_S = 5.0  # how often damaged outboxes moved aside are looked for (a glob)


class AlarmTestSchedule:
    """The cron schedule of the alarm test, in the site's time zone."""

    def __init__(self, expression: str, zone):
        self.expression = expression
        self.zone = zone

    def latest_slot(self, now: datetime) -> datetime:
        """The most recent slot at or before ``now``."""
        local = now.astimezone(self.zone) + timedelta(seconds=1)  # a slot at `now` counts
        return _first_of_fold(croniter(self.expression, local).get_prev(datetime))

    def next_slot(self, now: datetime) -> datetime:
        """The first slot after ``now`` (the second 01:30 of a night when summer time
        ends is the slot already passed, not a new one)."""
        slots = croniter(self.expression, now.astimezone(self.zone))
        while (slot := _first_of_fold(slots.get_next(datetime))) <= now:
            pass
        return slot


def _first_of_fold(slot: datetime) -> datetime:
    """Where summer time ends, 01:30 happens twice and croniter yields both; the slot is
    the wall-clock time, so both mean the first (one test, not two). China has no summer
    time; a device sold elsewhere may."""
    return slot.replace(fold=0)


class SelfTestDaemon(Daemon):
    name = "selftest"

    def __init__(self, config: Config, *, clock: Callable[[], datetime] = utc_now,
                 clock_synced: Callable[[], bool] = clock_synchronised,
                 sys_root: Path = Path("/"), monotonic: Callable[[], float] = time.monotonic):
        super().__init__(config)
        self.clock = clock          # the wall clock: the schedule's slots, timestamps
        self.monotonic = monotonic  # the checks' interval
        self.clock_synced = clock_synced
        self.sys_root = sys_root
        self.schedule = AlarmTestSchedule(config.alarm_test.schedule, config.device.zone)
        self.results: list[CheckResult] = []
        self.runs = 0  # completed check runs, for in-process users (tests)
        self._reserve = SpaceReserve.of(config.storage)
        self._disk_full = False
        self._last_note: tuple[datetime | None, str] | None = None

    def start(self, stack: contextlib.ExitStack) -> str:
        cfg = self.config
        self._outbox = outbox = self.open_outbox(stack)
        saved = self._saved_state(outbox)
        self._checks = HealthChecks(cfg, outbox, sys_root=self.sys_root, clock=self.clock,
                                    clock_synced=self.clock_synced)
        # The integrity check runs at every start: a result saved before says nothing of
        # the file as it is now (a page damaged since would pass for a day).
        self._tracker = CheckTracker(cfg.health.fail_after, cfg.health.restore_after,
                                     saved.get("hysteresis"))
        self._runner = AlarmTestRunner(cfg, outbox, stop=self.stop_event,
                                       progress=self._on_progress, tick=self.watchdog.ping)
        self.every(cfg.health.interval_s, lambda: self._run_checks(
            outbox, self._checks, self._tracker, self.clock()), first_in=0)
        self.every(SALVAGE_EVERY_S, lambda: self._salvage(outbox), first_in=0)
        log.info("self-test daemon ready: checks every %g s, alarm test schedule '%s' (%s)",
                 cfg.health.interval_s, cfg.alarm_test.schedule, cfg.device.timezone)
        return (f"checks every {cfg.health.interval_s:g} s, alarm test "
                f"'{cfg.alarm_test.schedule}'")

    def step(self) -> int | None:
        outbox, now = self._outbox, self.clock()
        full = self._reserve.drawn()
        if full != self._disk_full:
            # The alarm reserve was drawn on (a full disk): the checks run now, not at
            # their next interval, and the disk fault goes out at once.
            self._disk_full = full
            if full:
                self._run_checks(outbox, self._checks, self._tracker, now)
        self._request_due_test(outbox, now)
        if self._runner.recover_interrupted():
            self._save_state(outbox, self._checks, self._tracker, now)
        # A person's `guardpost test-alarm` runs its own test.
        for test_id in requested_tests(outbox, ("schedule", "platform")):
            if self.stop_event.is_set():
                break
            self._run_test(self._runner, test_id, outbox, self._checks, self._tracker)
        return None

    def next_wakeup(self) -> float:
        """The schedule's next slot is a time of the site's wall clock."""
        now = self.clock()
        return min(MAX_WAIT_S, max(0.0, (self.schedule.next_slot(now) - now).total_seconds()))

    # -- a damaged outbox read back ------------------------------------------------------

    def _salvage(self, outbox: Outbox) -> None:
        """Read back the events of damaged outboxes moved aside (by any daemon) into this
        one, and tell the platform what came back (:mod:`edge.store.salvage`)."""
        for damaged in salvage.pending(outbox.path):
            try:
                summary = salvage.salvage(outbox, damaged, self.config.storage.keep_days)
            except TimeoutError as err:
                log.warning("reading back %s waits: %s", damaged.name, err)
                return
            except Exception:
                log.exception("reading back %s failed; trying again later", damaged.name)
                return
            with outbox.transaction():
                outbox.append(EventDraft(
                    kind=EventKind.RESTORE, code=ContactId.SYSTEM_TROUBLE,
                    occurred_at=self.clock(), clock_synced=self.clock_synced(),
                    boot_id=boot_id(), qualifier=Qualifier.RESTORE,
                    detail={"check": "outbox", "problem": "recovered", **summary}))
            wake(self.config.storage.runtime_dir, "uplink")
            wake(self.config.storage.runtime_dir, "button")  # latches may have come back

    # -- checks ------------------------------------------------------------------------

    def _integrity_due(self, checks: HealthChecks, now: datetime) -> bool:
        last = checks.integrity
        if last is None:
            return True
        local = now.astimezone(self.config.device.zone)
        age = now - datetime.fromisoformat(last["at"])
        if age < timedelta(0):
            # The last check is "in the future": the wall clock stepped back since. Waiting
            # for the clock to catch up would skip the daily check for as long as the
            # step; one check now re-stamps it on the clock as it is.
            return True
        at_its_hour = age >= timedelta(hours=23) and local.hour == self.config.health.integrity_hour
        return at_its_hour or age >= timedelta(hours=48)

    def _run_checks(self, outbox: Outbox, checks: HealthChecks, tracker: CheckTracker,
                    now: datetime) -> None:
        try:
            self.results = checks.run(integrity_due=self._integrity_due(checks, now))
        except Exception:
            log.exception("health checks failed to run")
            return
        with outbox.transaction():
            for result in self.results:
                change = tracker.update(result)
                if change is None:
                    continue
                log.log(logging.WARNING if change == "fault" else logging.INFO,
                        "check %s: %s (%s)", result.name, change.upper(), result.summary)
                outbox.append(EventDraft(
                    kind=EventKind.FAULT if change == "fault" else EventKind.RESTORE,
                    code=result.code, occurred_at=now, clock_synced=self.clock_synced(),
                    boot_id=boot_id(),
                    qualifier=Qualifier.NEW if change == "fault" else Qualifier.RESTORE,
                    detail={"check": result.name, "summary": result.summary,
                            **({"value": result.value} if result.value else {})}))
        self._save_state(outbox, checks, tracker, now)
        self.runs += 1
        wake(self.config.storage.runtime_dir, "uplink")

    def _saved_state(self, outbox: Outbox) -> dict:
        saved = outbox.daemons.all().get(self.name)
        if saved is None:
            return {}
        try:
            return json.loads(saved[0])
        except ValueError:
            return {}

    def _save_state(self, outbox: Outbox, checks: HealthChecks, tracker: CheckTracker,
                    now: datetime) -> None:
        state = {
            "daemon": self.name, "version": __version__, "checked_at": utc_iso(now),
            "checks": {r.name: {"ok": r.ok, "fault": tracker.faulted(r.name),
                                "summary": r.summary, **({"value": r.value} if r.value else {})}
                       for r in self.results},
            "last_test": latest_test(outbox),
            "next_test": utc_iso(self.schedule.next_slot(now)),
            "schedule": self.config.alarm_test.schedule,
            "hysteresis": tracker.state, "integrity": checks.integrity,
        }
        self.save_state(outbox, state)

    # -- alarm tests -------------------------------------------------------------------

    def _request_due_test(self, outbox: Outbox, now: datetime) -> None:
        """Request the test of the latest slot, once. Only the latest slot is looked at,
        so a clock stepped forward over many slots runs one catch-up test, not a burst;
        stepped back, it finds slots that already have their test (a row per slot) and
        runs none of them again. A slot it finds that never ran (the device was off)
        still runs, within ``catch_up_hours`` of its time as the clock now says."""
        if not self.clock_synced():
            # The wall clock may be days off before NTP: the slot waits for it.
            self._schedule_note(None, "waits: the clock is not synchronised")
            return
        slot = self.schedule.latest_slot(now)
        if now - slot > timedelta(hours=self.config.alarm_test.catch_up_hours):
            self._schedule_note(slot, "is past catch_up_hours: not run")
            return
        test_id = request_test(outbox, "schedule", scheduled_for=slot, at=now)
        if test_id is not None:
            log.info("scheduled alarm test %s for the slot of %s", test_id,
                     slot.isoformat(timespec="minutes"))
        else:
            self._schedule_note(slot, "already has its test")

    def _schedule_note(self, slot: datetime | None, why: str) -> None:
        """Why no test was requested, logged (debug) when it changes, not at every turn."""
        note = (slot, why)
        if note != self._last_note:
            self._last_note = note
            log.debug("alarm test schedule: slot %s %s",
                      "-" if slot is None else utc_iso(slot), why)

    def _run_test(self, runner: AlarmTestRunner, test_id: str, outbox: Outbox,
                  checks: HealthChecks, tracker: CheckTracker) -> None:
        try:
            outcome = runner.run(test_id)
        except TestBusy:
            return  # `guardpost test-alarm` is running one: ours runs after it
        if outcome is not None:
            self._save_state(outbox, checks, tracker, self.clock())

    def _on_progress(self, stage: str, info: dict) -> None:
        if stage != "finished":
            log.info("alarm test: %s", stage)
