"""kill -9 during a steady stream of presses: of one daemon at a time, of `run all`, and
of every process at once. Every confirmed alarm arrives, in order, duplicates bounded."""

from __future__ import annotations

import pytest

from tests.proof.device import DAEMONS
from tests.proof.scenario import Scenario, prove

pytestmark = pytest.mark.slow


def test_kill_9_of_a_random_daemon_loses_no_confirmed_alarm(proof_site, scale, rng, record):
    site = proof_site()
    device = site.device
    killed: list[str] = []

    def inject(number: int) -> None:
        name = rng.choice(DAEMONS)
        killed.append(name)
        mark = device.kill_daemon(name)
        device.wait_restarted(name, after=mark)
        if name == "button":
            device.wait_armed()

    verdict = prove(site, Scenario("kill -9 of a random daemon", scale.of(16, 200), inject),
                    rng, record)
    print("killed:", ", ".join(killed))
    assert verdict.ok, verdict.explain()


def test_kill_9_of_run_all_loses_no_confirmed_alarm(proof_site, scale, rng, record):
    site = proof_site()
    device = site.device

    def inject(number: int) -> None:
        device.kill_supervisor()
        device.start()
        device.wait_armed()

    verdict = prove(site, Scenario("kill -9 of `run all`", scale.of(4, 30), inject), rng, record)
    assert verdict.ok, verdict.explain()


def test_kill_9_of_every_process_at_once_loses_no_confirmed_alarm(proof_site, scale, rng,
                                                                   record):
    """All frozen, then all killed: no daemon hears of the others' death (no clean stop,
    no offline status): what a power cut leaves, as far as processes go."""
    site = proof_site()
    device = site.device

    def inject(number: int) -> None:
        device.kill_everything()
        device.start()
        device.wait_armed()

    verdict = prove(site, Scenario("kill -9 of every process at once", scale.of(2, 10),
                                   inject), rng, record)
    assert verdict.ok, verdict.explain()


def test_restarted_on_a_copy_of_its_state_taken_frozen_loses_nothing(proof_site, scale, rng,
                                                                      record, tmp_path):
    """Frozen, its state directory copied as it is (the outbox, its WAL and shared memory
    files: what a crash leaves on a disk that kept every write), then killed and started
    on the copy: the copy has every confirmed alarm."""
    site = proof_site()
    device = site.device

    def inject(number: int) -> None:
        device.freeze()
        copy = device.copy_state(tmp_path / f"state-copy-{number + 1}")
        device.kill_everything()
        device.start(state_dir=copy)
        device.wait_armed()

    verdict = prove(site, Scenario("kill -9 of everything, restarted on a copy of its state",
                                   scale.of(2, 10), inject), rng, record)
    assert verdict.ok, verdict.explain()
