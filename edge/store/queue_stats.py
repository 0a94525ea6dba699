"""The outbox's figures (``guardpost queue``, the heartbeat, ``guardpost status``) without
a scan at any depth.

SQLite cannot count rows from an index in constant time, so the exact counts by state,
priority and ``ack_required`` are kept in the ``counters`` table by triggers, in the
same transaction as every insert, change of state and deletion (:mod:`edge.store.schema`).
The oldest unsent row is the lowest ``seq`` of each priority's queue, found through the
queue's index, one search per priority that has queued rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from edge.contract.events import Priority, utc_now
from edge.store.schema import COUNT_PREFIX
from edge.store.table import OutboxTable

QUEUED = "queued"


@dataclass
class QueueSummary:
    """What ``guardpost queue`` prints: counts by state and priority, the oldest unsent."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    oldest_unsent_seq: int | None = None
    oldest_unsent_committed_at: str | None = None
    oldest_unsent_age_s: float | None = None
    last_seq: int = 0

    @property
    def unsent(self) -> int:
        return sum(self.counts.get(QUEUED, {}).values())


@dataclass(frozen=True)
class _Count:
    state: str
    priority: int
    ack_required: int
    count: int


def _priority_name(priority: int) -> str:
    try:
        return Priority(priority).name.lower()
    except ValueError:
        return str(priority)


class QueueStats(OutboxTable):
    """Counts and the oldest unsent row, read from one outbox connection."""

    def counts(self) -> list[_Count]:
        """The non-zero counts, exact as of the last commit."""
        rows = self._db.execute(
            "SELECT name, value FROM counters WHERE name >= ? AND name < ? AND value != 0",
            (COUNT_PREFIX, COUNT_PREFIX[:-1] + chr(ord(COUNT_PREFIX[-1]) + 1)))
        counts = []
        for name, value in rows:
            state, priority, ack_required = name[len(COUNT_PREFIX):].split("/")
            counts.append(_Count(state, int(priority), int(ack_required), value))
        return counts

    def oldest_unsent(self, counts: list[_Count]) -> tuple[int, str] | None:
        """``(seq, committed_at)`` of the oldest queued row."""
        oldest = None
        for priority in sorted({c.priority for c in counts if c.state == QUEUED}):
            row = self._db.execute(
                "SELECT seq, committed_at FROM events WHERE state = 'queued' AND priority = ?"
                " ORDER BY seq LIMIT 1", (priority,)).fetchone()
            if row is not None and (oldest is None or row[0] < oldest[0]):
                oldest = row
        return oldest

    def summary(self, now: datetime | None = None) -> QueueSummary:
        counts = self.counts()
        summary = QueueSummary(last_seq=self._outbox.last_seq())
        for c in counts:
            by_priority = summary.counts.setdefault(c.state, {})
            name = _priority_name(c.priority)
            by_priority[name] = by_priority.get(name, 0) + c.count
        oldest = self.oldest_unsent(counts)
        if oldest is not None:
            summary.oldest_unsent_seq, summary.oldest_unsent_committed_at = oldest
            summary.oldest_unsent_age_s = _age(oldest[1], now)
        return summary

    def backlog(self, now: datetime | None = None) -> dict:
        counts = self.counts()
        oldest = self.oldest_unsent(counts)
        return {"queued": sum(c.count for c in counts if c.state == QUEUED),
                "sent_unacknowledged": sum(c.count for c in counts
                                           if c.state == "sent" and c.ack_required),
                "oldest_unsent_age_s": round(_age(oldest[1], now), 3) if oldest else None,
                "last_seq": self._outbox.last_seq()}


def _age(committed_at: str, now: datetime | None) -> float:
    return max(0.0, ((now or utc_now()) - datetime.fromisoformat(committed_at)).total_seconds())
