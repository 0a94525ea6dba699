"""The disk and the clock under a steady stream of presses: the disk filled to the last
byte, the outbox damaged or cut short, its WAL lost, the wall clock stepped back and forth.
Judged as every scenario is, at the broker, by event id; where a fault destroys what was
committed (a lost WAL), only numbers the device announced lost may be missing."""

from __future__ import annotations

import contextlib
import os

import pytest

from edge.store.reserve import MIB, SpaceReserve
from tests.proof.scenario import Scenario, prove
from tests.support.daemons import poll_until
from tests.support.disk import damage, fill, small_disk
from tests.support.sim_clock import TestClock

pytestmark = pytest.mark.slow

RESERVE_MB = 2
# The self-test runs its checks (and fills the reserve again) every 5 s, and reports a
# fault's end after one good run: a disk that came back is ready for the next injection.
QUICK_HEALTH = {"interval_s": 5, "restore_after": 1, "min_free_mb": 1}


def test_a_disk_filled_to_the_last_byte_loses_no_confirmed_alarm(proof_site, scale, rng,
                                                                 record, tmp_path):
    with small_disk(tmp_path / "card", 32 * 1024) as card:
        site = proof_site(state_dir=card, sections={
            "storage": {"alarm_reserve_mb": RESERVE_MB}, "health": QUICK_HEALTH})
        device = site.device
        reserve = SpaceReserve(device.config.storage.database, RESERVE_MB * MIB)

        def inject(number: int) -> None:
            poll_until(lambda: reserve.short() == 0, timeout=60, what="the reserve whole")
            filler = fill(card, f"filler-{number}")
            # Alarms go on from the reserve while the disk is full, to the platform...
            before = len(site.judge.events("alarm"))
            site.judge.wait_for(lambda j: len(j.events("alarm")) >= before + 3, timeout=60,
                                what="alarms recorded and delivered on the full disk")
            filler.unlink()  # ...and space comes back

        verdict = prove(site, Scenario("disk full to the last byte", scale.of(3, 30),
                                       inject), rng, record)
        assert verdict.ok, verdict.explain()


DAMAGES = ("header overwritten", "cut in half", "a page of the events table")


def test_a_damaged_outbox_loses_no_confirmed_alarm(proof_site, scale, rng, record):
    """Frozen, the outbox damaged (in turn: its header, half of it cut off, one page of
    the events table), killed, started again: what the file still holds comes back."""
    site = proof_site()
    device = site.device
    done: list[str] = []

    def inject(number: int) -> None:
        how = DAMAGES[number % len(DAMAGES)]
        done.append(how)
        device.freeze()
        database = device.config.storage.database
        if how == "header overwritten":
            damage(database, 0, 100)
        elif how == "cut in half":
            os.truncate(database, os.path.getsize(database) // 2)
        else:
            pages = os.path.getsize(database) // 4096
            damage(database, rng.randrange(1, max(2, pages)) * 4096, 4096)
        device.kill_everything()
        device.start()
        device.wait_armed()

    verdict = prove(site, Scenario("outbox damaged (header, cut in half, a page)",
                                   scale.of(3, 30), inject), rng, record)
    print("damages:", ", ".join(done))
    assert verdict.ok, verdict.explain()


def test_a_lost_wal_is_announced_and_numbers_never_repeat(proof_site, scale, rng, record):
    """Frozen, the WAL (and its index) deleted, killed, started again: alarms only in the
    WAL are gone, and the device says which numbers (its history_lost fault); every other
    confirmed alarm arrives and no number is given twice."""
    site = proof_site()
    device = site.device

    def inject(number: int) -> None:
        device.freeze()
        database = device.config.storage.database
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{database}{suffix}")
        device.kill_everything()
        device.start()
        device.wait_armed()

    verdict = prove(site, Scenario("WAL lost", scale.of(3, 30), inject,
                                   losses_announced=True), rng, record)
    assert verdict.ok, verdict.explain()


def test_the_wall_clock_stepped_back_and_forth_loses_nothing(proof_site, scale, rng, record,
                                                            tmp_path):
    """The device's wall clock stepped by up to a year either way, synchronised or not,
    while presses go on: seq order, ids and delivery hold (the timers are monotonic)."""
    clock = TestClock(tmp_path / "clock.json")
    site = proof_site(env=clock.env())

    def inject(number: int) -> None:
        step = rng.choice((-86400.0, 86400.0, -3600.0, 365 * 86400.0, -365 * 86400.0))
        clock.step(step, synced=rng.random() < 0.5)

    verdict = prove(site, Scenario("wall clock stepped ±1 h to ±1 year", scale.of(6, 60),
                                   inject), rng, record)
    assert verdict.ok, verdict.explain()
