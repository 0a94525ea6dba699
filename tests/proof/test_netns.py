"""The device in a network namespace the test creates, its only link a veth pair to the
host, where the broker listens on the host's end; the link goes down and up during a
steady stream. Skipped, with the reason, where namespaces cannot be made."""

from __future__ import annotations

import threading

import pytest

from tests.proof.scenario import Scenario, prove

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("netns_permitted")]


@pytest.mark.parametrize("end", ["far end", "device's own link"])
def test_link_down_and_up_in_a_namespace_loses_nothing(end, proof_site, scale, rng, record):
    """The far end down (a cable pulled at the switch): the device's packets vanish and
    only its own timeouts tell it. Its own link down: its route goes, sends fail at once."""
    site = proof_site(netns=True)
    ns = site.netns
    switch = ns.far_end if end == "far end" else ns.device_link_state

    def inject(number: int) -> None:
        switch(up=False)
        try:
            threading.Event().wait(rng.uniform(1.0, 4.0))  # down this long; presses go on
        finally:
            switch(up=True)

    verdict = prove(site, Scenario(f"netns: link down and up ({end})", scale.of(2, 15),
                                   inject), rng, record)
    assert verdict.ok, verdict.explain()
