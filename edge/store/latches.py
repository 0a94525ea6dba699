"""The alarm latches (``latches``): one row per input in alarm, until a reset.

Written in the same transaction as the event each change belongs to
(:class:`edge.daemons.button.latch.AlarmLatch` holds the rules), so a crash never leaves
an alarm recorded but unlatched, or a latch without its alarm.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge.store.table import OutboxTable

_COLUMNS = "input, alarm_id, latched_at, last_event_id, repeats"


@dataclass(frozen=True)
class Latch:
    """An input in alarm: the alarm that latched it, its latest event and repeats."""

    input: str
    alarm_id: str
    latched_at: str
    last_event_id: str
    repeats: int


class Latches(OutboxTable):
    """The latch rows; the writing methods run inside the caller's transaction."""

    def get(self, input_name: str) -> Latch | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM latches WHERE input = ?",
                                      (input_name,)).fetchone()
        return Latch(*row) if row else None

    def all(self) -> dict[str, Latch]:
        """Every latched input, by name, in the order they latched."""
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM latches ORDER BY latched_at")
        return {row[0]: Latch(*row) for row in rows}

    def latch(self, input_name: str, alarm_id: str, latched_at: str) -> None:
        self._db.execute(
            "INSERT INTO latches(input, alarm_id, latched_at, last_event_id, repeats)"
            " VALUES (?, ?, ?, ?, 0)", (input_name, alarm_id, latched_at, alarm_id))

    def repeated(self, input_name: str, event_id: str, repeats: int) -> None:
        self._db.execute(
            "UPDATE latches SET last_event_id = ?, repeats = ? WHERE input = ?",
            (event_id, repeats, input_name))

    def clear(self, input_name: str) -> None:
        self._db.execute("DELETE FROM latches WHERE input = ?", (input_name,))

    def restore(self, rows: list[tuple]) -> int:
        """Latches read back from a damaged outbox (:mod:`edge.store.salvage`), each
        ``(input, alarm_id, latched_at, last_event_id, repeats)``; an input latched
        since keeps its newer latch. Returns how many were restored."""
        if not rows:
            return 0
        with self._outbox.transaction():
            return sum(self._db.execute(
                "INSERT OR IGNORE INTO latches(input, alarm_id, latched_at, last_event_id,"
                " repeats) VALUES (?, ?, ?, ?, ?)", tuple(row)).rowcount for row in rows)
