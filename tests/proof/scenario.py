"""How every proof scenario runs: a steady stream of presses, injections at random
moments of it, the device given time to deliver, then the judge's verdict."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tests.proof.judge import Verdict
from tests.proof.presser import CONFIRMED, Presser
from tests.proof.site import ProofSite

PRESS_INTERVAL_S = 0.1   # ten presses a second: a guard who will not let go of the button
RECOVERY_TIMEOUT_S = 90  # an injection's effect must be over by then (not a judged timing)
DRAIN_TIMEOUT_S = 120    # for everything confirmed to arrive once the stream stops


@dataclass
class Scenario:
    """``inject(n)`` makes the n-th fault and returns once it is over (the broker back,
    the link restored, the killed daemon started again); the stream keeps going."""

    name: str
    injections: int
    inject: Callable[[int], None]
    # docs/contract.md: first arrivals follow seq within a priority, except what a broker
    # that forgot it gets again later ("missing numbers fill in as the backlog drains").
    order_promised: bool = True
    # The fault destroys committed data (a lost WAL): what is missing must have been
    # announced lost by the device (its history_lost fault), and is counted as lost.
    losses_announced: bool = False


def wait_flowing(site: ProofSite, presser: Presser, after: int) -> None:
    """Until a press made after press ``after`` is confirmed and its alarm has arrived:
    the whole path works again."""
    presser.wait_confirmed(1, after=after, timeout=RECOVERY_TIMEOUT_S)
    first = next(p for p in presser.snapshot() if p.number > after and p.outcome == CONFIRMED)
    if not site.judge.wait_delivered({first.event_id}, RECOVERY_TIMEOUT_S):
        raise AssertionError(f"press {first.number} (seq {first.seq}) confirmed after the "
                             f"injection did not arrive within {RECOVERY_TIMEOUT_S} s")


def prove(site: ProofSite, scenario: Scenario, rng: random.Random,
          record: Callable[[Verdict], None]) -> Verdict:
    device, judge = site.device, site.judge
    device.start()
    device.wait_armed()
    judge.wait_online()
    pause = threading.Event()  # never set: waits a random moment into the stream
    presser = Presser(device.control, interval_s=PRESS_INTERVAL_S)
    injected, broken = 0, None
    with presser:
        try:
            presser.wait_confirmed(3)
            for number in range(scenario.injections):
                # A random moment of the stream: after 1 to 4 more presses, then part of
                # an interval (the injection lands before, during or after a commit).
                presser.wait_confirmed(rng.randint(1, 4), after=presser.last_number)
                pause.wait(rng.uniform(0, PRESS_INTERVAL_S))
                mark = presser.last_number
                scenario.inject(number)
                injected += 1
                wait_flowing(site, presser, after=mark)
        except AssertionError as err:  # judged with the rest, and in the table
            broken = f"after injection {injected}: {err}"
        finally:
            presser.stop()
    presses = presser.snapshot()
    judge.wait_delivered({p.event_id for p in presses if p.outcome == CONFIRMED},
                         DRAIN_TIMEOUT_S)
    judge.wait_without_gaps(timeout=15)
    verdict = judge.verdict(scenario.name, presses, injections=injected,
                            order_promised=scenario.order_promised,
                            losses_announced=scenario.losses_announced)
    if broken:
        verdict.problems.insert(0, broken)
    code = device.stop()
    if code != 0:
        verdict.problems.append(f"`run all` did not stop cleanly at the end: exit {code}")
    record(verdict)
    return verdict
