"""The one benchmark table (issue 12): every figure beside a baseline measured in the same
run, in one process tree, printed as one Markdown table.

    .venv/bin/python bench/table.py            # the full run (about five minutes on 2 CPUs)
    .venv/bin/python bench/table.py --quick    # smaller counts: a smoke check (about 70 s)

It measures with the other scripts' own functions (bench/alarm_path.py, bench/outbox.py,
bench/camera.py), so a figure here is the same measurement as there:

1. alarm latency, mock GPIO edge -> subscriber process, against one durable SQLite commit
   plus one paho QoS 1 publish -> PUBACK (the raw floor);
2. backlog drain against raw paho pipelined QoS 1 (the same window, the same listener);
3. durable enqueue (a burst through the button's recorder, and one per commit) and
   dequeue + confirm, against persist-queue's SQLiteAckQueue, both WAL + synchronous=FULL;
4. press -> first snapshot durable, against the same durable steps without the daemons;
   press -> clip durable is not built yet (issue 15);
5. idle CPU and memory of every process of ``guardpost run all`` (camera and fallback
   included), against a bare interpreter that imported the same heavy libraries;
6. boot to armed, to every daemon started and to the birth at the platform, against an
   interpreter that imports paho and sqlite3 and exits;
7. what a day of broker outage costs the outbox at the default configuration
   (bench/_outage_day.py), against the bytes of the payloads themselves.

The results also go to bench/results/table-<stamp>.json. Machines here are noisy: read
the ratios. No figure is judged against a threshold here; the README says the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import paho.mqtt
import persistqueue

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import outbox as outbox_bench  # noqa: E402
from alarm_path import (  # noqa: E402
    Subscriber,
    alarm_latency,
    drain,
    pct,
    raw_floor,
    raw_paho_pipelined,
)
from camera import FPS, SIZE, snapshot_latencies  # noqa: E402

from bench._floor import durable_file_latencies  # noqa: E402
from bench._proc import cpu_seconds, pss_mb, rss_mb  # noqa: E402
from bench._whole_device import LeanPlatform, WholeDevice, write_config  # noqa: E402
from drivers.camera.testcard import write_video  # noqa: E402
from edge.store.outbox import Outbox  # noqa: E402
from edge.tools.localbroker import LocalBroker, free_port, mosquitto_binary  # noqa: E402
from tests.support.modem_sim import ModemSimulator  # noqa: E402

WINDOW = 20  # the uplink's default inflight_window (= Mosquitto's Receive Maximum)
BARE_IMPORTS = "import paho.mqtt.client, sqlite3"


@dataclass
class Row:
    figure: str
    guardpost: str
    baseline: str
    ratio: str
    data: dict = field(default_factory=dict)


@dataclass
class Sizes:
    """The counts of one mode."""

    presses: int
    backlog: int
    queue_items: int
    queue_rounds: int
    alarms: int
    boots: int
    idle_s: float
    outage_days: int

    @classmethod
    def of(cls, quick: bool) -> Sizes:
        if quick:
            return cls(presses=200, backlog=10_000, queue_items=1000, queue_rounds=2,
                       alarms=10, boots=2, idle_s=10.0, outage_days=1)
        return cls(presses=1000, backlog=100_000, queue_items=5000, queue_rounds=5,
                   alarms=30, boots=5, idle_s=60.0, outage_days=3)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds >= 0.1 else f"{seconds * 1000:.2f} ms"


def times(ours: float, base: float) -> str:
    return f"{ours / base:.2f}×"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


# -- 1, 2: the alarm path ------------------------------------------------------------------

def alarm_rows(port: int, work: Path, sizes: Sizes) -> list[Row]:
    say(f"1. alarm latency, {sizes.presses} presses, and the raw floor")
    work.mkdir(parents=True)
    floor = raw_floor(port, work, sizes.presses)["both"]
    latency = alarm_latency(port, work / "latency", sizes.presses, 0)
    p50, p99, b50, b99 = pct(latency, 50), pct(latency, 99), pct(floor, 50), pct(floor, 99)
    row = Row("alarm latency p50 / p99, mock GPIO edge → subscriber process "
              f"({sizes.presses} presses, glitch filter off)",
              f"{ms(p50)} / {ms(p99)}",
              f"{ms(b50)} / {ms(b99)}: one SQLite commit (WAL, FULL) + one paho QoS 1 "
              "publish→PUBACK",
              f"{times(p50, b50)} / {times(p99, b99)}",
              {"p50_ms": p50 * 1000, "p99_ms": p99 * 1000, "floor_p50_ms": b50 * 1000,
               "floor_p99_ms": b99 * 1000, "n": len(latency)})

    say(f"2. backlog drain, {sizes.backlog:,} events, and raw paho pipelined")
    drained = drain(port, work / "drain", sizes.backlog, live_alarms=False)
    listening = Subscriber(port, "bench/pipelined", quiet=True)  # as the drain's platform
    try:
        raw = raw_paho_pipelined(port, sizes.backlog, WINDOW, drained["payload"])
    finally:
        listening.stop()
    drain_row = Row(f"backlog drain, {sizes.backlog:,} queued events → PUBACK → marked sent",
                    f"{drained['rate']:,.0f} events/s",
                    f"{raw:,.0f} msg/s: raw paho pipelined QoS 1, window {WINDOW}, same "
                    "payload and listener",
                    f"{drained['rate'] / raw:.0%}",
                    {"events_per_s": drained["rate"], "raw_per_s": raw,
                     "events": sizes.backlog})
    return [row, drain_row]


# -- 3: the outbox against persist-queue --------------------------------------------------

def queue_rows(sizes: Sizes) -> list[Row]:
    """bench/outbox.py's comparisons in ``sizes.queue_rounds`` short rounds, each ours right
    after persist-queue's: a neighbour's burst of disk writes then hits one round, not a
    whole series. Rates and ratios are the medians over the rounds."""
    items = sizes.queue_items // sizes.queue_rounds
    say(f"3. the outbox against persist-queue {persistqueue.__version__}, "
        f"{sizes.queue_rounds} rounds of {items:,} items")
    rounds = []
    with tempfile.TemporaryDirectory(dir=ROOT / "bench", prefix=".outbox-") as tmp:
        for n in range(sizes.queue_rounds):
            directory = Path(tmp) / f"round-{n}"
            directory.mkdir()
            single = outbox_bench.bench_queue(directory, items)
            threads = outbox_bench.bench_concurrent(directory, items)
            rounds.append({"burst": threads["worker"], **single})

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    def ratio(ours: str, theirs: str) -> str:
        return f"{statistics.median(r[ours] / r[theirs] for r in rounds):.2f}×"

    base = f"{median('put_theirs'):,.0f} /s: `SQLiteAckQueue.put`, one commit each"
    return [
        Row("durable enqueue, a burst of presses through the button's recorder (group commit)",
            f"{median('burst'):,.0f} /s", base, ratio("burst", "put_theirs"), {"rounds": rounds}),
        Row("durable enqueue, one alarm per commit (`Outbox.commit_event`)",
            f"{median('put_ours'):,.0f} /s", base, ratio("put_ours", "put_theirs")),
        Row("dequeue + confirm (the uplink's way: a window of rows, one mark per batch)",
            f"{median('get_ours'):,.0f} /s",
            f"{median('get_theirs'):,.0f} /s: `SQLiteAckQueue.get` + `ack`",
            ratio("get_ours", "get_theirs")),
    ]


# -- 4, 5, 6: the whole device --------------------------------------------------------------

def bare_interpreter(imports: str) -> subprocess.Popen:
    """An interpreter that imported ``imports`` and idles; returns once it has."""
    process = subprocess.Popen(
        [sys.executable, "-c", f"{imports}; import signal; print('ready', flush=True); "
         "signal.pause()"], stdout=subprocess.PIPE, text=True)
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError(f"{imports!r} failed")
    return process


def boot_baseline(count: int) -> list[float]:
    """Seconds from exec to exit of an interpreter importing paho and sqlite3."""
    spent = []
    for _ in range(count):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", BARE_IMPORTS], check=True)
        spent.append(time.monotonic() - started)
    return spent


def idle_costs(pids: dict[str, int], seconds: float) -> dict[str, dict]:
    """CPU (share of one core over ``seconds``), RSS and PSS (MiB) of each process."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.monotonic()
    threading.Event().wait(seconds)
    spent = time.monotonic() - started
    return {name: {"cpu": (cpu_seconds(pid) - before[name]) / spent, "rss_mb": rss_mb(pid),
                   "pss_mb": pss_mb(pid)} for name, pid in pids.items()}


def idle_text(cost: dict) -> str:
    return f"{cost['cpu']:.3%} CPU · RSS {cost['rss_mb']:.1f} MiB · PSS {cost['pss_mb']:.1f} MiB"


def device_rows(port: int, work: Path, sizes: Sizes) -> list[Row]:
    say(f"4-6. `run all` with a camera and a modem: {sizes.boots} boots, {sizes.idle_s:g} s "
        f"idle, {sizes.alarms} alarms with snapshots")
    work.mkdir(parents=True)
    video = write_video(work / "gate-720p.avi", [("counter", 8.0)], fps=FPS, size=SIZE)
    with ModemSimulator() as modem:
        path = write_config(work / "device", port, video=video, modem_port=modem.port,
                            press_filter=False)
        device = WholeDevice(path)
        police = LeanPlatform("127.0.0.1", port, device.config.topic_prefix, ack=True,
                              client_id="bench-platform").start()
        try:
            bare_boot = boot_baseline(sizes.boots)  # before the device loads the machine
            boots = []
            for n in range(sizes.boots):
                if n:
                    device.stop()
                boots.append(device.boot(police))
                print(f"   boot {n + 1}: " + ", ".join(f"{k} {v * 1000:.0f} ms"
                                                       for k, v in boots[-1].items()),
                      flush=True)
            threading.Event().wait(5.0)  # the camera's stream and ring under way
            bare = {"paho": bare_interpreter(BARE_IMPORTS),
                    "cv2": bare_interpreter(f"{BARE_IMPORTS}, cv2, numpy")}
            try:
                pids = device.daemon_pids() | {f"bare-{k}": p.pid for k, p in bare.items()}
                idle = idle_costs(pids, sizes.idle_s)
            finally:
                for process in bare.values():
                    process.terminate()
                    process.wait(10)
            snapshots = snapshot_latencies(device.config, device.press, sizes.alarms)
        finally:
            device.close()
            police.stop()
        with Outbox(device.config.storage.database, device.config.identity) as outbox:
            [jpeg_bytes] = outbox.db.execute(
                "SELECT CAST(avg(size) AS INTEGER) FROM snapshots").fetchone()
    floor = durable_file_latencies(work / "snapshot-floor", os.urandom(jpeg_bytes),
                                   sizes.alarms)
    return (snapshot_rows(snapshots, floor, jpeg_bytes) + idle_rows(idle, sizes.idle_s)
            + boot_rows(boots, bare_boot))


def snapshot_rows(latencies: list[float], floor: list[float], jpeg_bytes: int) -> list[Row]:
    p50, p95, b50, b95 = pct(latencies, 50), pct(latencies, 95), pct(floor, 50), pct(floor, 95)
    return [
        Row(f"press → first snapshot JPEG durable, p50 / p95 ({len(latencies)} alarms, "
            "1280×720 25 fps test card, camera defaults)",
            f"{ms(p50)} / {ms(p95)}",
            f"{ms(b50)} / {ms(b95)}: the same durable steps alone (new directory, a "
            f"{jpeg_bytes / 1000:.0f} kB file written, fsync'd, renamed, directory synced, "
            "one SQLite commit)",
            f"{times(p50, b50)} / {times(p95, b95)}",
            {"p50_ms": p50 * 1000, "p95_ms": p95 * 1000, "floor_p50_ms": b50 * 1000,
             "floor_p95_ms": b95 * 1000, "n": len(latencies), "jpeg_bytes": jpeg_bytes}),
        Row("press → clip durable", "not built yet (issue 15)", "—", "—"),
    ]


def idle_rows(idle: dict[str, dict], seconds: float) -> list[Row]:
    rows = []
    daemons = [name for name in idle if not name.startswith("bare-")]
    for name in daemons:
        base = idle["bare-cv2" if name == "camera" else "bare-paho"]
        libraries = "paho, sqlite3, cv2, numpy" if name == "camera" else "paho, sqlite3"
        rows.append(Row(
            f"idle, {'`run all` supervisor' if name == 'supervisor' else f'{name} daemon'} "
            f"({seconds:g} s)", idle_text(idle[name]),
            f"{idle_text(base)}: bare interpreter after importing {libraries}",
            f"PSS {times(idle[name]['pss_mb'], base['pss_mb'])}",
            {"ours": idle[name], "bare": base}))
    total = {"cpu": sum(idle[n]["cpu"] for n in daemons),
             "rss_mb": sum(idle[n]["rss_mb"] for n in daemons),
             "pss_mb": sum(idle[n]["pss_mb"] for n in daemons)}
    bare_total = {key: sum(idle["bare-cv2" if n == "camera" else "bare-paho"][key]
                           for n in daemons) for key in total}
    rows.append(Row(f"idle, all {len(daemons)} processes together", idle_text(total),
                    f"{idle_text(bare_total)}: as many bare interpreters",
                    f"PSS {times(total['pss_mb'], bare_total['pss_mb'])}",
                    {"ours": total, "bare": bare_total}))
    return rows


def boot_rows(boots: list[dict], bare: list[float]) -> list[Row]:
    base = statistics.median(bare)
    baseline = f"{ms(base)}: `python -c \"{BARE_IMPORTS}\"`, exec → exit"
    rows = []
    for key, label in (("button_ready", "boot → armed: `run all` exec → button daemon READY"),
                       ("all_ready", "boot → every daemon started (the supervisor's READY)"),
                       ("birth", "boot → the platform receives the birth (`online`)")):
        values = [boot[key] for boot in boots]
        median = statistics.median(values)
        rows.append(Row(f"{label}, median of {len(values)}", ms(median), baseline,
                        times(median, base), {"seconds": values, "bare_seconds": bare}))
    return rows


# -- 7: a broker outage ----------------------------------------------------------------------

def outage_rows(work: Path, sizes: Sizes) -> list[Row]:
    say(f"7. {sizes.outage_days} day(s) of broker outage at the default configuration")
    path = write_config(work / "outage", free_port())  # nothing listens there
    device = WholeDevice(path)
    try:
        device.boot()
        cfg = device.config
        with Outbox(cfg.storage.database, cfg.identity) as outbox:
            deadline = time.monotonic() + 60
            while not _outage_recorded(outbox.daemons.all()):
                if time.monotonic() > deadline:
                    raise TimeoutError("the daemons never recorded the outage")
                threading.Event().wait(0.1)
        device.stop()
        button = device.start_daemon("button")
        try:
            replay = subprocess.run(
                [sys.executable, str(ROOT / "bench" / "_outage_day.py"), str(path),
                 str(24 * sizes.outage_days)], capture_output=True, text=True, cwd=ROOT)
        finally:
            button.terminate()
            button.wait(20)
    finally:
        device.close()
    if replay.returncode != 0:
        raise RuntimeError(f"bench/_outage_day.py failed:\n{replay.stderr}")
    result = json.loads(replay.stdout)
    days = sizes.outage_days
    events = len(result["events"])
    payloads = result["event_bytes"] + result["state_bytes"]
    counts = result["counts"]
    return [
        Row(f"outbox growth per day of outage, default telemetry (database + WAL; "
            f"{days} day(s) simulated)",
            f"{result['file_growth'] / days:,.0f} B/day",
            f"{result['event_bytes'] / days:,.0f} B/day: the payloads of the {events} "
            "event(s) queued (the outage's faults)",
            times(result["file_growth"], result["event_bytes"]) if result["event_bytes"]
            else "—", result),
        Row("written to the disk per day of outage (WAL frames, checkpoints)",
            f"{result['write_bytes'] / days / 1e6:,.2f} MB/day",
            f"{payloads / days / 1e6:,.3f} MB/day: the payloads recorded ({events} events; "
            f"state documents: button ×{counts['button'] // days}, uplink "
            f"×{counts['uplink'] // days}, self-test ×{counts['selftest'] // days} a day; the "
            f"uplink exited {result['uplink_restarts']} time(s), see the notes)",
            times(result["write_bytes"], payloads), {}),
    ]


def _outage_recorded(states: dict) -> bool:
    """Every daemon has recorded its state, the uplink a failed connection."""
    return ({"button", "uplink", "selftest"} <= set(states)
            and "cannot connect" in states["uplink"][0])


def mosquitto_version() -> str:
    first = subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True).stdout
    return first.split("\n", 1)[0].removeprefix("mosquitto version ")


# -- the table -------------------------------------------------------------------------------

def markdown(rows: list[Row]) -> str:
    lines = ["| figure | Guardpost | baseline (same run) | ratio |", "|---|---|---|---|"]
    lines += [f"| {r.figure} | {r.guardpost} | {r.baseline} | {r.ratio} |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts: a smoke check")
    args = parser.parse_args()
    sizes = Sizes.of(args.quick)
    started = time.monotonic()
    machine = {"when": time.strftime("%Y-%m-%d %H:%M"), "mode": "quick" if args.quick else "full",
               "cpus": os.cpu_count(), "python": platform.python_version(),
               "sqlite": sqlite3.sqlite_version, "paho": paho.mqtt.__version__,
               "opencv": cv2.__version__, "persist_queue": persistqueue.__version__}
    print("Guardpost benchmark table — " + ", ".join(f"{k} {v}" for k, v in machine.items()),
          flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gp-bench-table-") as tmp, \
            LocalBroker(Path(tmp) / "broker", persistence=False) as broker:
        work = Path(tmp)
        machine["mosquitto"] = mosquitto_version()
        rows += alarm_rows(broker.port, work / "alarm", sizes)
        rows += queue_rows(sizes)
        rows += device_rows(broker.port, work / "device", sizes)
        rows += outage_rows(work, sizes)
    machine["seconds"] = round(time.monotonic() - started)
    command = f"python bench/table.py{' --quick' if args.quick else ''}"
    print(f"\n{machine['when']}, `{command}`, {machine['seconds']} s\n")
    print(markdown(rows))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"table-{stamp}.json").write_text(json.dumps(
        {"machine": machine, "command": command, "rows": [asdict(r) for r in rows]},
        indent=2, ensure_ascii=False))
    print(f"\n(also in bench/results/table-{stamp}.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
