"""Days of a broker outage at the default configuration, through the daemons' own code,
on a clock that runs as fast as the disk allows: what the outbox grows by and what goes
to the disk. Run by bench/table.py, which leaves the device as ``guardpost run all``
left it after failing to reach a dead broker, and keeps its button daemon running (the
self-test asks it whether it reads its inputs).

    python bench/_outage_day.py CONFIG HOURS   # prints one JSON line

What a device writes to the outbox while its broker is unreachable, found in
``edge/daemons/*`` (the heartbeat is published, never stored; camera and modem are
optional, off by default):

- the button daemon records its state every ``STATE_EVERY_S`` (60 s);
- the uplink makes a connection attempt after its own jittered backoff
  (``reconnect_min`` doubling to ``reconnect_max``, 0.5 -> 30 s: about one attempt every
  22.5 s once grown; an attempt refused at once, as here, is the most frequent case: one
  that times out waits ``connect_timeout`` on top) and records its state after a failed
  one when the error changed or ``FAILURE_SAVE_EVERY_S`` (60 s) after the last record;
- the self-test daemon runs its checks every ``health.interval_s`` (300 s), records its
  state and raises the faults of the outage through its hysteresis (the broker, then the
  oldest unsent event), with its integrity check once a day;
- the monthly alarm test is left out (one a month; it would wait for its 30 s
  acknowledgement in real time).

The state records overwrite one row per daemon; only events accumulate. The self-test
daemon here is the real one (``SelfTestDaemon`` with its clocks injected, its timers driven
by that clock); the button's and uplink's records are their real state documents, as their
daemons saved them during the outage, saved through the same call at their cadence.
Before the outage, two days of the same records without the self-test bring the WAL to
the high-water mark a running device has (SQLite reuses its WAL file, never shrinks it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.config import load_config  # noqa: E402
from edge.contract.events import utc_now  # noqa: E402
from edge.daemons.button.daemon import STATE_EVERY_S as BUTTON_STATE_EVERY_S  # noqa: E402
from edge.daemons.selftest.daemon import SelfTestDaemon  # noqa: E402
from edge.daemons.uplink.connection import Backoff  # noqa: E402
from edge.daemons.uplink.daemon import FAILURE_SAVE_EVERY_S  # noqa: E402
from edge.runtime.daemon import STATE_WRITE_TIMEOUT_S  # noqa: E402
from edge.store.outbox import LOOP_WRITE_TIMEOUT_S, Outbox  # noqa: E402

WARM_UP_S = 48 * 3600


def io_counters() -> dict[str, int]:
    """This process's write() bytes (wchar) and the bytes it sent to the disk
    (write_bytes: each page it dirtied, so a page rewritten after an fsync counts again)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {"wchar": int(fields["wchar"]), "write_bytes": int(fields["write_bytes"])}


def file_bytes(database: Path) -> int:
    return sum(os.path.getsize(p) for p in (database, Path(f"{database}-wal")) if p.exists())


def schedule(config, seconds: float, rng: random.Random) -> tuple[list[tuple[float, str]], int]:
    """When the button and the uplink record their state over ``seconds`` of outage, and
    how many times the uplink exits meanwhile (see below)."""
    moments = [(n * BUTTON_STATE_EVERY_S, "button")
               for n in range(1, int(seconds // BUTTON_STATE_EVERY_S) + 1)]
    up = config.uplink
    backoff, restarts, at = Backoff(up.reconnect_min, up.reconnect_max, rng.random), 0, 0.0
    saved = float("-inf")
    while at <= seconds:
        if at - saved >= FAILURE_SAVE_EVERY_S:  # the same error: once a minute
            moments.append((at, "uplink"))
            saved = at
        try:
            at += backoff.next_delay()
        except OverflowError:
            # Before issue 12 Backoff.next_delay overflowed after 1,024 failed attempts
            # (about 6.4 hours at the defaults): the uplink exited and was started again.
            restarts += 1
            backoff = Backoff(up.reconnect_min, up.reconnect_max, rng.random)
            at += backoff.next_delay()
    return sorted(moments), restarts


class FakeClocks:
    """A wall clock and a monotonic clock that move only when told to."""

    def __init__(self):
        self.wall0, self.mono0, self.elapsed = utc_now(), time.monotonic(), 0.0

    def wall(self):
        return self.wall0 + timedelta(seconds=self.elapsed)

    def monotonic(self) -> float:
        return self.mono0 + self.elapsed


class MemoryLog(logging.Handler):
    """Log records kept in memory: a write to stderr would count as written bytes."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


def replay(config, hours: float, seed: int = 1) -> dict:
    database = Path(config.storage.database)
    rng = random.Random(seed)
    clocks = FakeClocks()
    with contextlib.ExitStack() as stack:
        # Each daemon's own connection, opened as the daemons open theirs.
        button = stack.enter_context(Outbox(database, config.identity, checkpoint=False,
                                            write_timeout=LOOP_WRITE_TIMEOUT_S))
        uplink = stack.enter_context(Outbox(database, config.identity,
                                            write_timeout=LOOP_WRITE_TIMEOUT_S))
        bodies = {name: state for name, (state, _) in button.daemons.all().items()}
        stored = {"button": button, "uplink": uplink}
        queued_before = {m.seq for m in uplink.next_queued(100_000)}

        def save(name: str) -> int:
            stored[name].daemons.save(name, bodies[name], timeout=STATE_WRITE_TIMEOUT_S)
            return len(bodies[name].encode())

        for _, name in schedule(config, WARM_UP_S, rng)[0]:
            save(name)
        # The clock-synchronised flag as before the outage: a device that had NTP.
        selftest = SelfTestDaemon(config, clock=clocks.wall, clock_synced=lambda: True,
                                  monotonic=clocks.monotonic)
        selftest.start(stack)

        size_before, io_before = file_bytes(database), io_counters()
        state_bytes, counts = 0, {"button": 0, "uplink": 0, "selftest": 0}
        seconds = hours * 3600
        telemetry, restarts = schedule(config, seconds, rng)
        moments = telemetry + [
            (n * config.health.interval_s, "selftest")
            for n in range(int(seconds // config.health.interval_s) + 1)]
        for at, name in sorted(moments, key=lambda moment: moment[0]):
            clocks.elapsed = at
            if name == "selftest":
                runs = selftest.runs
                for timer in selftest._loop_timers:
                    timer.run_if_due(clocks.monotonic())
                if selftest.runs == runs:
                    raise RuntimeError("the self-test's checks did not run")
                state_bytes += len(bodies_now(button, "selftest"))
            else:
                state_bytes += save(name)
            counts[name] += 1
        io_after, size_after = io_counters(), file_bytes(database)
        events = [m for m in uplink.next_queued(100_000) if m.seq not in queued_before]
    return {
        "hours": hours, "counts": counts, "state_bytes": state_bytes,
        "uplink_restarts": restarts,
        "events": [{"kind": m.kind, "topic": m.topic, "bytes": len(m.payload)} for m in events],
        "event_bytes": sum(len(m.payload) for m in events),
        "file_growth": size_after - size_before, "size_after": size_after,
        "wchar": io_after["wchar"] - io_before["wchar"],
        "write_bytes": io_after["write_bytes"] - io_before["write_bytes"],
    }


def bodies_now(outbox: Outbox, name: str) -> bytes:
    """The state document ``name`` saved last (the self-test's changes with each run)."""
    return outbox.daemons.all()[name][0].encode()


def main() -> int:
    config = load_config(sys.argv[1])
    handler = MemoryLog()
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    result = replay(config, float(sys.argv[2]))
    result["log"] = handler.lines
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
