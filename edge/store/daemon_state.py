"""Each daemon's published state (``daemon_state``): what ``guardpost status`` shows."""

from __future__ import annotations

from datetime import datetime

from edge.contract.events import utc_iso, utc_now
from edge.store.table import OutboxTable


class DaemonStates(OutboxTable):
    """One JSON document per daemon, with the time it was written."""

    def save(self, name: str, state_json: str, at: datetime | None = None, *,
             timeout: float | None = None) -> None:
        """Record a daemon's state (``at``: now). ``timeout`` bounds the wait for the
        write lock, as :meth:`Outbox.transaction`'s does."""
        with self._outbox.transaction(timeout) as conn:
            conn.execute(
                "INSERT INTO daemon_state(name, state, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET state = excluded.state,"
                " updated_at = excluded.updated_at",
                (name, state_json, utc_iso(at or utc_now())))

    def all(self) -> dict[str, tuple[str, str]]:
        """``name -> (state_json, updated_at)``."""
        return {name: (state, updated) for name, state, updated in
                self._db.execute("SELECT name, state, updated_at FROM daemon_state")}
