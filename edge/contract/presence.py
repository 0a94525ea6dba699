"""The platform's presence: is anybody at the police end to take an alarm right now?

Sparkplug's host application publishes a retained STATE message with a will, so that an
edge node knows whether its host is there; this is the same idea, signed. Each platform
instance (a duty-desk console, an ingest service) publishes on

    {root}/_platform/{platform_id}/presence      retained, QoS 1

a signed envelope (:mod:`edge.contract.signing`, key role ``ack``: whoever may
acknowledge alarms) whose body is::

    {"schema": "guardpost/presence@1", "platform_id": "desk-1", "state": "online",
     "session": 1764755232000}

- ``online`` when it connects; at the same time it sets as its will the ``offline`` body
  of the same ``session`` (signed then: a will is written at connect time), which the
  broker publishes if the platform vanishes; a clean stop publishes ``offline`` itself,
  with ``"reason": "shutdown"``.
- ``session`` grows with every connection of that instance (milliseconds of the Unix
  time at connect). A device keeps, per instance, the newest session; an older one is
  ignored (a will of an earlier connection, arriving late), and within one session
  ``offline`` outranks ``online`` (Sparkplug's rule for STATE).
- No time window, no nonce: the message is retained and may be hours old when a device
  subscribes. Replaying an old ``online`` cannot hide anything that matters: the device
  then waits the acknowledgement timeout before its SMS, as it does when it knows nothing.
  An ``offline`` makes the device send its SMS at once - a forgery of it costs an SMS.

``_platform`` cannot be a site id (a site id starts with a letter or digit), so these
topics never meet a device's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PRESENCE_SCHEMA = "guardpost/presence@1"
MAX_INSTANCES = 64   # platform instances a device keeps track of (more are ignored)
PLATFORM_LEVEL = "_platform"
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def presence_topic(root: str, platform_id: str) -> str:
    return f"{root}/{PLATFORM_LEVEL}/{platform_id}/presence"


def presence_filter(root: str) -> str:
    """What a device subscribes to: every platform instance's presence."""
    return f"{root}/{PLATFORM_LEVEL}/+/presence"


def platform_id_of(root: str, topic: str) -> str | None:
    """``desk-1`` for ``{root}/_platform/desk-1/presence``; None for any other topic."""
    head, tail = f"{root}/{PLATFORM_LEVEL}/", "/presence"
    if not (topic.startswith(head) and topic.endswith(tail)):
        return None
    middle = topic[len(head):-len(tail)]
    return middle if middle and "/" not in middle else None


class PresenceBody(BaseModel):
    """docs/schemas/presence.schema.json"""

    model_config = ConfigDict(extra="forbid", strict=True)

    schema_: Literal["guardpost/presence@1"] = Field(alias="schema")
    platform_id: str = Field(min_length=1, max_length=64, pattern=ID_PATTERN)
    state: Literal["online", "offline"]
    session: int = Field(ge=0, le=2**53 - 1)
    reason: str | None = Field(None, max_length=200)


@dataclass(frozen=True)
class Presence:
    platform_id: str
    state: str          # "online" or "offline"
    session: int
    reason: str | None = None


def presence_from_body(body: dict) -> Presence:
    """A verified envelope's body as :class:`Presence`, or ValueError saying what is wrong."""
    try:
        parsed = PresenceBody.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(body)"
        raise ValueError(f"not a presence message: {where}: {first['msg']}") from None
    return Presence(parsed.platform_id, parsed.state, parsed.session, parsed.reason)


def presence_body(platform_id: str, state: str, session: int,
                  reason: str | None = None) -> dict:
    body = {"schema": PRESENCE_SCHEMA, "platform_id": platform_id, "state": state,
            "session": session}
    if reason is not None:
        body["reason"] = reason
    return body


class PresenceBoard:
    """What a device knows of the platform instances: the newest word of each.

    ``state`` is ``online`` when any instance is online (several consoles share the work:
    one is enough), ``offline`` when every instance heard of is offline, ``unknown`` when
    none has been heard of (a platform that publishes no presence: the device behaves as
    it always did)."""

    def __init__(self) -> None:
        self._latest: dict[str, Presence] = {}

    def offer(self, presence: Presence) -> bool:
        """Take ``presence`` if it is news; returns whether the overall state changed."""
        before = self.state
        known = self._latest.get(presence.platform_id)
        if known is None and len(self._latest) >= MAX_INSTANCES:
            return False
        if known is not None and (presence.session, presence.state == "offline") < (
                known.session, known.state == "offline"):
            return False  # an older connection's word (a late will), or online after offline
        self._latest[presence.platform_id] = presence
        return self.state != before

    def withdraw(self, platform_id: str) -> bool:
        """The instance's retained presence was cleared (an empty message): it is no longer
        heard of. Returns whether the overall state changed."""
        before = self.state
        self._latest.pop(platform_id, None)
        return self.state != before

    def forget(self) -> None:
        """The device's own link ended: what it knew may be stale; the broker sends the
        retained presence again when it subscribes."""
        self._latest.clear()

    @property
    def state(self) -> str:
        if not self._latest:
            return "unknown"
        if any(p.state == "online" for p in self._latest.values()):
            return "online"
        return "offline"

    def summary(self) -> dict:
        """For ``guardpost status`` and health: the overall state and each instance's."""
        return {"state": self.state,
                "instances": {p.platform_id: p.state for p in self._latest.values()}}


def describe(summary: dict | None) -> str:
    """One line for a person: ``online (desk-1 online, desk-2 offline)``."""
    if not summary:
        return "unknown"
    instances = summary.get("instances") or {}
    detail = ", ".join(f"{k} {v}" for k, v in sorted(instances.items()))
    return f"{summary.get('state', 'unknown')}" + (f" ({detail})" if detail else "")
