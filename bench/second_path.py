"""Benchmark of the self-tests and the SMS second path, each figure beside a baseline
measured in the same run.

    .venv/bin/python bench/second_path.py            # about a minute
    .venv/bin/python bench/second_path.py --quick

(a) the end-to-end alarm test through the (simulated) test relay, stage by stage, against
    the plain alarm path of the same device: mock edge -> a subscriber process;
(b) the SMS second path with the broker down: press -> SMS accepted by the modem simulator
    (on a real pseudo-terminal), against sending the same SMS straight through the driver;
(c) one run of the health checks, and the daily integrity check of a 20,000-event outbox,
    against reading that database file once.

The daemons run as processes, as in production. Machines here are noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from alarm_path import Device, Subscriber, pct, prefill  # noqa: E402

from drivers.modem import Modem  # noqa: E402
from edge.config import load_config  # noqa: E402
from edge.daemons.button.latch import reset_alarms  # noqa: E402
from edge.daemons.selftest.alarmtest import AlarmTestRunner, request_test  # noqa: E402
from edge.daemons.selftest.health import HealthChecks  # noqa: E402
from edge.store.outbox import Outbox  # noqa: E402
from edge.tools.localbroker import LocalBroker  # noqa: E402
from edge.tools.watch import Watcher  # noqa: E402
from tests.support.modem_sim import ModemSimulator  # noqa: E402
from tests.support.trust import DUTY_DESK  # noqa: E402


def stats(values: list[float]) -> str:
    return (f"{pct(values, 50) * 1000:8.2f} ms {pct(values, 95) * 1000:8.2f} ms")


class ExtendedDevice(Device):
    """The benchmark device of bench/alarm_path.py, with more configuration."""

    def __init__(self, workdir: Path, port: int, extra: str):
        super().__init__(workdir, port, min_press_ms=10)
        self.config_path.write_text(self.config_path.read_text() + extra)
        self.config = load_config(self.config_path)


def alarm_test(port: int, workdir: Path, tests: int, presses: int) -> dict:
    device = ExtendedDevice(workdir, port, "[outputs]\ntest_relay = { pin = 24 }\n"
                                           "[alarm_test]\nack_timeout_s = 10\n")
    cfg = device.config
    police = Watcher(cfg.broker, cfg.uplink.topic_root, cfg.device.site_id, ack=True,
                     signer=DUTY_DESK,
                     by="bench", client_id="bench-platform", out=io.StringIO())
    subscriber = Subscriber(port, f"{cfg.topic_prefix}/event/alarm")
    try:
        device.start("button")
        device.start("uplink")
        police.start()
        stages: dict[str, list[float]] = {"edge_to_commit": [], "commit_to_sent": [],
                                          "sent_to_ack": [], "total": []}
        with Outbox(cfg.storage.database, cfg.identity) as outbox:
            for _ in range(tests):
                outcome = AlarmTestRunner(cfg, outbox).run(request_test(outbox, "manual"))
                assert outcome.passed, outcome
                for key in stages:
                    stages[key].append(outcome.stages_ms[key] / 1000)
        alarms = []
        for _ in range(presses):  # repeats of one latched alarm: each is published
            reply = device.press(0.02)
            alarms.append(subscriber.wait_for(reply["event"]["id"]) - reply["edge_ticks"])
        reset_alarms(cfg, by="bench")
        return {"stages": stages, "alarm": alarms}
    finally:
        police.stop()
        subscriber.stop()
        device.stop()


def sms_path(port: int, workdir: Path, alarms: int) -> dict:
    with ModemSimulator() as sim:
        device = ExtendedDevice(workdir, port, f"""
[modem]
port = "{sim.port}"
[fallback]
duty_numbers = ["+8613800138000"]
ack_timeout_s = 600
max_sms_per_hour = 1000
""")
        cfg = device.config
        try:
            device.start("button")
            device.start("fallback")  # no uplink: the platform is unreachable
            through_daemon = []
            for n in range(1, alarms + 1):
                reply = device.press(0.02)
                sim.wait_for_messages(n, timeout=30)
                # From the button's edge (CLOCK_MONOTONIC, shared by every process) to
                # the module accepting the SMS's last part.
                through_daemon.append(sim.sent[-1].at - reply["edge_ticks"])
                reset_alarms(cfg, by="bench")
            text = sim.messages()[0][1]
        finally:
            device.stop()
        direct = []
        modem = Modem.open_port(sim.port)
        try:
            for _ in range(alarms):
                started = time.monotonic()
                modem.send_sms("+8613800138000", text)
                direct.append(time.monotonic() - started)
        finally:
            modem.close()
        return {"daemon": through_daemon, "direct": direct, "chars": len(text)}


def health_cost(port: int, workdir: Path, runs: int, events: int) -> dict:
    device = ExtendedDevice(workdir, port, "")
    cfg = device.config
    prefill(cfg, events)
    try:
        device.start("button")
        with Outbox(cfg.storage.database, cfg.identity) as outbox:
            checks = HealthChecks(cfg, outbox)
            checks.run(integrity_due=True)
            timings = []
            for _ in range(runs):
                started = time.perf_counter()
                checks.run()
                timings.append(time.perf_counter() - started)
            started = time.perf_counter()
            checks.run(integrity_due=True)
            integrity = time.perf_counter() - started
        started = time.perf_counter()
        with open(cfg.storage.database, "rb") as db:
            while db.read(1 << 20):
                pass
        read = time.perf_counter() - started
        size = os.path.getsize(cfg.storage.database)
        return {"runs": timings, "integrity": integrity, "read": read, "size": size}
    finally:
        device.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    tests, presses, alarms, runs = (10, 50, 5, 10) if args.quick else (30, 200, 20, 50)
    with tempfile.TemporaryDirectory(prefix="gp-bench-") as tmp, \
            LocalBroker(Path(tmp) / "broker") as broker:
        work = Path(tmp)
        print(f"Guardpost second-path benchmark — {time.strftime('%Y-%m-%d %H:%M')}, "
              f"{platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}"
              "\n")
        result = alarm_test(broker.port, work / "a", tests, presses)
        print(f"(a) alarm test through the test relay, {tests} tests      p50          p95")
        for key, label in (("edge_to_commit", "edge -> committed (filter 10 ms)"),
                           ("commit_to_sent", "committed -> broker PUBACK"),
                           ("sent_to_ack", "PUBACK -> platform acknowledgement"),
                           ("total", "edge -> platform acknowledgement")):
            print(f"    {label:44} {stats(result['stages'][key])}")
        print(f"    baseline: plain alarm, edge -> subscriber, {presses} presses "
              f"{stats(result['alarm'])}")
        ratio = pct(result["stages"]["total"], 50) / pct(result["alarm"], 50)
        print(f"    a test's total / an alarm's delivery (p50): {ratio:.2f} (the test also waits "
              "for the platform's acknowledgement)\n", flush=True)

        sms = sms_path(broker.port, work / "b", alarms)
        print(f"(b) SMS second path, broker down, {alarms} alarms ({sms['chars']}-character "
              "UCS-2 text)   p50          p95")
        print(f"    edge -> SMS accepted by the modem (fallback daemon)  {stats(sms['daemon'])}")
        print(f"    baseline: the same SMS sent straight by the driver    {stats(sms['direct'])}")
        overhead = statistics.median(sms["daemon"]) - statistics.median(sms["direct"])
        print(f"    filter, commit, detection and bookkeeping on top (p50): "
              f"{overhead * 1000:.1f} ms; target: within fallback.ack_timeout_s (10 s)\n",
              flush=True)

        cost = health_cost(broker.port, work / "c", runs, 20_000)
        print(f"(c) health checks ({runs} runs)              "
              f"median {statistics.median(cost['runs']) * 1000:7.2f} ms per run "
              f"(every 300 s by default)")
        print(f"    daily integrity check (quick_check), {cost['size'] / 2**20:.1f} MB outbox "
              f"{cost['integrity'] * 1000:7.1f} ms")
        print(f"    baseline: reading that file once                      "
              f"{cost['read'] * 1000:7.1f} ms  (ratio {cost['integrity'] / cost['read']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
