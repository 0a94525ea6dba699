"""The judge: the police platform as the broker sees it, and the verdict it gives.

A separate paho client (tests/support/platform.py's stand-in: every payload checked
against its schema, every copy of an alarm or test acknowledged as a platform does)
that keeps every copy of every event with its arrival time and raw bytes, the device's
births (their session counter counts its connections) and its own connections.

The verdict holds the device to what docs/contract.md promises, no more:

- every event the presser saw confirmed as durable arrived (by id), and no sequence
  number below the highest that arrived is missing (an event committed without its
  press being confirmed must arrive too);
- first arrivals are in ``seq`` order within each priority ("by seq within a
  priority"), where the scenario keeps that promise in force: a broker that forgot what
  it took gets it again later, out of order ("missing numbers fill in");
- the copies of one event are byte for byte identical, and no more than the contract's
  bound (section "Delivery"): one, plus one per connection the device opened and per
  reconnection of the platform while the event was unacknowledged, plus one per
  republication pause (``republish_after_s``, doubling up to ``republish_max_s``) that
  passed since it was committed;
- the worst delay is from the moment the device confirmed a press durable to the first
  arrival of its event here.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

from tests.proof.presser import CONFIRMED, IGNORED, REFUSED, Press
from tests.support.platform import PlatformStandIn


@dataclass(frozen=True)
class Copy:
    event_id: str
    seq: int
    priority: str
    payload: bytes
    at: float  # time.monotonic() on arrival


@dataclass
class Verdict:
    scenario: str
    injections: int
    presses: int
    confirmed: int
    delivered: int
    lost: list[str]
    unconfirmed: dict[str, int]       # outcome -> presses not confirmed
    duplicates: int                   # copies beyond the first, in all
    worst_delay_s: float | None
    problems: list[str] = field(default_factory=list)
    # What the device said of presses it did not take (not a broken promise of the
    # contract, but a press of 20 ms refused or ignored is worth a look).
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def explain(self) -> str:
        shown = self.problems[:20]
        more = len(self.problems) - len(shown)
        return "\n".join([f"{self.scenario}: {len(self.problems)} problem(s)", *shown,
                          *([f"... and {more} more"] if more else [])])


class Judge(PlatformStandIn):
    """``Judge(host, port, config.topic_prefix).start()``; judge with :meth:`verdict`."""

    def __init__(self, host: str, port: int, prefix: str, *, republish_after_s: float,
                 republish_max_s: float, client_id: str = "proof-judge"):
        super().__init__(host, port, prefix, ack=True, client_id=client_id)
        self.republish_after_s = republish_after_s
        self.republish_max_s = republish_max_s
        self.connected_at: list[float] = []
        self._lock = threading.Lock()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._lock:
            self.connected_at.append(time.monotonic())
        super()._on_connect(client, userdata, flags, reason_code, properties)

    # -- what arrived ----------------------------------------------------------------

    def copies(self) -> dict[str, list[Copy]]:
        """Every copy of every event, by id, in arrival order."""
        found: dict[str, list[Copy]] = defaultdict(list)
        for m in list(self.messages):
            if m.leaf.startswith("event/") and isinstance(m.body, dict) and "id" in m.body:
                found[m.body["id"]].append(Copy(m.body["id"], m.body.get("seq"),
                                                m.body.get("priority"), bytes(m.payload), m.at))
        return found

    def births(self) -> list[tuple[float, int]]:
        """(arrival, session) of every ``online`` status, in arrival order."""
        return [(m.at, m.body["session"]) for m in list(self.messages)
                if m.leaf == "status" and isinstance(m.body, dict)
                and m.body.get("state") == "online" and isinstance(m.body.get("session"), int)]

    def latest_session(self) -> int:
        return max((session for _, session in self.births()), default=0)

    def wait_online(self, after_session: int = 0, timeout: float = 60.0) -> int:
        """Until the device announced a connection newer than ``after_session``."""
        self.wait_for(lambda j: j.latest_session() > after_session, timeout=timeout,
                      what=f"a birth after session {after_session}")
        return self.latest_session()

    def arrived_ids(self) -> set[str]:
        with self._cond:
            return set(self._event_ids)

    def wait_delivered(self, ids: set[str], timeout: float) -> bool:
        """Until every id in ``ids`` arrived, or ``timeout``; False if some did not."""
        try:
            self.wait_for(lambda j: ids <= j._event_ids, timeout=timeout,
                          what=f"{len(ids)} events")
        except AssertionError:
            return False
        return True

    def missing_seqs(self) -> list[int]:
        """Numbers below the highest arrived that have not arrived, less those the device
        announced lost (a ``history_lost`` fault: they will never come)."""
        seqs = {c[0].seq for c in self.copies().values() if isinstance(c[0].seq, int)}
        return sorted(set(range(1, max(seqs, default=0) + 1)) - seqs - self.announced_lost())

    def announced_lost(self) -> set[int]:
        """Sequence numbers the device said are lost with its outbox's history
        (docs/contract.md, ``epoch``): the fault names them, the platform stops waiting."""
        lost: set[int] = set()
        for body in self.events("fault"):
            detail = body.get("detail") or {}
            if detail.get("problem") == "history_lost" and "lost_from_seq" in detail:
                lost |= set(range(detail["lost_from_seq"], detail["lost_to_seq"] + 1))
        return lost

    def wait_without_gaps(self, timeout: float) -> None:
        """Until no sequence number below the highest arrived is missing (or timeout):
        a gap is an event that has not arrived *yet*."""
        with contextlib.suppress(AssertionError):  # the verdict names what is missing
            self.wait_for(lambda j: not j.missing_seqs(), timeout=timeout, what="no gaps")

    # -- the verdict -----------------------------------------------------------------

    def republications_within(self, seconds: float) -> int:
        """How many republication pauses of the contract fit in ``seconds``."""
        count, elapsed, pause = 0, 0.0, self.republish_after_s
        while elapsed + pause <= seconds:
            elapsed += pause
            count += 1
            pause = min(pause * 2, self.republish_max_s)
        return count

    def allowed_copies(self, copies: list[Copy], committed_at: float | None,
                       births: list[tuple[float, int]] | None = None) -> int:
        """The contract's bound for one event (see the module's docstring)."""
        first, last = copies[0].at, copies[-1].at
        births = self.births() if births is None else births
        times = [at for at, _ in births]
        # The device's session counter as of each birth's arrival (a late retained copy
        # of an older birth does not take it back).
        highest = list(itertools.accumulate((s for _, s in births), max))

        def session_by(moment: float) -> int:
            index = bisect.bisect_right(times, moment)
            return highest[index - 1] if index else 0

        connections = session_by(last) - session_by(first)
        reconnections = sum(1 for at in self.connected_at if first < at <= last)
        since = committed_at if committed_at is not None else first
        return 1 + connections + reconnections + self.republications_within(last - since)

    def verdict(self, scenario: str, presses: list[Press], *, injections: int,
                order_promised: bool = True, losses_announced: bool = False) -> Verdict:
        """``losses_announced``: the scenario destroys committed data (a lost WAL): a
        confirmed alarm may be missing only if the device announced its number lost."""
        copies = self.copies()
        confirmed = [p for p in presses if p.outcome == CONFIRMED]
        committed_at = {p.event_id: p.answered_at for p in confirmed}
        problems: list[str] = []

        announced = self.announced_lost() if losses_announced else set()
        lost = [p.event_id for p in confirmed if p.event_id not in copies]
        problems += [f"confirmed press {p.number} (seq {p.seq}, id {p.event_id}) never "
                     "arrived" + (" and was not announced lost" if losses_announced else "")
                     for p in confirmed if p.event_id not in copies and p.seq not in announced]
        problems += [f"seq {seq} never arrived (an event the device committed)"
                     for seq in self.missing_seqs()]
        for p in confirmed:
            if p.event_id in copies and copies[p.event_id][0].seq != p.seq:
                problems.append(f"press {p.number}: the device said seq {p.seq}, the event "
                                f"carries {copies[p.event_id][0].seq}")

        by_seq: dict[int, set[str]] = defaultdict(set)
        for event_id, cs in copies.items():
            by_seq[cs[0].seq].add(event_id)
        problems += [f"seq {seq} was given to {len(ids)} events: {sorted(ids)}"
                     for seq, ids in sorted(by_seq.items()) if len(ids) > 1]

        if order_promised:
            firsts = sorted((cs[0] for cs in copies.values()), key=lambda c: c.at)
            last_seq: dict[str, Copy] = {}
            for c in firsts:
                before = last_seq.get(c.priority)
                if before is not None and c.seq < before.seq:
                    problems.append(f"{c.priority} seq {c.seq} arrived first after seq "
                                    f"{before.seq} ({(c.at - before.at) * 1000:.0f} ms later)")
                if before is None or c.seq > before.seq:
                    last_seq[c.priority] = c

        duplicates, births = 0, self.births()
        for event_id, cs in copies.items():
            duplicates += len(cs) - 1
            different = sum(1 for c in cs[1:] if c.payload != cs[0].payload)
            if different:
                problems.append(f"seq {cs[0].seq}: {different} of {len(cs)} copies differ "
                                "from the first, byte for byte")
            allowed = self.allowed_copies(cs, committed_at.get(event_id), births)
            if len(cs) > allowed:
                problems.append(f"seq {cs[0].seq}: {len(cs)} copies over "
                                f"{(cs[-1].at - cs[0].at):.1f} s, the contract allows "
                                f"{allowed} here")

        delays = [copies[p.event_id][0].at - p.answered_at for p in confirmed
                  if p.event_id in copies]
        problems += [f"schema: {problem}" for problem in self.schema_problems[:20]]
        unconfirmed: dict[str, int] = defaultdict(int)
        notes = []
        for p in presses:
            if p.outcome != CONFIRMED:
                unconfirmed[p.outcome] += 1
            if p.outcome in (IGNORED, REFUSED):
                notes.append(f"press {p.number} {p.outcome}: {p.detail}")
        return Verdict(scenario=scenario, injections=injections, presses=len(presses),
                       confirmed=len(confirmed), delivered=len(confirmed) - len(lost),
                       lost=lost, unconfirmed=dict(unconfirmed), duplicates=duplicates,
                       worst_delay_s=max(0.0, max(delays)) if delays else None,
                       problems=problems, notes=notes)
