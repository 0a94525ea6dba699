"""Camera snapshots on disk: the spool directory, its rows in the outbox, the disk budget.

A snapshot is written durably (temporary file, fsync, rename, fsync of the directory) and
only then registered in the ``snapshots`` table, in the same database as the events, so
the uplink publishes it after the alarm it belongs to. When the spool exceeds its budget
the least precious go first:

1. snapshots already delivered, oldest first;
2. undelivered snapshots of tests, oldest first;
3. only when nothing else is left: undelivered snapshots of real alarms, oldest first.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from edge.contract.events import utc_iso, utc_now
from edge.runtime.durable import fsync_directory
from edge.store.batches import PRUNE_FIRST_BATCH, adapt_batch, pause_after
from edge.store.outbox import ROWS_PER_TRANSACTION, Outbox

if TYPE_CHECKING:
    # Only a type: the uplink, which publishes snapshots, must not import OpenCV.
    from drivers.camera import Snapshot

# Free disk always left to the outbox (and the system): the spool shrinks below its budget
# rather than eat into it.
DISK_RESERVE_BYTES = 200 * 1024 * 1024
# Below this much free disk (beyond the picture itself), no picture is written at all.
PICTURE_HEADROOM_BYTES = 1024 * 1024

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueuedSnapshot:
    """A snapshot the uplink is about to publish."""

    id: int
    event_id: str
    camera: str
    idx: int
    phase: str
    captured_at: str
    offset_s: float
    width: int
    height: int
    path: str


class SnapshotStore:
    """Writes, registers, lists and prunes snapshots (one per thread, like Outbox)."""

    def __init__(self, outbox: Outbox, spool_dir: Path, budget_bytes: int):
        self.outbox = outbox
        self.spool = Path(spool_dir)
        self.budget = budget_bytes
        self.spool.mkdir(parents=True, exist_ok=True)

    def write(self, snapshot: Snapshot, *, event_id: str, event_kind: str, event_time: datetime,
              idx: int, phase: str) -> int:
        """Store one snapshot durably and queue it for the uplink; returns its row id.
        On a (nearly) full disk the picture gives way: ``OSError(ENOSPC)``, and the room
        is left to the alarms (the outbox's reserve is never drawn on for a picture)."""
        if self.free_disk_bytes() < len(snapshot.jpeg) + PICTURE_HEADROOM_BYTES:
            raise OSError(errno.ENOSPC, "the disk is full: pictures give way to alarms")
        directory = self.spool / event_id
        new_directory = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        if new_directory:
            fsync_directory(self.spool)
        path = directory / f"{snapshot.camera}-{idx:03d}-{phase}.jpg"
        temporary = path.with_name(f".{path.name}.new")
        with open(temporary, "wb") as out:
            out.write(snapshot.jpeg)
            out.flush()
            os.fsync(out.fileno())
        temporary.replace(path)
        fsync_directory(directory)
        captured = datetime.fromtimestamp(snapshot.captured_wall, UTC)
        with self.outbox.transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO snapshots(event_id, event_kind, camera, idx, phase, captured_at,"
                " offset_s, width, height, path, size, committed_at, state)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued')",
                (event_id, event_kind, snapshot.camera, idx, phase, utc_iso(captured),
                 round((captured - event_time).total_seconds(), 3), snapshot.width,
                 snapshot.height, str(path), len(snapshot.jpeg), utc_iso(utc_now())))
            return cursor.lastrowid

    def taken(self, event_id: str, camera: str, phase: str | None = None) -> int:
        """How many snapshots of this event and camera (of ``phase``) are recorded."""
        sql = "SELECT count(*) FROM snapshots WHERE event_id = ? AND camera = ?"
        args: tuple = (event_id, camera)
        if phase is not None:
            sql, args = sql + " AND phase = ?", (*args, phase)
        return self.outbox.db.execute(sql, args).fetchone()[0]

    # -- the uplink's side -----------------------------------------------------------

    def next_queued(self, limit: int, exclude: set[int]) -> list[QueuedSnapshot]:
        rows = self.outbox.db.execute(
            "SELECT id, event_id, camera, idx, phase, captured_at, offset_s, width, height,"
            # A real alarm's pictures before a test's; each event's in the order taken.
            " path FROM snapshots WHERE state = 'queued'"
            " ORDER BY event_kind <> 'alarm', id LIMIT ?",
            (limit + len(exclude),)).fetchall()
        return [QueuedSnapshot(*row) for row in rows if row[0] not in exclude][:limit]

    def mark_sent(self, ids: list[int]) -> None:
        stamp = utc_iso(utc_now())
        for start in range(0, len(ids), ROWS_PER_TRANSACTION):
            chunk = ids[start:start + ROWS_PER_TRANSACTION]
            with self.outbox.transaction() as conn:
                conn.execute(f"UPDATE snapshots SET state = 'sent', sent_at = ? WHERE id IN"
                             f" ({','.join('?' * len(chunk))})", (stamp, *chunk))

    def forget(self, snapshot_id: int, reason: str) -> None:
        """A snapshot that cannot be published (its file is gone, the broker refuses it):
        say so, drop the row and its file."""
        log.error("snapshot %d dropped: %s", snapshot_id, reason)
        row = self.outbox.db.execute("SELECT path FROM snapshots WHERE id = ?",
                                     (snapshot_id,)).fetchone()
        with self.outbox.transaction() as conn:
            conn.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))
        if row is not None:
            Path(row[0]).unlink(missing_ok=True)

    # -- the disk budget -------------------------------------------------------------

    def used_bytes(self) -> int:
        return self.outbox.db.execute(
            "SELECT coalesce(sum(size), 0) FROM snapshots").fetchone()[0]

    _PRUNE_ORDER = (
        ("delivered", "state = 'sent'"),
        ("undelivered test", "state = 'queued' AND event_kind <> 'alarm'"),
        ("undelivered alarm", "state = 'queued' AND event_kind = 'alarm'"),
    )

    def effective_budget(self) -> int:
        """The configured budget, or less when the disk is filling: the outbox shares the
        disk, and an alarm that cannot be committed matters more than any picture."""
        return max(0, min(self.budget,
                          self.used_bytes() + self.free_disk_bytes() - DISK_RESERVE_BYTES))

    def free_disk_bytes(self) -> int:
        return shutil.disk_usage(self.spool).free

    def enforce_budget(self) -> int:
        """Delete snapshots, least precious first, until the spool fits; returns how many."""
        excess = self.used_bytes() - self.effective_budget()
        removed = 0
        for label, condition in self._PRUNE_ORDER:
            if excess <= 0:
                break
            rows = self.outbox.db.execute(
                f"SELECT id, path, size FROM snapshots WHERE {condition} ORDER BY id").fetchall()
            doomed = []
            for row_id, path, size in rows:
                if excess <= 0:
                    break
                doomed.append((row_id, path))
                excess -= size
            if not doomed:
                continue
            self._delete(doomed)
            removed += len(doomed)
            level = logging.WARNING if label == "undelivered alarm" else logging.INFO
            log.log(level, "spool over budget: removed %d %s snapshot(s)", len(doomed), label)
        self._remove_empty_directories()
        return removed

    def prune_delivered(self, keep_days: int, now: datetime | None = None) -> int:
        """Delivered snapshots older than ``keep_days``, as delivered events are."""
        cutoff = utc_iso((now or utc_now()) - timedelta(days=keep_days))
        removed, batch = 0, PRUNE_FIRST_BATCH
        while True:
            rows = self.outbox.db.execute(
                "SELECT id, path FROM snapshots WHERE state = 'sent' AND committed_at < ?"
                " LIMIT ?", (cutoff, batch)).fetchall()
            took = self._delete(rows)
            removed += len(rows)
            if len(rows) < batch:
                break
            batch = adapt_batch(batch, took)
            time.sleep(pause_after(took))
        if removed:
            self._remove_empty_directories()
        return removed

    def _delete(self, doomed: list[tuple[int, str]]) -> float:
        """Rows first, then their files: a crash leaves an orphan file (swept at start),
        never a row without its picture. In batches: a bulk deletion never holds the
        write lock long. Returns how long the last batch held it."""
        took = 0.0
        for start in range(0, len(doomed), ROWS_PER_TRANSACTION):
            if start:
                time.sleep(pause_after(took))
            chunk = doomed[start:start + ROWS_PER_TRANSACTION]
            began = time.monotonic()
            # Durable: the files go right after, and a row must never outlive its file.
            with self.outbox.transaction() as conn:
                conn.executemany("DELETE FROM snapshots WHERE id = ?", [(i,) for i, _ in chunk])
            took = time.monotonic() - began
            for _, path in chunk:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        return took

    def remove_orphans(self) -> int:
        """Files no row points at (a crash between the two deletions): removed at start."""
        known = {row[0] for row in self.outbox.db.execute("SELECT path FROM snapshots")}
        orphans = [p for p in self.spool.rglob("*.jpg") if str(p) not in known]
        orphans += list(self.spool.rglob(".*.new"))
        for path in orphans:
            path.unlink(missing_ok=True)
        self._remove_empty_directories()
        return len(orphans)

    def _remove_empty_directories(self) -> None:
        for directory in self.spool.iterdir():
            if directory.is_dir() and not any(directory.iterdir()):
                with contextlib.suppress(OSError):
                    directory.rmdir()
