"""The broker restarts during a steady stream: with its persistence, without it (it
forgets every session and every message it held), and killed -9 (persistence only as
of its last save: it remembers sessions and has lost what came since). The device
publishes alarms again until the platform acknowledges them: nothing is lost."""

from __future__ import annotations

import pytest

from tests.proof.scenario import Scenario, prove

pytestmark = pytest.mark.slow


def broker_restarts(site, rng, *, crash: bool = False):
    def inject(number: int) -> None:
        session = site.judge.latest_session()
        site.restart_broker(crash=crash, down_s=rng.uniform(0, 1.5))
        site.judge.wait_online(after_session=session)

    return inject


def test_broker_restarts_with_persistence_lose_nothing(proof_site, scale, rng, record):
    site = proof_site(persistence=True)
    verdict = prove(site, Scenario("broker restart, persistence on", scale.of(5, 50),
                                   broker_restarts(site, rng)), rng, record)
    assert verdict.ok, verdict.explain()


def test_broker_restarts_without_persistence_lose_nothing(proof_site, scale, rng, record):
    site = proof_site(persistence=False)
    verdict = prove(site, Scenario("broker restart, no persistence", scale.of(5, 50),
                                   broker_restarts(site, rng), order_promised=False), rng, record)
    assert verdict.ok, verdict.explain()


def test_broker_crashes_lose_nothing(proof_site, scale, rng, record):
    """Saved every second: it comes back with the sessions of its last save, and claims
    them, but the messages of the last moments are gone."""
    site = proof_site(persistence=True, broker_config="autosave_interval 1")
    verdict = prove(site, Scenario("broker kill -9, persistence on", scale.of(3, 20),
                                   broker_restarts(site, rng, crash=True),
                                   order_promised=False),
                    rng, record)
    assert verdict.ok, verdict.explain()
