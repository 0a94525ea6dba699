"""Events read back from a damaged outbox, and put in the new one to be delivered.

A damaged outbox is moved aside (``outbox.db.damaged-<time>``, with its ``-wal``) and a
new one begins (:meth:`edge.store.outbox.Outbox.repair`). What can still be read of the
old one is recovered in two ways, and the union kept:

1. **Through SQLite**, page by page of the ``events`` table (ranges of ``seq``, skipping
   past a range that cannot be read): rows with their state, and the latches.
2. **From the events' own bytes**: every payload is a JSON document that starts with
   ``{"schema":"guardpost/event@1"`` and names its id and sequence number, and an id
   carries its sequence number (:mod:`edge.store.event_ids`): the database file and its
   WAL are scanned for such documents, each checked against its own id. This reads what
   SQLite cannot (a header overwritten, an interior page lost).

A recovered event keeps its id, sequence number and exact bytes (the platform
de-duplicates it like any copy); it is queued again unless the old outbox knew it was
acknowledged (or sent, for kinds that need no acknowledgement), and
``events.recovered_from`` names the file it came from. Events older than the keep period
are left (they would have been pruned). The outcome is written beside the damaged file
(``.salvaged.json``) so that the work is done once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from edge.contract.events import EVENT_SCHEMA, Priority, utc_iso, utc_now
from edge.store.event_ids import seq_of
from edge.store.rows import EventRow

log = logging.getLogger(__name__)

MARKER = b'{"schema":"' + EVENT_SCHEMA.encode() + b'"'
MAX_PAYLOAD = 64 * 1024
CHUNK = 4 * 1024 * 1024
PAGE_ROWS = 256


@dataclass
class Recovered:
    """What was read back from one damaged outbox."""

    source: str
    rows: dict[int, tuple] = field(default_factory=dict)   # seq -> EventRow values
    latches: list[tuple] = field(default_factory=list)
    by_sqlite: int = 0
    by_bytes: int = 0
    unreadable_ranges: int = 0

    def summary(self) -> dict:
        seqs = sorted(self.rows)
        return {"source": self.source, "events": len(self.rows), "by_sqlite": self.by_sqlite,
                "by_bytes": self.by_bytes, "unreadable_ranges": self.unreadable_ranges,
                "first_seq": seqs[0] if seqs else None, "last_seq": seqs[-1] if seqs else None}


def pending(database: Path) -> list[Path]:
    """Damaged outboxes beside ``database`` not yet read back, oldest first."""
    found = []
    for path in sorted(database.parent.glob(f"{database.name}.damaged-*")):
        if path.name.endswith(("-wal", "-shm", ".salvaged.json")):
            continue
        if not Path(f"{path}.salvaged.json").exists():
            found.append(path)
    return found


def read_back(damaged: Path, keep_days: int, now: datetime | None = None) -> Recovered:
    """Everything that can be read of the events in ``damaged`` (see the module)."""
    found = Recovered(damaged.name)
    _through_sqlite(damaged, found)
    before = len(found.rows)
    cutoff = (now or utc_now()) - timedelta(days=keep_days)
    for path in (damaged, Path(f"{damaged}-wal")):
        with contextlib.suppress(FileNotFoundError):
            _from_bytes(path, found, cutoff)
    found.by_bytes = len(found.rows) - before
    return found


def _through_sqlite(damaged: Path, found: Recovered) -> None:
    columns = ", ".join(EventRow.COLUMNS)
    try:
        db = sqlite3.connect(damaged, isolation_level=None)
    except sqlite3.Error as err:
        log.warning("%s cannot be opened by SQLite: %s", damaged.name, err)
        return
    try:
        try:
            top = db.execute("SELECT max(seq) FROM events").fetchone()[0] or 0
        except sqlite3.Error as err:
            log.warning("%s: no table of events to read (%s)", damaged.name, err)
            return
        seq = 0
        while seq < top:
            try:
                rows = db.execute(f"SELECT {columns} FROM events WHERE seq > ? ORDER BY seq"
                                  " LIMIT ?", (seq, PAGE_ROWS)).fetchall()
            except sqlite3.Error:
                found.unreadable_ranges += 1
                seq += PAGE_ROWS  # past the page that cannot be read; the bytes may tell
                continue
            if not rows:
                break
            for row in rows:
                found.rows[row[0]] = row
            seq = rows[-1][0]
        found.by_sqlite = len(found.rows)
        with contextlib.suppress(sqlite3.Error):
            found.latches = db.execute(
                "SELECT input, alarm_id, latched_at, last_event_id, repeats FROM latches"
            ).fetchall()
    finally:
        db.close()


def _from_bytes(path: Path, found: Recovered, cutoff: datetime) -> None:
    """Scan one file in chunks; a document that may run past a chunk's end waits for the
    next one (the chunks overlap by the longest payload)."""
    decoder = json.JSONDecoder()
    with open(path, "rb") as f:
        carry = b""
        while True:
            block = f.read(CHUNK)
            data = carry + block
            limit = len(data) if not block else len(data) - MAX_PAYLOAD
            at = data.find(MARKER)
            while 0 <= at < limit:
                row = _event_at(data, at, decoder, cutoff)
                if row is not None and row[0] not in found.rows:
                    found.rows[row[0]] = row
                at = data.find(MARKER, at + 1)
            if not block:
                return
            carry = data[max(0, limit):]


def _event_at(data: bytes, at: int, decoder: json.JSONDecoder,
              cutoff: datetime) -> tuple | None:
    """The row of the event whose payload starts at ``data[at]``, if it is whole and
    consistent (its id carries its sequence number)."""
    window = data[at:at + MAX_PAYLOAD].decode("utf-8", errors="surrogateescape")
    try:
        body, end = decoder.raw_decode(window)
        raw = window[:end].encode("utf-8", errors="surrogateescape")
        json.loads(raw)  # strictly valid UTF-8 JSON, as published
        seq, event_id, kind = int(body["seq"]), str(body["id"]), str(body["kind"])
        if seq_of(event_id) != seq:
            return None
        occurred = datetime.fromisoformat(body["occurred_at"])
        if occurred < cutoff:
            return None
        priority = int(Priority[str(body["priority"]).upper()])
    except (ValueError, KeyError, TypeError, UnicodeError, OverflowError):
        return None
    ack_required = bool(body.get("ack_required"))
    return (seq, event_id, kind, int(body["code"]), priority, body.get("input"),
            body["occurred_at"], utc_iso(utc_now()), int(bool(body.get("clock_synced"))),
            str(body.get("boot_id", "")), body.get("repeat_of"), int(ack_required),
            f"event/{kind}", raw, "queued", None, None, None, None)


def summary_path(damaged: Path) -> Path:
    return Path(f"{damaged}.salvaged.json")


def salvage(outbox, damaged: Path, keep_days: int) -> dict:
    """Read ``damaged`` back into ``outbox`` (an :class:`edge.store.outbox.Outbox`) and
    record that it was done; returns the summary (also the restore event's detail)."""
    found = read_back(damaged, keep_days)
    inserted, clashed = outbox.insert_recovered(list(found.rows.values()), found.source)
    restored = outbox.latches.restore(found.latches)
    summary = found.summary() | {"inserted": inserted, "clashed": clashed,
                                 "latches_restored": restored}
    summary_path(damaged).write_text(json.dumps(summary, indent=1) + "\n")
    log.warning("recovered %d event(s) from %s (%d through SQLite, %d from their bytes; %d "
                "already here, %d whose number was taken)", len(found.rows), damaged.name,
                found.by_sqlite, found.by_bytes, len(found.rows) - inserted - clashed, clashed)
    return summary
