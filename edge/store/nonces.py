"""The nonces of the signed platform messages the device accepted (``accepted_nonces``).

A signed acknowledgement or command is acted on once: its nonce is written here in the
same transaction as what it did (an acknowledgement), or right after (a command, whose
own request id makes a second delivery harmless), and a message whose nonce is here is
refused as a replay. A nonce is kept while its message could still pass the time rules:
a message signed more than :data:`edge.contract.signing.PAST` before the newest one
accepted from its key is refused whatever its nonce, so older rows are pruned. The
newest row of each key also says what "newest accepted" is after a restart.

Times are stored as RFC 3339 UTC text with microseconds (``utc_iso``): they sort as text.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from edge.contract.events import utc_iso
from edge.contract.messages import utc_time
from edge.store.table import OutboxTable


class AcceptedNonces(OutboxTable):
    """Reads anywhere; :meth:`record` and :meth:`prune` run inside the caller's
    transaction."""

    def seen(self, nonces: Iterable[str]) -> set[str]:
        nonces = list(nonces)
        if not nonces:
            return set()
        marks = ",".join("?" * len(nonces))
        rows = self._db.execute(
            f"SELECT nonce FROM accepted_nonces WHERE nonce IN ({marks})", nonces)
        return {row[0] for row in rows}

    def record(self, nonce: str, key_id: str, signed_at: datetime) -> None:
        self._db.execute("INSERT OR IGNORE INTO accepted_nonces (nonce, key_id, signed_at)"
                         " VALUES (?, ?, ?)", (nonce, key_id, utc_iso(signed_at)))

    def newest(self, key_ids: Iterable[str]) -> dict[str, datetime]:
        """The newest ``signed_at`` accepted from each of these keys (that sent any)."""
        found = {}
        for key_id in key_ids:
            at = self._db.execute("SELECT max(signed_at) FROM accepted_nonces WHERE key_id = ?",
                                  (key_id,)).fetchone()[0]
            if at is not None:
                found[key_id] = utc_time(at)
        return found

    def prune(self, key_ids: Iterable[str], keep: timedelta) -> int:
        """Forget the nonces signed more than ``keep`` before their key's newest."""
        deleted = 0
        for key_id, newest in self.newest(key_ids).items():
            deleted += self._db.execute(
                "DELETE FROM accepted_nonces WHERE key_id = ? AND signed_at < ?",
                (key_id, utc_iso(newest - keep))).rowcount
        return deleted
