"""The duty-desk console at fleet size: alarm publish -> console receipt with 5,000
simulated devices on one local Mosquitto (heartbeats running), beside 1 device in the
same run. The issue's goal: p99 <= 100 ms at 5,000.

Each size: a fresh Mosquitto, the console's client headless (model + MQTT client, no
screen: :class:`edge.console.client.ConsoleClient` in this process, verifying every
event with the fleet's device keys), and ``guardpost fleet-sim`` in its own process
(with its own platform side acknowledging, as a real platform would beside the desk).
The publish time is the simulator's own record of each event (CLOCK_MONOTONIC, shared by
every process on the machine); the receipt is when the console's model holds the verified
alarm (its bell hook). Figures are printed as measured and as ratios to the one-device
run: absolute times on a shared two-core machine say little.

    /work/main/.venv/bin/python bench/console.py [--sizes 5000] [--duration 30]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._floor import ratio
from bench.fleet import fleet_arguments, fleet_sim_command
from edge.console.client import ConsoleClient, ConsoleOptions
from edge.console.fleet import Fleet
from edge.platform import DeviceKeys
from edge.tools.localbroker import LocalBroker


def percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    ordered = sorted(seconds)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {"count": len(ordered), "p50": at(0.5), "p99": at(0.99),
            "max": round(ordered[-1] * 1000, 2)}


def run_size(devices: int, args, workdir: Path) -> dict:
    with LocalBroker(workdir / f"broker-{devices}") as broker:
        fleet = Fleet()
        received: dict[str, float] = {}

        def on_alarm(alarm) -> None:
            received.setdefault(alarm.event_id, time.monotonic())

        client = ConsoleClient(ConsoleOptions(broker.host, broker.port,
                                              platform_id=f"bench-console-{devices}"),
                               fleet, on_alarm=on_alarm)
        client.start()
        if not client.subscribed.wait(10):
            raise SystemExit("the console did not subscribe")
        keys_path = workdir / f"keys-{devices}.json"
        report_path = workdir / f"fleet-{devices}.json"
        command = fleet_sim_command(devices, f"{broker.host}:{broker.port}", args,
                                    "--device-keys-out", str(keys_path),
                                    "--json", str(report_path))
        sim = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        ready = threading.Event()

        def read() -> None:
            for line in sim.stdout:
                if line.startswith("READY"):
                    # Alarms begin after READY; the keys were written before it.
                    client.device_keys = DeviceKeys.load(keys_path)
                    ready.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        # The desk's view of the links near the end of the run, while every device is up.
        if not ready.wait(600):
            sim.kill()
            raise SystemExit("the fleet did not come up")
        time.sleep(args.duration * 0.9)
        counts = fleet.counts(time.monotonic())
        sim.wait(timeout=args.duration + 600)
        reader.join(5)
        client.stop()
        report = json.loads(report_path.read_text())
    published = report["published"]
    latencies = [received[event_id] - at for event_id, at in published.items()
                 if event_id in received]
    with fleet.lock:
        alarms = len(fleet.alarms)
        not_verified, ignored = fleet.not_verified, fleet.ignored
    return {"devices": devices, "alarms_at_console": alarms,
            "events_published": report["events"], "console_ms": percentiles(latencies),
            "platform_ms": report["to_platform_ms"], "round_trip_ms": report["round_trip_ms"],
            "not_verified": not_verified, "ignored": ignored, "links": counts,
            "broker_cpu_cores": report["broker_cpu_cores"],
            "sim_cpu_cores": report["sim_cpu_cores"]}


def screen_refresh_ms(devices: int, alarms: int = 100) -> float:
    """The median time of one redraw of the Textual screen (headless) with ``devices``
    devices online and ``alarms`` alarms and as many tests: the redraw runs every second
    on the screen's thread. The model is fed directly, as the client would."""
    import asyncio

    from edge.console.app import ConsoleApp

    fleet = Fleet()
    now = time.monotonic()
    for n in range(devices):
        fleet.status(f"school-{n:05d}", "gate-1", {"schema": "guardpost/status@1",
                                                   "state": "online", "session": 1}, now)
    for n in range(2 * alarms):
        fleet.event(f"school-{n % devices:05d}", "gate-1", {
            "schema": "guardpost/event@1", "id": f"event-{n}", "location": "Gate",
            "kind": "alarm" if n % 2 else "test"}, now)
    app = ConsoleApp(fleet)
    times: list[float] = []

    async def measure() -> None:
        async with app.run_test(size=(200, 60)) as pilot:
            await pilot.pause(0.2)
            for _ in range(21):
                started = time.perf_counter()
                app.refresh_tables()
                await pilot.pause(0)
                times.append(time.perf_counter() - started)

    asyncio.run(measure())
    return round(sorted(times)[len(times) // 2] * 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    fleet_arguments(parser, "5000")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    sizes = [1] + [int(n) for n in args.sizes.split(",") if int(n) != 1]
    with tempfile.TemporaryDirectory(prefix="bench-console-") as directory:
        results = {n: run_size(n, args, Path(directory)) for n in sizes}
    base = results[1]["console_ms"]
    print(f"alarm publish -> console receipt (verified, in the model), {args.duration:.0f} s "
          f"per size, an alarm every {args.alarm_every} s in the fleet, heartbeats every "
          f"30 s; one device: p50 {base['p50']} ms, p99 {base['p99']} ms")
    print(f"{'devices':>8} {'alarms':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'p50/base':>9} {'p99/base':>9} {'online':>7} {'lost':>5} {'unverified':>11} "
          f"{'ignored':>8}")
    for n, r in results.items():
        c = r["console_ms"]
        print(f"{n:>8} {c['count']:>7} {c['p50']!s:>8} {c['p99']!s:>8} {c['max']!s:>8} "
              f"{ratio(c['p50'], base['p50']):>9} {ratio(c['p99'], base['p99']):>9} "
              f"{r['links']['online']:>7} {r['links']['lost']:>5} {r['not_verified']:>11} "
              f"{r['ignored']:>8}")
    print("(the fleet-sim's own platform side, for comparison, p99 publish -> its receipt: "
          + ", ".join(f"{n}: {r['platform_ms']['p99']} ms" for n, r in results.items()) + ")")
    screens = {n: screen_refresh_ms(n) for n in sizes}
    print("the screen's redraw (every second; headless, 100 alarms and 100 tests), median: "
          + ", ".join(f"{n} devices {ms} ms ({ratio(ms, screens[1])} x 1 device)"
                      for n, ms in screens.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"sizes": results, "screen_ms": screens},
                                              indent=1))


if __name__ == "__main__":
    main()
