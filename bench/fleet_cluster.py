"""The fleet on a three-node NATS cluster (JetStream + MQTT 3.1.1) that loses a node, beside
the same fleet on one local Mosquitto measured in the same run.

Both runs: ``guardpost fleet-sim --protocol 3.1.1`` with ``--devices`` devices (default
1,000), the same seed, alarm and test rates, heartbeats every 30 s and two 60 kB snapshots
after each alarm and test, for ``--duration`` seconds after every device is up. On the
cluster the devices are spread over the three nodes, and ``--kill-after`` seconds after
READY the bench SIGKILLs one node (as a machine that loses power), noting the moment on
the monotonic clock, which the simulator shares (CLOCK_MONOTONIC is machine-wide).

Printed: the alarm round trip (device publish -> the platform's signed acknowledgement
back at the device) p50/p99 on the cluster before the loss and over the whole run, as
ratios to Mosquitto's; the time from the node's loss to every device reconnected and
to every event of that span acknowledged; how many devices each node held before and
after; CPU of the brokers. Absolute times on a shared two-core machine say little.

    /work/main/.venv/bin/python bench/fleet_cluster.py [--devices 1000] [--duration 60]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._floor import ratio
from bench._proc import cpu_seconds
from bench.fleet import fleet_sim_command
from edge.tools.localbroker import LocalBroker
from tests.support.nats_cluster import NatsCluster

KILLED = 1  # the node that dies: the platform side starts on node 0, as a desk would stay


def fleet_command(args, brokers: str, report: Path) -> list[str]:
    """The fleet of bench/fleet.py, over MQTT 3.1.1 (all NATS speaks) on both brokers."""
    return fleet_sim_command(args.devices, brokers, args, "--protocol", "3.1.1",
                             "--drain", "120", "--json", str(report))


def run_fleet(command: list[str], timeout: float, on_ready=None) -> float:
    """Run the simulator; ``on_ready()`` once it prints READY. Seconds until READY."""
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    ready_after = float("nan")
    try:
        for line in process.stdout:
            if line.startswith("READY"):
                ready_after = time.monotonic() - started
                if on_ready is not None:
                    on_ready()
        if process.wait(timeout) != 0:
            raise RuntimeError(f"fleet-sim exited with {process.returncode}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return ready_after


def on_mosquitto(args, workdir: Path) -> tuple[dict, float, float]:
    with LocalBroker(workdir / "mosquitto") as broker:
        pid = broker._process.pid
        cpu = cpu_seconds(pid)
        report = workdir / "mosquitto.json"
        ready = run_fleet(fleet_command(args, f"{broker.host}:{broker.port}", report),
                          args.duration + 600)
        return json.loads(report.read_text()), ready, cpu_seconds(pid) - cpu


def on_cluster(args, workdir: Path) -> tuple[dict, float, float, float]:
    with NatsCluster(workdir / "nats") as cluster:
        pids = [node.process.pid for node in cluster.nodes]
        cpu = {pid: cpu_seconds(pid) for pid in pids}
        killed_at: list[float] = []

        def kill_later() -> None:
            time.sleep(args.kill_after)  # a bench, not a test: the fleet runs meanwhile
            cpu[pids[KILLED]] = cpu_seconds(pids[KILLED]) - cpu[pids[KILLED]]
            killed_at.append(time.monotonic())
            cluster.kill(KILLED)

        report = workdir / "cluster.json"
        killer = threading.Thread(target=kill_later, daemon=True)
        ready = run_fleet(fleet_command(args, ",".join(cluster.addresses), report),
                          args.duration + 600, on_ready=killer.start)
        killer.join()
        used = sum(cpu[pid] if pid == pids[KILLED] else cpu_seconds(pid) - cpu[pid]
                   for pid in pids)
        return json.loads(report.read_text()), ready, used, killed_at[0]


def seconds(value) -> str:
    return "-" if value is None else f"{value:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=60.0,
                        help="seconds each run lasts after every device is up")
    parser.add_argument("--kill-after", type=float, default=20.0,
                        help="seconds after READY the cluster loses a node")
    parser.add_argument("--alarm-every", type=float, default=0.5,
                        help="mean seconds between two alarms in the whole fleet")
    parser.add_argument("--keep", type=Path,
                        help="keep the simulator's reports and the nodes' logs here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fleet-cluster-") as directory:
        base, base_ready, base_cpu = on_mosquitto(args, Path(directory))
        nats, nats_ready, nats_cpu, killed_at = on_cluster(args, Path(directory))
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for path in Path(directory).glob("**/*"):
                if path.suffix in (".json", ".log"):
                    shutil.copy(path, args.keep / path.name)

    trip, whole = base["round_trip_ms"], nats["round_trip_ms"]
    failover = nats["failover"] or {}
    before = failover.get("round_trip_before_loss_ms") or {}
    since = failover.get("round_trip_since_loss_ms") or {}
    print(f"{args.devices} devices, MQTT 3.1.1, {args.duration:.0f} s after READY, an alarm "
          f"every {args.alarm_every} s and a test every {args.alarm_every * 3} s in the fleet; "
          f"NATS node {KILLED + 1} of 3 SIGKILLed {args.kill_after:.0f} s after READY")
    print(f"{'':34} {'Mosquitto 2.0.11':>18} {'NATS 2.9.10 x3':>16} {'ratio':>7}")
    rows = [
        ("every device up (READY) after", f"{base_ready:.2f} s", f"{nats_ready:.2f} s",
         ratio(nats_ready, base_ready)),
        ("round trip p50, before the loss", f"{trip['p50']} ms", f"{before.get('p50')} ms",
         ratio(before.get("p50"), trip["p50"])),
        ("round trip p99, before the loss", f"{trip['p99']} ms", f"{before.get('p99')} ms",
         ratio(before.get("p99"), trip["p99"])),
        ("round trip p50, since the loss", f"{trip['p50']} ms", f"{since.get('p50')} ms",
         ratio(since.get("p50"), trip["p50"])),
        ("round trip p99, since the loss", f"{trip['p99']} ms", f"{since.get('p99')} ms",
         ratio(since.get("p99"), trip["p99"])),
        ("round trip max, whole run", f"{trip['max']} ms", f"{whole['max']} ms",
         ratio(whole["max"], trip["max"])),
        ("events acknowledged / published", f"{base['acks']}/{base['events']}",
         f"{nats['acks']}/{nats['events']}", ""),
        ("broker CPU (all nodes), core-s", f"{base_cpu:.2f}", f"{nats_cpu:.2f}",
         ratio(nats_cpu, base_cpu)),
    ]
    for name, left, right, r in rows:
        print(f"{name:34} {left:>18} {right:>16} {r:>7}")
    all_back = failover.get("all_reconnected_at")
    first = failover.get("first_lost_at")
    print(f"the first device lost its link "
          f"{seconds(None if first is None else first - killed_at)} after the kill")
    print(f"node loss -> every device reconnected: "
          f"{seconds(None if all_back is None else all_back - killed_at)} "
          f"({failover.get('devices_lost', 0)} devices lost their link "
          f"{failover.get('losses', 0)} times, "
          f"{failover.get('not_reconnected', '-')} not back; gap per device p50 "
          f"{(failover.get('gap_ms') or {}).get('p50')} ms, max "
          f"{(failover.get('gap_ms') or {}).get('max')} ms)")
    last = failover.get("last_delayed_ack_at")
    print(f"node loss -> the last acknowledgement the loss delayed (round trip over 1 s): "
          f"{seconds(None if last is None else last - killed_at)} "
          f"({failover.get('events_delayed')} delayed; "
          f"{failover.get('events_since_loss_acked')}/{failover.get('events_since_loss')} "
          f"events published since the loss acknowledged"
          f"{'' if failover.get('all_acked_s') is not None else ', NOT all'})")
    print(f"devices per node at READY: {nats['devices_per_broker_at_ready']}; at the end: "
          f"{nats['devices_per_broker_at_end']}; resent events {nats['resent']} "
          f"(Mosquitto run: {base['resent']})")


if __name__ == "__main__":
    main()
