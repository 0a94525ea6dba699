"""Fixtures of the proof suite: its scale (CI or ``--soak``), its random seed, a site per
scenario (cleaned up whatever happens), and the table of every scenario at the end."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.proof import results
from tests.proof.judge import Verdict
from tests.proof.netns import remove_leftovers, unavailable
from tests.proof.site import ProofSite

VERDICTS = pytest.StashKey[list]()
SEED = pytest.StashKey[int]()


@dataclass(frozen=True)
class Scale:
    """How many injections a scenario makes: CI's few, or a soak's hundreds."""

    soak: bool

    def of(self, ci: int, soak: int) -> int:
        return soak if self.soak else ci


def pytest_configure(config):
    config.stash[VERDICTS] = []
    config.stash[SEED] = int(os.environ.get("GUARDPOST_PROOF_SEED")
                             or random.SystemRandom().randrange(1 << 31))


SOAK_TIMEOUT_S = 4 * 3600  # a soak scenario runs for many minutes; a hang is still a bug


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--soak", default=False):
        return
    proof = Path(__file__).parent
    for item in items:
        if proof in Path(item.fspath).parents:
            item.add_marker(pytest.mark.timeout(SOAK_TIMEOUT_S))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    verdicts: list[Verdict] = config.stash.get(VERDICTS, [])
    if not verdicts:
        return
    soak = bool(config.getoption("--soak", default=False))
    path = results.write(verdicts, soak=soak, seed=config.stash[SEED])
    terminalreporter.section("proof suite")
    terminalreporter.write_line(results.table(verdicts))
    if text := results.notes(verdicts):
        terminalreporter.write_line(text)
    terminalreporter.write_line(f"seed {config.stash[SEED]}; written to {path}")


@pytest.fixture(scope="session")
def scale(pytestconfig) -> Scale:
    return Scale(soak=bool(pytestconfig.getoption("--soak")))


@pytest.fixture
def rng(pytestconfig, request) -> random.Random:
    """The scenario's own random choices, replayable with GUARDPOST_PROOF_SEED."""
    return random.Random(f"{pytestconfig.stash[SEED]}:{request.node.nodeid}")


@pytest.fixture
def record(pytestconfig):
    return pytestconfig.stash[VERDICTS].append


@pytest.fixture
def proof_site(tmp_path):
    """``proof_site(persistence=..., proxy=..., netns=...)``: everything it made is
    stopped and removed at the end (processes, broker, proxy, namespace)."""
    with contextlib.ExitStack() as stack:
        sites: list[ProofSite] = []

        def make(**options) -> ProofSite:
            site = ProofSite(tmp_path / f"site{len(sites) + 1}", stack, **options)
            sites.append(site)
            return site

        try:
            yield make
        finally:
            for site in sites:  # shown by pytest only when the test failed
                print(site.device.log()[-20000:])


@pytest.fixture(scope="session")
def netns_permitted():
    reason = unavailable()
    if reason:
        pytest.skip(f"network namespaces: {reason}")
    remove_leftovers()
