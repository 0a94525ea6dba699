"""Fleet sizing: the alarm round trip with 500 and 5,000 simulated devices on one local
Mosquitto, beside a single device measured in the same run, and devices per core.

Each size runs ``guardpost fleet-sim`` against a fresh Mosquitto for ``--duration``
seconds after every device is up, with the same fleet-wide alarm and test rates (so the
sizes differ by their heartbeats, connections and retained state, not by their alarms),
heartbeats at the contract's 30 s and two 60 kB snapshots after every alarm and test.
The round trip is the device's publish -> the platform side's signed acknowledgement
back at the device. Printed as ratios to the one-device run: absolute times on a shared
two-core machine say little.

    /work/main/.venv/bin/python bench/fleet.py [--sizes 1,500,5000] [--duration 30]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._floor import ratio
from edge.tools.localbroker import LocalBroker


def fleet_sim_command(devices: int, brokers: str, args, *extra: str) -> list[str]:
    """``guardpost fleet-sim`` as every fleet bench runs it: the same fleet-wide alarm and
    test rates whatever the size, heartbeats at the contract's 30 s, two 60 kB snapshots
    after every alarm and test."""
    return [sys.executable, "-m", "edge.tools.cli", "--log-level", "WARNING",
            "fleet-sim", "--devices", str(devices), "--broker", brokers,
            "--duration", str(args.duration), "--alarm-every", str(args.alarm_every),
            "--test-every", str(args.alarm_every * 3), "--heartbeat", "30",
            "--snapshots", "2", "--snapshot-kb", "60", "--seed", "14", *extra]


def fleet_arguments(parser: argparse.ArgumentParser, sizes: str) -> None:
    parser.add_argument("--sizes", default=sizes, help="fleet sizes besides the baseline")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--alarm-every", type=float, default=0.5,
                        help="mean seconds between two alarms in the whole fleet")


def run_size(devices: int, args, workdir: Path) -> dict:
    with LocalBroker(workdir / f"broker-{devices}") as broker:
        report_path = workdir / f"fleet-{devices}.json"
        command = fleet_sim_command(devices, f"{broker.host}:{broker.port}", args,
                                    "--broker-pid", str(broker._process.pid),
                                    "--json", str(report_path))
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                       timeout=args.duration + 600)
        return json.loads(report_path.read_text())


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    fleet_arguments(parser, "500,5000")
    args = parser.parse_args()
    sizes = [1] + [int(n) for n in args.sizes.split(",") if int(n) != 1]
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as directory:
        reports = {n: run_size(n, args, Path(directory)) for n in sizes}
    base = reports[1]["round_trip_ms"]
    print(f"alarm + test round trip (publish -> ack at the device), {args.duration:.0f} s "
          f"per size, an alarm every {args.alarm_every} s in the fleet; one device: "
          f"p50 {base['p50']} ms, p99 {base['p99']} ms")
    print(f"{'devices':>8} {'events':>7} {'acked':>6} {'p50/base':>9} {'p99/base':>9} "
          f"{'sim cores':>10} {'dev/core':>9} {'broker cores':>13} {'broker msg/s in (1 min)':>24}")
    for n, report in reports.items():
        trip = report["round_trip_ms"]
        received = report["broker"].get("load/messages/received/1min", "-")
        print(f"{n:>8} {report['events']:>7} {report['acks']:>6} "
              f"{ratio(trip['p50'], base['p50']):>9} {ratio(trip['p99'], base['p99']):>9} "
              f"{report['sim_cpu_cores']:>10} {report['devices_per_core'] or '-':>9} "
              f"{_or_dash(report['broker_cpu_cores']):>13} {received:>24}")
    print("(devices per core: the simulator's, one paho client per device; the broker's "
          "cores beside it. Absolute p99 per size: " + ", ".join(
              f"{n}: {r['round_trip_ms']['p99']} ms" for n, r in reports.items()) + ")")


if __name__ == "__main__":
    main()
