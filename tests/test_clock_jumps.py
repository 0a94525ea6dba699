"""Clock jumps, forwards and backwards, before and after NTP sync (issue 12).

The daemons run as real processes whose wall clock the test moves through the
simulation file of edge/runtime/clock.py (``GUARDPOST_SIM_CLOCK``); their monotonic
clock is the real one. Everything is judged where the police see it, at the platform
stand-in: sequence numbers, ids, ``clock_synced``, the alarm tests of the schedule and
the heartbeats.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from types import SimpleNamespace

from edge.contract.events import utc_iso
from edge.daemons.selftest.daemon import SelfTestDaemon
from edge.runtime.control import request
from edge.runtime.wake import wake
from edge.store.outbox import Outbox
from tests.support.sim_clock import DAY, TestClock

YEAR = 365 * DAY
RELAY = {"test_relay": {"pin": 24, "pulse_ms": 200}}


def press(config) -> dict:
    """A simulated press; the button daemon answers once the event is durable."""
    reply = request(config.storage.runtime_dir / "button.ctl",
                    {"op": "press", "input": "gate", "hold": 0.05}, 30)
    assert reply.get("ok") and reply["accepted"], reply
    return reply["event"]


def test_presses_across_clock_jumps_keep_order_ids_and_the_truth_about_sync(
        tmp_path, make_config, daemons, platform):
    """Forwards a day and a year, back a day and past where it began, first while NTP
    has not synchronised the clock, then while it has: every press reaches the platform
    once, in sequence, with a unique id that never goes back, and says whether the clock
    was synchronised when it was pressed."""
    clock = TestClock(tmp_path / "clock.json")
    path, config = make_config()
    police = platform(config, ack=True)
    daemons("button", path, extra_env=clock.env())
    started = time.monotonic()
    daemons("uplink", path, extra_env=clock.env())
    police.wait_for(lambda p: any(s["state"] == "online" for s in p.on("status")),
                    what="the device's birth")

    steps = [(0.0, False), (DAY, False), (YEAR, False), (YEAR - DAY, False), (-DAY, False),
             (-DAY, True), (0.0, True), (DAY, True), (YEAR, True), (YEAR - DAY, True),
             (-DAY, True)]
    pressed: list[tuple[dict, float, bool]] = []  # (the daemon's answer, offset, synced)
    for offset, synced in steps:
        clock.set(offset, synced=synced)
        pressed.append((press(config), offset, synced))
    ids = [event["id"] for event, _, _ in pressed]
    police.wait_for(lambda p: {e["id"] for e in p.events()} >= set(ids),
                    what="every press at the platform")

    events = police.events()
    assert [e["id"] for e in events] == ids  # each once, in the order pressed
    seqs = [e["seq"] for e in events]
    assert all(a < b for a, b in pairwise(seqs)), seqs
    assert len(set(ids)) == len(ids)
    # The ids are time-ordered UUIDv7: stepping the clock back never made one go back.
    assert ids == sorted(ids)
    for event, (answer, offset, synced) in zip(events, pressed, strict=True):
        assert event["seq"] == answer["seq"]
        assert event["clock_synced"] is synced, (event, offset)
    # occurred_at followed the clock the test set: each step moved it by the step.
    stamps = [datetime.fromisoformat(e["occurred_at"]) for e in events]
    offsets = [offset for _, offset, _ in pressed]
    for (before, after), (off_a, off_b) in zip(pairwise(stamps), pairwise(offsets),
                                               strict=True):
        moved = (after - before).total_seconds()
        assert abs(moved - (off_b - off_a)) < 60, (before, after, off_a, off_b)

    # The heartbeat is on the monotonic clock: no step of the wall clock brought one
    # forward. One at the connection, then one per interval of the test's own window.
    window = time.monotonic() - started
    heartbeats = police.on("health")
    assert len(heartbeats) <= 1 + math.floor(window / config.uplink.heartbeat_interval), \
        (len(heartbeats), window)
    assert all(h["clock_synced"] is not None for h in heartbeats)


def test_scheduled_alarm_test_across_jumps_runs_each_slot_once_and_never_a_burst(
        tmp_path, make_config, daemons, platform):
    """An hourly schedule. Unsynchronised, no slot runs; synchronised, the latest slot
    runs once. A step forward of a day passes 24 slots: one catch-up test, not 24. A
    step back of a day finds the slot that already ran: no test."""
    real_now = datetime.now(UTC)
    first_slot = real_now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    # The device's clock 30 s past a slot: the test has 59 minutes before another comes.
    clock = TestClock(tmp_path / "clock.json",
                      offset_s=(first_slot + timedelta(seconds=30) - real_now).total_seconds(),
                      synced=False)
    path, config = make_config(outputs=RELAY, alarm_test={"schedule": "0 * * * *",
                                                          "ack_timeout_s": 5})
    police = platform(config, ack=True)
    police.clock_offset_s = lambda: clock.offset_s  # NTP keeps the platform's clock too
    daemons("button", path, extra_env=clock.env())
    daemons("uplink", path, extra_env=clock.env())
    selftest = daemons("selftest", path, extra_env=clock.env())

    def moved(by_s: float, *, synced: bool, expect: str) -> None:
        """Step the clock, wake the self-test daemon, wait for its schedule's verdict."""
        mark = len(selftest.lines)
        clock.step(by_s, synced=synced)
        wake(config.storage.runtime_dir, "selftest")
        selftest.wait_for_line(expect, after=mark)

    def results() -> list[dict]:
        return police.events("test-result")

    selftest.wait_for_line("slot - waits: the clock is not synchronised")

    moved(0, synced=True, expect="scheduled alarm test")
    police.wait_for(lambda p: len(results()) == 1, timeout=30, what="the first test's result")

    before_the_step = len(selftest.lines)
    moved(DAY, synced=True, expect="scheduled alarm test")
    police.wait_for(lambda p: len(results()) == 2, timeout=30, what="the catch-up's result")
    slot_of_day_later = utc_iso(first_slot + timedelta(days=1))
    # Looked at again (woken), that slot has had its test; none of the 23 passed over runs.
    # (The note is logged once, when the reason changes: it may have come already, right
    # after the catch-up test finished.)
    wake(config.storage.runtime_dir, "selftest")
    selftest.wait_for_line(f"slot {slot_of_day_later} already has its test",
                           after=before_the_step)

    moved(-DAY, synced=True, expect=f"slot {utc_iso(first_slot)} already has its test")
    moved(-DAY, synced=False, expect="waits: the clock is not synchronised")

    with Outbox(config.storage.database, config.identity) as outbox:
        rows = outbox.db.execute("SELECT trigger, scheduled_for, state FROM alarm_tests"
                                 " ORDER BY requested_at").fetchall()
    assert rows == [("schedule", utc_iso(first_slot), "passed"),
                    ("schedule", slot_of_day_later, "passed")], rows
    assert [r["detail"]["result"] for r in results()] == ["passed", "passed"]
    tests = police.events("test")
    assert len(tests) == 2 and all(t["code"] == 602 and t["clock_synced"] for t in tests)
    assert police.events("alarm") == []


def test_daily_integrity_check_runs_after_the_clock_went_back(make_config):
    """The last quick_check stamped "in the future" (the clock stepped back a year since)
    does not put off the daily check for a year."""
    _, config = make_config()
    daemon = SelfTestDaemon(config)
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    checks = SimpleNamespace(integrity={"at": (now + timedelta(days=365)).isoformat()})
    assert daemon._integrity_due(checks, now)
    checks.integrity["at"] = (now - timedelta(hours=1)).isoformat()
    assert not daemon._integrity_due(checks, now)  # an hour ago: not yet
