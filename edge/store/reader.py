"""A read-only view of the outbox for reports (``guardpost report``).

Opened with SQLite's ``mode=ro``: a report never blocks or changes the device, and
never migrates a database (an outbox older than this code is read as it is, as long as
it has the columns read here). The monthly queries run once a month over one month
of rows; they are not on any hot path.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path

from edge.contract.events import utc_iso
from edge.store.alarm_tests import AlarmTestRow, tests_requested_between
from edge.store.rows import EventRow
from edge.store.sessions import SessionRow, all_sessions

_EVENTS = f"SELECT {', '.join(EventRow.COLUMNS)} FROM events"


class OutboxReader:
    """Reads the outbox file at ``path`` without ever writing to it."""

    def __init__(self, path: str | Path):
        if not Path(path).exists():
            raise ValueError(f"no outbox at {path}")
        # as_uri() escapes what a URI would misread in a path ("?", "#", "%", spaces).
        self._db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> OutboxReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tests_requested_between(self, start: datetime, end: datetime) -> list[AlarmTestRow]:
        return tests_requested_between(self._db, start, end)

    def events_between(self, kinds: tuple[str, ...], start: datetime,
                       end: datetime) -> list[EventRow]:
        """Events of these kinds that occurred in ``[start, end)``, in sequence order."""
        return [EventRow(*row) for row in self._db.execute(
            f"{_EVENTS} WHERE kind IN ({','.join('?' * len(kinds))}) AND occurred_at >= ?"
            " AND occurred_at < ? ORDER BY seq", (*kinds, utc_iso(start), utc_iso(end)))]

    def events_before(self, kinds: tuple[str, ...], end: datetime) -> list[EventRow]:
        """Events of these kinds that occurred before ``end``, in sequence order."""
        return [EventRow(*row) for row in self._db.execute(
            f"{_EVENTS} WHERE kind IN ({','.join('?' * len(kinds))}) AND occurred_at < ?"
            " ORDER BY seq", (*kinds, utc_iso(end)))]

    def sessions(self) -> list[SessionRow]:
        return all_sessions(self._db)
