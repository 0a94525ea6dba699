"""Benchmark of the outbox, every figure beside a baseline measured in the same run.

    .venv/bin/python bench/outbox.py            # the full run (a million rows; minutes)
    .venv/bin/python bench/outbox.py --quick    # 100,000 rows at most, for a quick look

(1) alarm commit latency (``Outbox.commit_event``) at outbox depths 0, 100,000 and
    1,000,000, beside a plain insert into a one-table database (WAL, synchronous=FULL);
(2) a prune of a million-row outbox: the longest hold of the write lock, and the longest
    alarm commit made meanwhile by another process, beside the single ``DELETE`` of
    schema 5 on a copy of the same file;
(3) durable enqueue and dequeue + confirm per second, beside persist-queue's
    ``SQLiteAckQueue`` (both WAL, both synchronous=FULL): one thread, and several threads
    at once (the button daemon's recorder commits what arrives during a commit together);
(4) bytes written to the WAL per alarm (checkpoints off), schema 5's commit beside
    this one's, and persist-queue's put.

Machines here are noisy (three engineers share two cores): read the ratios. Every
database is a real file in a temporary directory on the disk the project lives on.
"""

from __future__ import annotations

import argparse
import fcntl
import multiprocessing
import os
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import persistqueue

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._floor import PlainTable  # noqa: E402
from edge.contract.events import (  # noqa: E402
    ACK_REQUIRED,
    ContactId,
    Event,
    EventDraft,
    EventKind,
    Identity,
    utc_iso,
    utc_now,
    uuid7,
)
from edge.store import schema  # noqa: E402
from edge.store.outbox import Outbox  # noqa: E402
from tests.support.outbox_fill import fill  # noqa: E402

IDENTITY = Identity("bench-school", "gate-1", "Benchmark gate")
KEEP_DAYS = 10  # the prune removes the delivered rows older than this (most of them)


def alarm() -> EventDraft:
    return EventDraft(kind=EventKind.ALARM, code=ContactId.PANIC, occurred_at=utc_now(),
                      clock_synced=True, boot_id="bench", input="gate",
                      detail={"mode": "panic", "held_ms": 120.5})


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.3f} ms"


def row(label: str, value: str, baseline: str, ratio: str = "") -> None:
    print(f"  {label:<44} {value:>16}   baseline {baseline:>16}   {ratio}")


# -- (1) alarm commit latency by depth ------------------------------------------------

def bench_depths(directory: Path, depths: list[int], count: int) -> None:
    print(f"\n(1) alarm commit latency, {count} commits at each depth, each commit beside a "
          "plain insert of the same bytes (interleaved: the machine's noise hits both)")
    path = directory / "depth.db"
    plain = PlainTable(directory / "plain.db")
    with Outbox(path, IDENTITY) as outbox:
        payload = outbox.commit_event(alarm()).payload(IDENTITY)
    filled, empty_p99 = 1, None
    for depth in depths:
        if depth > filled:
            fill(path, IDENTITY, depth - filled, queued=min(1000, depth // 10))
            filled = depth
        ours, floor = [], []
        with Outbox(path, IDENTITY) as outbox:
            for _ in range(count):
                floor.append(plain.commit(payload))
                draft = alarm()
                started = time.perf_counter()
                outbox.commit_event(draft, timeout=0.5)
                ours.append(time.perf_counter() - started)
        filled += count
        p50, p99, base50, base99 = pct(ours, 50), pct(ours, 99), pct(floor, 50), pct(floor, 99)
        empty_p99 = empty_p99 or p99
        row(f"depth {depth:>9,}: p50", ms(p50), ms(base50), f"{p50 / base50:.2f}x the floor")
        row(f"depth {depth:>9,}: p99", ms(p99), ms(base99),
            f"{p99 / base99:.2f}x the floor; {p99 / empty_p99:.2f}x its p99 at depth 0 "
            "(goal <= 1.5x)")
    plain.close()


# -- (2) the prune ----------------------------------------------------------------------

def _alarm_committer(path: str, stop, results) -> None:
    """Another process (the button daemon): an alarm every 5 ms, each timed."""
    times, failures = [], 0
    with Outbox(path, IDENTITY, checkpoint=False) as outbox:
        while not stop.is_set():
            draft = alarm()
            started = time.perf_counter()
            while True:
                try:
                    outbox.commit_event(draft, timeout=0.5)
                    break
                except TimeoutError:
                    failures += 1  # a failed commit: the recorder retries it
            times.append(time.perf_counter() - started)
            stop.wait(0.005)
    results.put((times, failures))


class _TimedOutbox(Outbox):
    """An outbox that records how long each of its transactions held the write lock."""

    holds: list[float]

    def transaction(self, timeout=None, **options):
        outer = super().transaction(timeout, **options)
        outbox = self

        class _Timed:
            def __enter__(self):
                conn = outer.__enter__()
                self.started = time.perf_counter()
                return conn

            def __exit__(self, *exc):
                try:
                    return outer.__exit__(*exc)
                finally:
                    outbox.holds.append(time.perf_counter() - self.started)

        return _Timed()


def _prune_with_committer(path: Path, prune) -> tuple[float, list[float], list[float], int,
                                                        int]:
    """Run ``prune`` here while another process commits alarms: (seconds it took, its
    lock holds, the alarm commits' latencies, rows removed, alarm commits timed out)."""
    context = multiprocessing.get_context("spawn")
    stop, results = context.Event(), context.Queue()
    committer = context.Process(target=_alarm_committer, args=(str(path), stop, results))
    committer.start()
    time.sleep(1.0)  # the committer is running (its Outbox opened, a few commits made)
    started = time.perf_counter()
    holds, removed = prune()
    took = time.perf_counter() - started
    time.sleep(0.2)
    stop.set()
    times, failures = results.get(timeout=120)
    committer.join(30)
    return took, holds, times, removed, failures


def bench_prune(directory: Path, rows: int) -> None:
    print(f"\n(2) prune of an outbox of {rows:,} events (delivered rows older than "
          f"{KEEP_DAYS} days), alarms committed every 5 ms by another process meanwhile")
    path = directory / "prune.db"
    fill(path, IDENTITY, rows, queued=1000)
    copy = directory / "prune-baseline.db"
    shutil.copyfile(path, copy)

    def new_prune():
        with _TimedOutbox(path, IDENTITY) as outbox:
            outbox.holds = []
            removed = outbox.prune(KEEP_DAYS)
            return outbox.holds, removed

    def old_prune():
        # Schema 5's prune, as it was: one DELETE in one transaction (the same lock).
        with _TimedOutbox(copy, IDENTITY) as outbox:
            outbox.holds = []
            cutoff = utc_iso(utc_now() - timedelta(days=KEEP_DAYS))
            with outbox.transaction(timeout=60) as conn:
                removed = conn.execute(
                    "DELETE FROM events NOT INDEXED WHERE committed_at < ? AND"
                    " (state = 'acknowledged' OR (state = 'sent' AND ack_required = 0))",
                    (cutoff,)).rowcount
            return outbox.holds, removed

    new = _prune_with_committer(path, new_prune)
    old = _prune_with_committer(copy, old_prune)
    row("rows removed", f"{new[3]:,}", f"{old[3]:,}")
    row("prune took", f"{new[0]:.2f} s", f"{old[0]:.2f} s")
    row("longest write-lock hold (goal < 50 ms)", ms(max(new[1])), ms(max(old[1])),
        f"{max(old[1]) / max(new[1]):.0f}x shorter")
    row("write-lock holds: count, p50, p99", f"{len(new[1])}, {ms(pct(new[1], 50)).strip()}, "
        f"{ms(pct(new[1], 99)).strip()}", f"{len(old[1])}")
    row("longest alarm commit during the prune", ms(max(new[2])), ms(max(old[2])),
        f"{max(old[2]) / max(new[2]):.0f}x shorter")
    row("alarm commit p99 during the prune", ms(pct(new[2], 99)), ms(pct(old[2], 99)))
    row("alarm commits that timed out (0.5 s) and retried", f"{new[4]}", f"{old[4]}")
    for name in (path, copy):
        for suffix in ("", "-wal", "-shm", ".writelock"):
            Path(f"{name}{suffix}").unlink(missing_ok=True)


# -- (3) against persist-queue ------------------------------------------------------------

def bench_queue(directory: Path, count: int) -> dict[str, float]:
    """Rates per second, ours and persist-queue's: one enqueue per commit (``put``), bursts
    of ten in one commit (``burst``), dequeue + confirm (``get``)."""
    print(f"\n(3) against persist-queue {persistqueue.__version__} SQLiteAckQueue, {count:,} "
          "items; both journal_mode=WAL, synchronous=FULL; persist-queue pickles the same "
          "payload bytes")
    queue = persistqueue.SQLiteAckQueue(str(directory / "pq"), multithreading=True)
    for conn in (queue._putter, queue._getter):
        conn.execute("PRAGMA synchronous = FULL")
    mode = queue._putter.execute("PRAGMA journal_mode").fetchone()[0]
    sync = queue._putter.execute("PRAGMA synchronous").fetchone()[0]
    with Outbox(directory / "queue.db", IDENTITY) as outbox:
        payload = outbox.commit_event(alarm()).payload(IDENTITY)
        ours_mode = outbox.db.execute("PRAGMA journal_mode").fetchone()[0]
        ours_sync = outbox.db.execute("PRAGMA synchronous").fetchone()[0]
        print(f"  journal mode / synchronous: outbox {ours_mode}/{ours_sync}, "
              f"persist-queue {mode}/{sync} (2 = FULL)")

        started = time.perf_counter()
        for _ in range(count):
            queue.put(payload)
        theirs_put = count / (time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(count):
            outbox.commit_event(alarm())
        ours_put = count / (time.perf_counter() - started)
        row("durable enqueue, one per commit, /s", f"{ours_put:,.0f}", f"{theirs_put:,.0f}",
            f"{ours_put / theirs_put:.2f}x (goal >= 2x)")

        burst = 10
        started = time.perf_counter()
        for _ in range(count // burst):
            outbox.commit_events(alarm() for _ in range(burst))
        ours_burst = count // burst * burst / (time.perf_counter() - started)
        row(f"durable enqueue, bursts of {burst} (one commit), /s", f"{ours_burst:,.0f}",
            f"{theirs_put:,.0f}", f"{ours_burst / theirs_put:.2f}x (persist-queue: one "
            "commit per put)")

        started = time.perf_counter()
        for _ in range(count):
            item = queue.get(block=False)
            queue.ack(item)
        theirs_get = count / (time.perf_counter() - started)
        # The uplink's way: a window of queued rows, then one mark for the batch.
        started = time.perf_counter()
        taken = 0
        while taken < 2 * count:
            batch = outbox.next_queued(100)
            if not batch:
                break
            outbox.mark_sent(message.seq for message in batch)
            taken += len(batch)
        ours_get = taken / (time.perf_counter() - started)
        row("dequeue + confirm, /s", f"{ours_get:,.0f}", f"{theirs_get:,.0f}",
            f"{ours_get / theirs_get:.2f}x (goal >= 5x)")
    queue.close()
    return {"put_ours": ours_put, "put_theirs": theirs_put, "burst_ours": ours_burst,
            "get_ours": ours_get, "get_theirs": theirs_get}


def bench_concurrent(directory: Path, count: int, producers: int = 8) -> dict[str, float]:
    """Durable enqueue as the button daemon does it: presses from several threads (inputs,
    a storm of taps) through its recorder, each producer waiting until its press is on
    disk; persist-queue's put from as many threads, each put its own commit."""
    from drivers.gpio import PressReport
    from edge.config import parse_config
    from edge.daemons.button.recorder import AcceptedPress, Recorder
    from edge.daemons.button.windows import new_waiter, tell
    from tests.conftest import sim_document

    print(f"\n    durable enqueue from {producers} threads at once, {count:,} items: each "
          "returns only when its item is on disk")
    config = parse_config(sim_document(directory / "recorder", 1883))

    def recorded(press, event) -> None:
        tell(press.waiter, {"seq": event.seq})

    recorder = Recorder(config, recorded, failing=lambda: None)
    recorder.start()

    def ours(share: int) -> None:
        for _ in range(share):
            press = AcceptedPress(PressReport("gate", True, "press", time.monotonic(), 0.1, 0),
                                  utc_now(), waiter=new_waiter())
            recorder.submit(press)
            press.waiter[0].wait(30)

    queue = persistqueue.SQLiteAckQueue(str(directory / "pq-threads"), multithreading=True)
    queue._putter.execute("PRAGMA synchronous = FULL")
    with Outbox(directory / "payload.db", IDENTITY) as outbox:
        payload = outbox.commit_event(alarm()).payload(IDENTITY)

    def theirs(share: int) -> None:
        for _ in range(share):
            queue.put(payload)

    rates = {}
    for name, work in (("theirs", theirs), ("ours", ours)):
        threads = [threading.Thread(target=work, args=(count // producers,))
                   for _ in range(producers)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        rates[name] = count // producers * producers / (time.perf_counter() - started)
    # The button daemon's own pattern: one producer (the input worker) that hands each
    # press over and never waits for the disk; timed until the last press is durable.
    presses = [AcceptedPress(PressReport("gate", True, "press", time.monotonic(), 0.1, 0),
                             utc_now(), waiter=new_waiter()) for _ in range(count)]
    started = time.perf_counter()
    for press in presses:
        recorder.submit(press)
    presses[-1].waiter[0].wait(60)
    rates["worker"] = count / (time.perf_counter() - started)
    recorder.stop()
    queue.close()
    row(f"durable enqueue, {producers} producers, /s", f"{rates['ours']:,.0f}",
        f"{rates['theirs']:,.0f}", f"{rates['ours'] / rates['theirs']:.2f}x (goal >= 2x; each "
        "producer waits for its own)")
    row("durable enqueue, a burst from one worker, /s", f"{rates['worker']:,.0f}",
        f"{rates['theirs']:,.0f}", f"{rates['worker'] / rates['theirs']:.2f}x (the input "
        "worker never waits for the disk)")
    return rates


# -- (4) bytes to the WAL per alarm -------------------------------------------------------

def _schema_5_append(conn: sqlite3.Connection, lock: int, draft: EventDraft) -> None:
    """Schema 5's commit of an event, statement for statement, with its flock."""
    fcntl.flock(lock, fcntl.LOCK_EX)
    conn.execute("BEGIN IMMEDIATE")
    seq = conn.execute("INSERT INTO counters(name, value) VALUES ('event_seq', 1) ON CONFLICT"
                       "(name) DO UPDATE SET value = value + 1 RETURNING value").fetchone()[0]
    event = Event(id=str(uuid7()), seq=seq, draft=draft)
    conn.execute(
        "INSERT INTO events(seq, id, kind, code, priority, input, occurred_at, committed_at,"
        " clock_synced, boot_id, repeat_of, ack_required, topic, payload, state)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (seq, event.id, draft.kind.value, int(draft.code), int(draft.priority), draft.input,
         utc_iso(draft.occurred_at), utc_iso(utc_now()), int(draft.clock_synced),
         draft.boot_id, draft.repeat_of, int(draft.kind in ACK_REQUIRED),
         event.topic_suffix, event.payload(IDENTITY), "queued"))
    conn.execute("COMMIT")
    fcntl.flock(lock, fcntl.LOCK_UN)


def _wal_growth(wal: Path, commit, count: int) -> tuple[float, float]:
    """Bytes appended to the WAL per commit, and CPU seconds per commit."""
    for _ in range(50):
        commit()  # past the first pages of a new file
    size = wal.stat().st_size
    cpu = time.process_time()
    for _ in range(count):
        commit()
    return (wal.stat().st_size - size) / count, (time.process_time() - cpu) / count


def bench_wal(directory: Path, count: int) -> None:
    print(f"\n(4) bytes written to the WAL per alarm commit (checkpoints off), {count:,} commits")
    old = sqlite3.connect(directory / "schema5.db", isolation_level=None)
    old.execute("PRAGMA journal_mode = WAL")
    old.execute("PRAGMA synchronous = FULL")
    old.execute("PRAGMA wal_autocheckpoint = 0")
    old.execute("BEGIN IMMEDIATE")
    schema.migrate(old, target=5)
    old.execute("COMMIT")
    lock = os.open(directory / "schema5.db.writelock", os.O_RDWR | os.O_CREAT)
    old_bytes, old_cpu = _wal_growth(directory / "schema5.db-wal",
                                     lambda: _schema_5_append(old, lock, alarm()), count)
    os.close(lock)
    old.close()
    with Outbox(directory / "schema6.db", IDENTITY) as outbox:
        outbox.db.execute("PRAGMA wal_autocheckpoint = 0")
        new_bytes, new_cpu = _wal_growth(directory / "schema6.db-wal",
                                         lambda: outbox.commit_event(alarm()), count)
    queue = persistqueue.SQLiteAckQueue(str(directory / "pq-wal"), multithreading=True)
    queue._putter.execute("PRAGMA synchronous = FULL")
    queue._putter.execute("PRAGMA wal_autocheckpoint = 0")
    item = b"x" * 330
    pq_bytes, _ = _wal_growth(directory / "pq-wal" / "data.db-wal", lambda: queue.put(item),
                              count)
    queue.close()
    row("WAL bytes per alarm", f"{new_bytes:,.0f} B", f"{old_bytes:,.0f} B",
        f"{new_bytes / old_bytes:.2f}x of schema 5's (persist-queue put: {pq_bytes:,.0f} B)")
    row("CPU per alarm commit", ms(new_cpu), ms(old_cpu),
        f"{new_cpu / old_cpu:.2f}x of schema 5's")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts")
    args = parser.parse_args()
    depths = [0, 10_000, 100_000] if args.quick else [0, 100_000, 1_000_000]
    with tempfile.TemporaryDirectory(dir=ROOT / "bench", prefix=".outbox-") as tmp:
        directory = Path(tmp)
        print(f"Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, "
              f"{os.cpu_count()} CPUs; files in {directory}")
        bench_depths(directory, depths, 300 if args.quick else 1000)
        bench_prune(directory, 100_000 if args.quick else 1_000_000)
        bench_queue(directory, 1000 if args.quick else 3000)
        bench_concurrent(directory, 1000 if args.quick else 3000)
        bench_wal(directory, 300 if args.quick else 1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
