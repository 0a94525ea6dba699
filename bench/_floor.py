"""The floor every benchmark compares an outbox commit with: one INSERT into a one-table
SQLite database in WAL mode with synchronous=FULL, the same durability as the outbox."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path


def plain_commit_latencies(path: Path, count: int, payload: bytes) -> list[float]:
    """Seconds taken by each of ``count`` commits of one row holding ``payload``."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (seq INTEGER PRIMARY KEY, payload BLOB)")
    times = []
    for _ in range(count):
        started = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (payload) VALUES (?)", (payload,))
        conn.execute("COMMIT")
        times.append(time.perf_counter() - started)
    conn.close()
    return times
