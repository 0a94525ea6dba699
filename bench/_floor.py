"""The floor every benchmark compares an outbox commit with: one INSERT into a one-table
SQLite database in WAL mode with synchronous=FULL, the same durability as the outbox."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path


class PlainTable:
    """A one-table database; :meth:`commit` times one durable insert."""

    def __init__(self, path: Path):
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.execute("CREATE TABLE IF NOT EXISTS t (seq INTEGER PRIMARY KEY, payload BLOB)")

    def commit(self, payload: bytes) -> float:
        started = time.perf_counter()
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.execute("INSERT INTO t (payload) VALUES (?)", (payload,))
        self.conn.execute("COMMIT")
        return time.perf_counter() - started

    def close(self) -> None:
        self.conn.close()


def plain_commit_latencies(path: Path, count: int, payload: bytes) -> list[float]:
    """Seconds taken by each of ``count`` commits of one row holding ``payload``."""
    table = PlainTable(path)
    try:
        return [table.commit(payload) for _ in range(count)]
    finally:
        table.close()
