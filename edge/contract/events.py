"""What the device reports: event kinds, Contact ID codes, priorities and the wire payload.

Every event carries the Contact ID (SIA DC-05) code that alarm receiving centres map,
a time-ordered globally unique id (UUIDv7) and a per-device sequence number, so the
platform can de-duplicate (delivery is at least once) and detect gaps.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Any

from edge.runtime.clock import wall_now, wall_ns

EVENT_SCHEMA = "guardpost/event@1"


class EventKind(StrEnum):
    ALARM = "alarm"
    RESET = "reset"  # the latch of an alarm was cleared by a person
    TEST = "test"
    TEST_RESULT = "test-result"  # the outcome of an end-to-end alarm test
    FALLBACK = "fallback"  # the alarm(s) also went out by SMS: the platform had not acknowledged
    FAULT = "fault"
    RESTORE = "restore"


class ContactId(IntEnum):
    """The Contact ID event codes Guardpost emits (SIA DC-05)."""

    PANIC = 120
    SILENT_PANIC = 122
    AUDIBLE_PANIC = 123
    MANUAL_TEST = 601
    PERIODIC_TEST = 602
    SYSTEM_TROUBLE = 300  # the outbox: disk full, damaged file (detail.check = "outbox")
    SELF_TEST_FAILURE = 307
    COMMUNICATION_TROUBLE = 350
    FAILURE_TO_COMMUNICATE = 354
    PANIC_ZONE_TROUBLE = 375
    PERIPHERAL_TROUBLE = 330  # a camera: stale, frozen, black or covered
    PANIC_RESET = 465


class Qualifier(IntEnum):
    """Contact ID event qualifier."""

    NEW = 1
    RESTORE = 3


class Priority(IntEnum):
    """Publishing order of the outbox: lower goes first."""

    ALARM = 0
    TEST = 1
    FAULT = 2
    SNAPSHOT = 3
    HEALTH = 4


PANIC_CODES = {"panic": ContactId.PANIC, "silent": ContactId.SILENT_PANIC,
               "audible": ContactId.AUDIBLE_PANIC}

_PRIORITY_OF_KIND = {
    EventKind.ALARM: Priority.ALARM,
    # A reset follows its alarm; at alarm priority it cannot be overtaken by a backlog.
    EventKind.RESET: Priority.ALARM,
    EventKind.TEST: Priority.TEST,
    EventKind.TEST_RESULT: Priority.TEST,
    # Right behind the alarms it concerns, ahead of any backlog.
    EventKind.FALLBACK: Priority.ALARM,
    EventKind.FAULT: Priority.FAULT,
    EventKind.RESTORE: Priority.FAULT,
}

# The platform acknowledges these; the status LED and the fallback path wait for it.
ACK_REQUIRED = frozenset({EventKind.ALARM, EventKind.TEST})


def priority_of(kind: EventKind) -> Priority:
    return _PRIORITY_OF_KIND[kind]


_uuid7_lock = threading.Lock()
_uuid7_last = 0


def uuid7(unix_ns: int | None = None) -> uuid.UUID:
    """A version 7 UUID (RFC 9562): 48 bits of Unix milliseconds, then randomness.

    The 12 bits after the milliseconds hold the sub-millisecond fraction (RFC 9562
    §6.2, method 3) and the value never repeats or goes back within this process, so
    ids sort in commit order here and by millisecond across processes. Python gains
    ``uuid.uuid7`` only in 3.14.
    """
    global _uuid7_last
    ns = wall_ns() if unix_ns is None else unix_ns
    unix_ms, sub_ms = divmod(ns, 1_000_000)
    fraction = sub_ms * 4096 // 1_000_000  # 12 bits
    rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (unix_ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | fraction << 64 | 0b10 << 62 | rand_b
    with _uuid7_lock:
        if value <= _uuid7_last:
            # Same tick (or the clock stepped back): step past the last id instead. The
            # +1 lands in the 62 random bits; a carry out of them is a 2**-62 event.
            value = _uuid7_last + 1
        _uuid7_last = value
    return uuid.UUID(int=value)


def utc_iso(moment: datetime) -> str:
    """RFC 3339 in UTC with microseconds: ``2026-11-23T08:15:02.123456Z``."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    if moment.year < 1000:  # strftime's %Y does not pad on every platform: its own way
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    # Every commit formats three of these: isoformat() costs a fraction of strftime.
    return moment.isoformat(timespec="microseconds")[:-6] + "Z"  # "+00:00" -> "Z"


def utc_now() -> datetime:
    """Now, on the device's one wall clock (:mod:`edge.runtime.clock`)."""
    return wall_now()


@dataclass(frozen=True)
class Identity:
    """Who reports: copied into every payload so a message stands on its own."""

    site_id: str
    device_id: str
    location: str


@dataclass(frozen=True)
class EventDraft:
    """An event before the outbox gives it an id and a sequence number."""

    kind: EventKind
    code: int
    occurred_at: datetime
    clock_synced: bool
    boot_id: str
    input: str | None = None
    qualifier: Qualifier = Qualifier.NEW
    repeat_of: str | None = None
    repeat: int = 0
    detail: Mapping[str, Any] = field(default_factory=dict)

    @property
    def priority(self) -> Priority:
        return priority_of(self.kind)


@dataclass(frozen=True)
class Event:
    """A committed event: durable in the outbox, with its identity for the platform."""

    id: str
    seq: int
    draft: EventDraft

    @property
    def kind(self) -> EventKind:
        return self.draft.kind

    @property
    def topic_suffix(self) -> str:
        return f"event/{self.draft.kind.value}"

    def payload(self, identity: Identity, epoch: str | None = None) -> bytes:
        """The JSON document published on ``{prefix}/event/{kind}`` (docs/schemas/event);
        ``epoch`` names the outbox history the sequence number belongs to."""
        d = self.draft
        body: dict[str, Any] = {
            "schema": EVENT_SCHEMA,
            "id": self.id,
            "seq": self.seq,
            **({"epoch": epoch} if epoch else {}),
            "site_id": identity.site_id,
            "device_id": identity.device_id,
            "location": identity.location,
            "kind": d.kind.value,
            "code": int(d.code),
            "qualifier": int(d.qualifier),
            "priority": d.priority.name.lower(),
            "occurred_at": utc_iso(d.occurred_at),
            "clock_synced": d.clock_synced,
            "boot_id": d.boot_id,
            "ack_required": d.kind in ACK_REQUIRED,
        }
        if d.input is not None:
            body["input"] = d.input
        if d.repeat_of is not None:
            body["repeat_of"] = d.repeat_of
            body["repeat"] = d.repeat
        if d.detail:
            body["detail"] = dict(d.detail)
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
