"""Uplink sessions (``uplink_sessions``): the time online of the monthly report."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from edge.contract.events import utc_iso, utc_now
from edge.store.table import OutboxTable


@dataclass(frozen=True)
class SessionRow:
    """One connection to the broker: when it began, was last seen alive, and ended."""

    id: int
    session: int
    connected_at: str
    last_seen_at: str
    disconnected_at: str | None
    reason: str | None


class Sessions(OutboxTable):
    """Writes the uplink's sessions; the report reads them (:meth:`all`)."""

    def started(self, session: int, at: datetime | None = None) -> None:
        stamp = utc_iso(at or utc_now())
        with self._outbox.transaction() as conn:
            conn.execute("INSERT INTO uplink_sessions(session, connected_at, last_seen_at)"
                         " VALUES (?, ?, ?)", (session, stamp, stamp))

    def seen(self, session: int, at: datetime | None = None) -> None:
        with self._outbox.transaction() as conn:
            conn.execute("UPDATE uplink_sessions SET last_seen_at = ? WHERE session = ?"
                         " AND disconnected_at IS NULL", (utc_iso(at or utc_now()), session))

    def ended(self, session: int, reason: str, at: datetime | None = None) -> None:
        stamp = utc_iso(at or utc_now())
        with self._outbox.transaction() as conn:
            conn.execute("UPDATE uplink_sessions SET last_seen_at = ?, disconnected_at = ?,"
                         " reason = ? WHERE session = ? AND disconnected_at IS NULL",
                         (stamp, stamp, reason, session))


def all_sessions(db) -> list[SessionRow]:
    """Every session, oldest first (``db``: any connection to the outbox)."""
    return [SessionRow(*row) for row in db.execute(
        "SELECT id, session, connected_at, last_seen_at, disconnected_at, reason"
        " FROM uplink_sessions ORDER BY id")]
