"""What a duty desk knows of its fleet: every device's link (online, offline, lost), the
alarms, and the other notices (tests, faults, restores ...). No I/O and no screen: the
client feeds it decoded messages with a monotonic ``now``; the screen reads it.

The rules are the contract's (docs/contract.md, "Status, will and the session counter"):

- **online** after a birth, and while heard from;
- **offline** after an ``offline`` status (the will, or a clean ``shutdown``) of the same
  session as the newest birth or a newer one - an older session's offline is a late will;
- **lost** when nothing (no status, health or event) was heard for longer than the
  ``dark_after_s`` the device published in its birth, will or no will; a device whose birth
  the desk has not seen is judged by the contract's default (:data:`DEFAULT_DARK_AFTER_S`).

The model is shared between the client's thread and the screen's: every method takes its
lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from edge.contract.events import EVENT_SCHEMA
from edge.contract.messages import HEALTH_SCHEMA, STATUS_SCHEMA

# Twice the default heartbeat interval (30 s), never less than 1.5 x the default keepalive.
DEFAULT_DARK_AFTER_S = 60.0
ALARM_KINDS = frozenset({"alarm"})
NOTICE_KINDS = frozenset({"reset", "test", "test-result", "fault", "restore", "fallback"})
MAX_NOTICES = 500   # the notices list keeps the newest; the alarms list keeps every alarm
MAX_UNCLAIMED = 1000  # snapshots whose event has not (yet) come here: a group's other desk


class Link(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    LOST = "lost"


class AckState(StrEnum):
    UNACKNOWLEDGED = "unacknowledged"
    SENDING = "sending"            # published, the broker has not taken it yet
    ACKNOWLEDGED = "acknowledged"  # the broker took our signed ack (PUBACK)


@dataclass
class Device:
    site_id: str
    device_id: str
    location: str | None = None
    session: int | None = None          # of the newest birth (or health) heard
    offline_reason: str | None = None   # set while an offline status stands
    dark_after_s: float = DEFAULT_DARK_AFTER_S
    birth_seen: bool = False
    last_heard: float | None = None     # monotonic

    def link(self, now: float) -> Link:
        if self.offline_reason is not None:
            return Link.OFFLINE
        if self.last_heard is None or now - self.last_heard > self.dark_after_s:
            return Link.LOST
        return Link.ONLINE


@dataclass
class Alarm:
    """An alarm (or a notice: the same fields), de-duplicated by its event id."""

    event_id: str
    site_id: str
    device_id: str
    kind: str
    code: int | None
    seq: int | None
    location: str | None
    occurred_at: str | None
    received_at: datetime            # wall clock (UTC), when the console got it first
    received: float                  # monotonic, the same moment
    waited_s: float | None           # occurred_at -> received, if the device's clock was synced
    verified: bool | None            # None: no device keys given, nothing was checked
    problem: str | None = None       # why it is not verified
    repeat: int | None = None
    detail: dict = field(default_factory=dict)
    copies: int = 1
    ack: AckState = AckState.UNACKNOWLEDGED
    acks_sent: int = 0
    acknowledged_at: datetime | None = None
    snapshots: list[Path] = field(default_factory=list)
    held_s: float | None = None      # on the device, creation -> publication (MQTT 5 waited_ms)

    @property
    def summary(self) -> str:
        detail = self.detail if isinstance(self.detail, dict) else {}
        for key in ("summary", "result", "problem", "check", "mode"):
            value = detail.get(key)
            if isinstance(value, str | int | float) and not isinstance(value, bool):
                return str(value)[:80]
        return ""


def _text(body: dict, key: str, limit: int = 200) -> str | None:
    value = body.get(key)
    return value[:limit] if isinstance(value, str) else None


def _int(body: dict, key: str) -> int | None:
    value = body.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _waited(occurred_at: str | None, clock_synced, received_at: datetime) -> float | None:
    """How long the event waited between the press and the console (its time in the
    device's outbox, plus the way here). Only a synced device clock makes it meaningful."""
    if occurred_at is None or clock_synced is not True:
        return None
    try:
        occurred = datetime.fromisoformat(occurred_at.replace("Z", "+00:00"))
    except ValueError:
        return None
    if occurred.tzinfo is None:
        return None
    return max(0.0, (received_at - occurred).total_seconds())


class Fleet:
    """Devices, alarms and notices, optionally only of some sites."""

    def __init__(self, sites: list[str] | None = None):
        self.sites = frozenset(sites) if sites else None
        self.devices: dict[tuple[str, str], Device] = {}
        self.alarms: dict[str, Alarm] = {}     # event id -> alarm, in arrival order
        self.notices: dict[str, Alarm] = {}    # event id -> notice, the newest MAX_NOTICES
        self.messages = 0
        self.ignored = 0
        self.last_ignored: str | None = None
        self.not_verified = 0
        # event id -> snapshots saved before their event arrived (or of another desk's)
        self.unclaimed: dict[str, list[Path]] = {}
        self.lock = threading.RLock()

    # -- what the client feeds ------------------------------------------------------

    def ignore(self, why: str) -> None:
        with self.lock:
            self.messages += 1
            self.ignored += 1
            self.last_ignored = why[:200]

    def _device(self, site_id: str, device_id: str) -> Device:
        if self.sites is not None and site_id not in self.sites:
            raise ValueError(f"site {site_id} is not one of this console's")
        key = (site_id, device_id)
        device = self.devices.get(key)
        if device is None:
            device = self.devices[key] = Device(site_id, device_id)
        return device

    def status(self, site_id: str, device_id: str, body: dict, now: float) -> None:
        """A birth, a will or a clean shutdown (``{prefix}/status``)."""
        state, session = body.get("state"), _int(body, "session")
        if body.get("schema") != STATUS_SCHEMA or state not in ("online", "offline") \
                or session is None:
            raise ValueError(f"not a status ({STATUS_SCHEMA} with state and session)")
        with self.lock:
            self.messages += 1
            device = self._device(site_id, device_id)
            if device.session is not None and session < device.session:
                return  # the late will (or retained birth) of an earlier connection
            if state == "online":
                device.session, device.offline_reason = session, None
                device.birth_seen = True
                dark = body.get("dark_after_s")
                if isinstance(dark, int | float) and not isinstance(dark, bool) and dark > 0:
                    device.dark_after_s = float(dark)
                device.last_heard = now
            else:
                device.session = session
                device.offline_reason = _text(body, "reason", 80) or "offline"

    def health(self, site_id: str, device_id: str, body: dict, now: float) -> None:
        """A heartbeat: the device is there (a newer session than an offline's: it came
        back, and its birth is on its way or was lost)."""
        session = _int(body, "session")
        if body.get("schema") != HEALTH_SCHEMA or session is None:
            raise ValueError(f"not a heartbeat ({HEALTH_SCHEMA} with its session)")
        with self.lock:
            self.messages += 1
            device = self._device(site_id, device_id)
            if device.session is not None and session < device.session:
                return  # a retained heartbeat of an earlier connection
            if device.offline_reason is not None:
                if device.session is None or session <= device.session:
                    return  # the heartbeat before the will, delivered late or retained
                device.offline_reason = None
            device.session = session
            device.last_heard = now

    def event(self, site_id: str, device_id: str, body: dict, now: float, *,
              received_at: datetime | None = None, verified: bool | None = None,
              problem: str | None = None, waited_ms: str | None = None) -> tuple[Alarm, bool]:
        """An event (verified or not: an unverified alarm is shown, flagged); returns it and
        whether it is new (False: a copy of one already here, published again).
        ``waited_ms``: the device's own word of how long the event waited on it (an MQTT 5
        user property), which needs no synchronised clock."""
        event_id, kind = _text(body, "id", 64), _text(body, "kind", 32)
        if body.get("schema") != EVENT_SCHEMA or not event_id or not kind:
            raise ValueError(f"not an event ({EVENT_SCHEMA} with id and kind)")
        received_at = received_at or datetime.now(UTC)
        with self.lock:
            self.messages += 1
            device = self._device(site_id, device_id)
            if device.offline_reason is None:
                device.last_heard = now
            device.location = _text(body, "location") or device.location
            if verified is False:
                self.not_verified += 1
            book = self.alarms if kind in ALARM_KINDS else self.notices
            known = book.get(event_id)
            if known is not None:
                known.copies += 1
                return known, False
            detail = body.get("detail")
            item = Alarm(event_id, site_id, device_id, kind, _int(body, "code"),
                         _int(body, "seq"), _text(body, "location"), _text(body, "occurred_at", 40),
                         received_at, now,
                         _waited(_text(body, "occurred_at", 40), body.get("clock_synced"),
                                 received_at),
                         verified, problem, _int(body, "repeat"),
                         detail if isinstance(detail, dict) else {})
            if isinstance(waited_ms, str) and waited_ms.isdigit() and len(waited_ms) <= 15:
                item.held_s = int(waited_ms) / 1000
            item.snapshots = sorted(self.unclaimed.pop(event_id, []))
            book[event_id] = item
            if book is self.notices and len(book) > MAX_NOTICES:
                del book[next(iter(book))]
            return item, True

    def snapshot_saved(self, event_id: str, path: Path) -> None:
        with self.lock:
            self.messages += 1
            item = self.alarms.get(event_id) or self.notices.get(event_id)
            if item is None:
                waiting = self.unclaimed.setdefault(event_id, [])
                if path not in waiting:
                    waiting.append(path)
                if len(self.unclaimed) > MAX_UNCLAIMED:
                    del self.unclaimed[next(iter(self.unclaimed))]
            elif path not in item.snapshots:
                item.snapshots.append(path)
                item.snapshots.sort()

    def ack_sent(self, event_id: str) -> None:
        with self.lock:
            item = self.alarms.get(event_id) or self.notices.get(event_id)
            if item is not None:
                item.acks_sent += 1
                if item.ack is AckState.UNACKNOWLEDGED:
                    item.ack = AckState.SENDING

    def ack_delivered(self, event_id: str, at: datetime | None = None) -> None:
        with self.lock:
            item = self.alarms.get(event_id) or self.notices.get(event_id)
            if item is not None:
                item.ack = AckState.ACKNOWLEDGED
                item.acknowledged_at = item.acknowledged_at or at or datetime.now(UTC)

    # -- what the screen reads ------------------------------------------------------

    def snapshot_of_snapshots(self, event_id: str) -> list[Path]:
        with self.lock:
            item = self.alarms.get(event_id) or self.notices.get(event_id)
            return list(item.snapshots) if item else []

    def alarm_list(self, site_filter: str | None = None) -> list[Alarm]:
        """Unacknowledged first, newest first within each group."""
        with self.lock:
            chosen = [a for a in self.alarms.values() if _matches(a.site_id, site_filter)]
        chosen.sort(key=lambda a: (a.ack is AckState.ACKNOWLEDGED, -a.received))
        return chosen

    def notice_list(self, site_filter: str | None = None) -> list[Alarm]:
        with self.lock:
            chosen = [n for n in self.notices.values() if _matches(n.site_id, site_filter)]
        chosen.sort(key=lambda n: -n.received)
        return chosen

    def device_list(self, now: float, site_filter: str | None = None
                    ) -> list[tuple[Device, Link]]:
        """Lost, then offline, then online; by site and device within each."""
        order = {Link.LOST: 0, Link.OFFLINE: 1, Link.ONLINE: 2}
        with self.lock:
            chosen = [(d, d.link(now)) for d in self.devices.values()
                      if _matches(d.site_id, site_filter)]
        chosen.sort(key=lambda pair: (order[pair[1]], pair[0].site_id, pair[0].device_id))
        return chosen

    def counts(self, now: float) -> dict[str, int]:
        with self.lock:
            links = [d.link(now) for d in self.devices.values()]
        return {link.value: links.count(link) for link in Link}

    def link_of(self, site_id: str, device_id: str, now: float) -> Link | None:
        with self.lock:
            device = self.devices.get((site_id, device_id))
            return device.link(now) if device else None


def _matches(site_id: str, site_filter: str | None) -> bool:
    return not site_filter or site_filter.casefold() in site_id.casefold()
