"""The outbox's rows as the callers read them: frozen dataclasses, one per kind of row."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class QueuedMessage:
    """A row the uplink is about to publish."""

    seq: int
    id: str
    kind: str
    priority: int
    topic: str
    payload: bytes
    recovered: bool = False  # read back from a damaged outbox (edge.store.salvage)


@dataclass(frozen=True)
class AckResult:
    """What became of one acknowledgement: ``known`` event, ``already`` acknowledged."""

    event_id: str
    known: bool
    already: bool = False


@dataclass(frozen=True)
class EventRow:
    """One row of the ``events`` table (times are UTC, RFC 3339)."""

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "seq", "id", "kind", "code", "priority", "input", "occurred_at", "committed_at",
        "clock_synced", "boot_id", "repeat_of", "ack_required", "topic", "payload", "state",
        "sent_at", "acknowledged_at", "acknowledged_by", "ack_received_at")

    seq: int
    id: str
    kind: str
    code: int
    priority: int
    input: str | None
    occurred_at: str
    committed_at: str
    clock_synced: int
    boot_id: str
    repeat_of: str | None
    ack_required: int
    topic: str
    payload: bytes
    state: str
    sent_at: str | None
    acknowledged_at: str | None
    acknowledged_by: str | None
    ack_received_at: str | None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
