"""Network faults between the device and the broker, made by the tests' own TCP proxy
(tests/support/proxy.py) during a steady stream: the connection cut (RST), black-holed
both ways and one way each way, slowed and throttled. The judge talks to the broker
directly: what it gets is what the broker really delivered."""

from __future__ import annotations

import threading

import pytest

from tests.proof.scenario import Scenario, prove
from tests.support.proxy import TO_BROKER, TO_DEVICE

pytestmark = pytest.mark.slow


def held(seconds: float) -> None:
    threading.Event().wait(seconds)  # the fault lasts this long; presses go on meanwhile


FAULTS = {
    # name: (how it is made, CI's count, a soak's)
    "cut (RST)": (lambda proxy, rng: proxy.cut(), 3, 30),
    "black hole, both ways": (lambda proxy, rng: proxy.black_hole(), 2, 20),
    "black hole, device to broker": (
        lambda proxy, rng: proxy.black_hole(direction=TO_BROKER), 2, 20),
    "black hole, broker to device": (
        lambda proxy, rng: proxy.black_hole(direction=TO_DEVICE), 2, 20),
    "delay (0.5-2 s round trip)": (lambda proxy, rng: proxy.delay(rng.uniform(0.5, 2.0)), 2, 20),
    "throttle (1-4 kB/s)": (lambda proxy, rng: proxy.throttle(rng.uniform(1000, 4000)), 2, 20),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_network_faults_through_the_proxy_lose_nothing(fault, proof_site, scale, rng, record):
    site = proof_site(proxy=True)
    make, ci, soak = FAULTS[fault]

    def inject(number: int) -> None:
        make(site.proxy, rng)
        held(rng.uniform(1.0, 4.0))
        site.proxy.passing()

    verdict = prove(site, Scenario(f"proxy: {fault}", scale.of(ci, soak), inject), rng, record)
    assert verdict.ok, verdict.explain()
