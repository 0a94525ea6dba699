"""What every one-table module of the store shares: the outbox connection it goes through."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge.store.outbox import Outbox


class OutboxTable:
    """The rows of one table, read and written through one :class:`Outbox` (its
    connection and its bounded transactions)."""

    def __init__(self, outbox: Outbox):
        self._outbox = outbox

    @property
    def _db(self) -> sqlite3.Connection:
        return self._outbox.db
