"""Event ids: UUIDv7 (RFC 9562) that carry the event's sequence number.

For the platform an event id is what the contract says: an opaque, globally unique,
time-ordered UUIDv7. Inside the device it also names its row: the 62 bits that RFC 9562
leaves to the implementation (``rand_b``) hold the sequence number (40 bits, above) and
22 random bits (below), so an acknowledgement finds its row through the primary key,
and the outbox keeps no index of ids that every commit would have to write.

    48 bits Unix ms | 4 version | 12 sub-ms fraction | 2 variant | 40 seq | 22 random

Ids are unique on a device by construction (the sequence number is), and across devices
by the time, the sub-millisecond fraction and the random bits. Within a process they
never go back, even when the wall clock does: a time behind the last id's reuses the
last id's time, and the rising sequence number orders them.
"""

from __future__ import annotations

import os
import threading

from edge.runtime.clock import wall_ns

SEQ_BITS = 40
RANDOM_BITS = 22
_SEQ_MASK = (1 << SEQ_BITS) - 1
_VERSION_AND_VARIANT = 0x7 << 76 | 0b10 << 62

_lock = threading.Lock()
_last_prefix = 0  # the time part (ms and fraction) of the last id made here


def event_id(seq: int, unix_ns: int | None = None) -> str:
    """The id of the event with sequence number ``seq``, made now (or at ``unix_ns``)."""
    global _last_prefix
    if not 0 < seq <= _SEQ_MASK:
        raise ValueError(f"sequence number {seq} does not fit in an event id")
    ns = wall_ns() if unix_ns is None else unix_ns
    unix_ms, sub_ms = divmod(ns, 1_000_000)
    prefix = (unix_ms & ((1 << 48) - 1)) << 12 | sub_ms * 4096 // 1_000_000
    with _lock:
        if prefix < _last_prefix:
            prefix = _last_prefix  # the wall clock stepped back: do not follow it
        _last_prefix = prefix
    random = int.from_bytes(os.urandom(3), "big") & ((1 << RANDOM_BITS) - 1)
    value = ((prefix >> 12) << 80 | (prefix & 0xFFF) << 64 | _VERSION_AND_VARIANT
             | seq << RANDOM_BITS | random)
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def follow(event_id: str) -> None:
    """Ids made here from now on come after ``event_id`` (the newest in the outbox, made
    perhaps by another process): after the wall clock stepped back, ids stay time-ordered
    across processes, not only within one."""
    global _last_prefix
    try:
        value = int(event_id.replace("-", ""), 16)
    except ValueError:
        return
    prefix = (value >> 80) << 12 | (value >> 64) & 0xFFF
    with _lock:
        if prefix > _last_prefix:
            _last_prefix = prefix


def seq_of(event_id: str) -> int | None:
    """The sequence number an id made by :func:`event_id` carries; None if ``event_id``
    is not a version 7 UUID. An id made before schema 6 (fully random) decodes to a
    number too: the caller checks that the row it names has this id."""
    if len(event_id) != 36 or event_id[14] != "7":
        return None
    try:
        value = int(event_id.replace("-", ""), 16)
    except ValueError:
        return None
    return (value >> RANDOM_BITS) & _SEQ_MASK or None
