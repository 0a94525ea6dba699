"""What a reading of the device's one wall clock costs (edge/runtime/clock.py).

Every event reads the wall clock a few times (occurred_at, committed_at, its id) and
asks once whether the clock is synchronised. Printed beside ``datetime.now(UTC)`` and
``adjtimex`` read directly, and beside one durable commit (the floor of bench/_floor.py),
all measured in this run: as ratios, since this machine is noisy.

    .venv/bin/python bench/clock.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import timeit
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._floor import plain_commit_latencies
from edge.contract.events import utc_now
from edge.runtime import clock


def per_call_ns(func, number: int) -> float:
    """The best of five runs of ``number`` calls, per call (the least disturbed)."""
    return min(timeit.repeat(func, number=number, repeat=5)) / number * 1e9


def simulated(path: str | None) -> None:
    """Use the simulation file ``path`` from the next reading on (None: the real clock)."""
    if path is None:
        os.environ.pop(clock.SIM_CLOCK_ENV, None)
    else:
        os.environ[clock.SIM_CLOCK_ENV] = path
    clock._simulation.cache_clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    number = 20_000 if args.quick else 200_000
    with tempfile.TemporaryDirectory() as scratch:
        sim_file = Path(scratch) / "clock.json"
        sim_file.write_text(json.dumps({"offset_s": 86400.0, "synced": True}))
        commits = plain_commit_latencies(Path(scratch) / "floor.db", 200 if args.quick else 1000,
                                         b"x" * 400)
        floor_ns = statistics.median(commits) * 1e9

        base_now = per_call_ns(lambda: datetime.now(UTC), number)
        base_sync = per_call_ns(clock._kernel_synchronised, number)
        simulated(None)
        rows = [("wall_now(), no simulation", per_call_ns(clock.wall_now, number), base_now),
                ("utc_now(), no simulation", per_call_ns(utc_now, number), base_now),
                ("clock_synchronised(), no simulation",
                 per_call_ns(clock.clock_synchronised, number), base_sync)]
        simulated(str(sim_file))
        clock.wall_now()  # the first reading parses the file
        rows += [("wall_now(), simulated (stat per reading)",
                  per_call_ns(clock.wall_now, number), base_now),
                 ("clock_synchronised(), simulated",
                  per_call_ns(clock.clock_synchronised, number), base_sync)]
        simulated(None)

    print(f"baselines in this run: datetime.now(UTC) {base_now:.0f} ns, adjtimex "
          f"{base_sync:.0f} ns, one durable commit (p50) {floor_ns / 1000:.0f} µs")
    print(f"{'reading':45} {'ns/call':>8} {'× baseline':>10} {'% of a commit':>14}")
    for name, ns, base in rows:
        print(f"{name:45} {ns:8.0f} {ns / base:10.2f} {100 * ns / floor_ns:13.3f}%")


if __name__ == "__main__":
    main()
