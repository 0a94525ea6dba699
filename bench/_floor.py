"""The floor every benchmark compares an outbox commit with: one INSERT into a one-table
SQLite database in WAL mode with synchronous=FULL, the same durability as the outbox."""

from __future__ import annotations

import os
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


def durable_file_latencies(directory: Path, data: bytes, count: int) -> list[float]:
    """Seconds taken to make ``data`` durable ``count`` times as a snapshot is made durable,
    step for step but nothing else: a new directory (its parent synced), the bytes
    written to a temporary file, fsync'd, renamed, the directory synced, and one row
    committed to a one-table database (WAL, synchronous=FULL)."""
    from edge.runtime.durable import fsync_directory

    directory.mkdir(parents=True, exist_ok=True)
    table = PlainTable(directory / "rows.db")
    times = []
    try:
        for n in range(count):
            started = time.perf_counter()
            folder = directory / f"event-{n}"
            folder.mkdir()
            fsync_directory(directory)
            temporary = folder / ".snapshot.jpg.new"
            with open(temporary, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            temporary.replace(folder / "snapshot.jpg")
            fsync_directory(folder)
            table.commit(str(folder).encode())
            times.append(time.perf_counter() - started)
    finally:
        table.close()
    return times


def ratio(value, base) -> str:
    """``value / base`` with two decimals, or ``-`` when either is missing."""
    return f"{value / base:.2f}" if value is not None and base else "-"
