"""The platform contract: topic names and the payloads that are not events.

Documented in ``docs/contract.md`` with JSON Schemas in ``docs/schemas/``; the tests
validate every payload the code emits against those schemas.

    {root}/{site_id}/{device_id}/status          retained birth / will / offline
    {root}/{site_id}/{device_id}/event/{kind}    alarm, reset, test, fault, restore (QoS 1)
    {root}/{site_id}/{device_id}/snapshot/{id}   camera JPEGs of alarm/test {id} (QoS 1)
    {root}/{site_id}/{device_id}/health          retained heartbeat (link supervision)
    {root}/{site_id}/{device_id}/ack             platform -> device: event acknowledged
    {root}/{site_id}/{device_id}/cmd/{command}   platform -> device: test, snapshot, reset,
                                                 silence, ping (signed, role "command")
    {root}/{site_id}/{device_id}/reply/{command} device -> platform: acceptance, result
    {root}/{site_id}/{device_id}/rejected        device -> platform: input it refused
    {root}/_platform/{platform_id}/presence      platform -> devices: retained, signed
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from edge.contract.events import Identity, utc_iso, utc_now
from edge.contract.presence import presence_filter

STATUS_SCHEMA = "guardpost/status@1"
HEALTH_SCHEMA = "guardpost/health@1"
ACK_SCHEMA = "guardpost/ack@1"
REJECTED_SCHEMA = "guardpost/rejected@1"
SNAPSHOT_SCHEMA = "guardpost/snapshot@1"
TEST_COMMAND_SCHEMA = "guardpost/cmd-test@1"
COMMANDS = ("test", "snapshot", "reset", "silence", "ping")
# The time rules of signed messages (edge.contract.signing): accepted from 40 s before to
# 20 s after the device's synchronised clock, never 40 s older than the newest accepted.
SIGNED_PAST = timedelta(seconds=40)
SIGNED_FUTURE = timedelta(seconds=20)
# Commands other than the test (whose limit is alarm_test.min_interval_s): how many a
# second on average, and how many at once (docs/contract.md, "Commands").
COMMAND_LIMITS = {"snapshot": (1 / 10, 2), "reset": (1 / 5, 3), "silence": (1 / 5, 3),
                  "ping": (1.0, 5)}
REPLY_SCHEMA = "guardpost/reply@1"
MAX_WAITING_TESTS = 3  # platform test requests waiting to run; more are refused
REQUEST_ID_MEMORY_H = 24  # a cmd/test with a request_id seen this recently is that request

UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


class Topics:
    """Topic names of one device's subtree."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.status = f"{prefix}/status"
        self.health = f"{prefix}/health"
        self.ack = f"{prefix}/ack"
        self.rejected = f"{prefix}/rejected"
        self.commands = f"{prefix}/cmd/#"
        self.cmd_test = f"{prefix}/cmd/test"
        self.reply_test = f"{prefix}/reply/test"
        # every platform instance's presence (edge.contract.presence), beside the device tree
        self.presence = presence_filter(prefix.rsplit("/", 2)[0])

    def command_of(self, topic: str) -> str | None:
        """``test`` for ``{prefix}/cmd/test``; None when ``topic`` is not a command's."""
        head = f"{self.prefix}/cmd/"
        return topic[len(head):] if topic.startswith(head) else None

    def reply(self, command: str) -> str:
        return f"{self.prefix}/reply/{command}"

    def below(self, suffix: str) -> str:
        return f"{self.prefix}/{suffix}"


def _dump(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def dark_after_s(config) -> float:
    """How long a platform may hear nothing from this device before it is dark: two
    heartbeat intervals (the contract's rule), never less than the broker's will delay
    (1.5 x keepalive). Carried in the birth, so a platform judges each device by its own
    settings rather than a fleet-wide guess."""
    return round(max(2 * config.uplink.heartbeat_interval, 1.5 * config.broker.keepalive), 1)


def status_payload(identity: Identity, *, state: str, session: int, **fields: Any) -> bytes:
    """Birth (``online``), will and clean shutdown (``offline``): same session counter.

    As in Sparkplug B, a platform that has seen the birth of session N ignores an
    ``offline`` that carries an older session: a late will cannot mark a live device dead.
    """
    body = {"schema": STATUS_SCHEMA, "state": state, "session": session,
            "site_id": identity.site_id, "device_id": identity.device_id, **fields}
    return _dump(body)


def health_payload(identity: Identity, *, session: int, uptime_s: float, outbox: dict,
                   clock_synced: bool, latched: list[str], selftest: dict | None = None,
                   inbound: dict | None = None, delivery: dict | None = None,
                   broker: str | None = None, platform: dict | None = None) -> bytes:
    """The heartbeat; ``selftest`` is the self-test daemon's latest checks and last alarm
    test (absent while that daemon has not run); ``inbound`` counts what the platform (or
    anyone) sent and how it was answered, ``delivery`` what is held back or published
    again, ``broker`` the broker in use, ``platform`` the platform's presence as the device
    knows it (docs/schemas/health.schema.json)."""
    body = {
        "schema": HEALTH_SCHEMA, "at": utc_iso(utc_now()), "session": session,
        "site_id": identity.site_id, "device_id": identity.device_id,
        "uptime_s": round(uptime_s, 3), "clock_synced": clock_synced,
        "latched": latched, "outbox": outbox,
    }
    if inbound is not None:
        body["inbound"] = inbound
    if delivery is not None:
        body["delivery"] = delivery
    if broker is not None:
        body["broker"] = broker
    if platform is not None:
        body["platform"] = platform
    if selftest is not None:
        body["checks"] = selftest.get("checks", {})
        body["checked_at"] = selftest.get("checked_at")
        if selftest.get("last_test"):
            body["last_test"] = selftest["last_test"]
    return _dump(body)


def snapshot_description(identity: Identity, snapshot) -> dict[str, Any]:
    """What a snapshot is (docs/schemas/snapshot.schema.json): MQTT 5 user properties, or
    the JSON line before the JPEG with MQTT 3.1.1."""
    return {"schema": SNAPSHOT_SCHEMA, "site_id": identity.site_id,
            "device_id": identity.device_id, "event_id": snapshot.event_id,
            "camera": snapshot.camera, "index": snapshot.idx, "phase": snapshot.phase,
            "captured_at": snapshot.captured_at, "offset_s": snapshot.offset_s,
            "width": snapshot.width, "height": snapshot.height}


EXCERPT_BYTES = 200    # how much of a refused message a rejection quotes
MAX_REASON_CHARS = 500


def quote(payload: bytes, size: int | None = None) -> dict[str, Any]:
    """A refused message quoted verbatim: its first :data:`EXCERPT_BYTES` as text when they
    are valid UTF-8 (a character cut by the limit is left out), else base64, with its size
    (``size``: the whole message's, when only its head was kept)."""
    head = payload[:EXCERPT_BYTES]
    text = None
    for cut in range(4 if (size or len(payload)) > len(head) else 1):  # a character cut in two
        try:
            text = head[:len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    if text is None:
        return {"payload_excerpt": base64.b64encode(head).decode("ascii"),
                "payload_encoding": "base64", "payload_size": size or len(payload)}
    return {"payload_excerpt": text, "payload_encoding": "utf-8",
            "payload_size": size or len(payload)}


def rejection_payload(topic: str, reason: str, payload: bytes, *, size: int | None = None,
                      request_id: str | None = None, event_id: str | None = None,
                      suppressed: int = 0) -> bytes:
    """The answer to a message the device refused (docs/schemas/rejected.schema.json),
    quoting it verbatim and naming its request or event when they could be read.
    ``suppressed``: refusals not answered one by one since the last answer (rate limit)."""
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[:MAX_REASON_CHARS - 1] + "…"
    body: dict[str, Any] = {"schema": REJECTED_SCHEMA, "at": utc_iso(utc_now()), "topic": topic,
                            "reason": reason, **quote(payload, size)}
    if request_id is not None:
        body["request_id"] = request_id
    if event_id is not None:
        body["event_id"] = event_id
    if suppressed:
        body["suppressed"] = suppressed
    return _dump(body)


# -- what the platform sends ---------------------------------------------------------------
#
# The models follow the JSON Schemas exactly (strict types: no number taken for a string);
# parsing then yields a frozen command in which nothing can fail later: times are in UTC
# and within what every part of the device can store and print, text encodes as UTF-8.

RFC3339 = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
                     r"(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})")
EARLIEST, LATEST = datetime(1970, 1, 1, tzinfo=UTC), datetime(9999, 1, 1, tzinfo=UTC)


class RejectedInput(ValueError):
    """A platform message that does not follow the contract; carries what could be read of
    it (``request_id``, ``event_id``) so that the rejection can be correlated."""

    def __init__(self, reason: str, *, request_id: str | None = None,
                 event_id: str | None = None):
        super().__init__(reason)
        self.request_id, self.event_id = request_id, event_id


def _storable_text(value: str | None) -> str | None:
    if value is not None:
        value.encode("utf-8")  # a lone surrogate ("\ud800" in JSON) cannot be stored
    return value


StorableText = Annotated[str, AfterValidator(_storable_text)]


class AckMessage(BaseModel):
    """What the platform sends on ``{prefix}/ack`` (docs/schemas/ack.schema.json)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    schema_: str | None = Field(None, alias="schema", pattern=r"^guardpost/ack@1$")
    event_id: str = Field(pattern=UUID_PATTERN)
    acknowledged_at: str | None = None
    by: StorableText | None = Field(None, max_length=200)


class TestCommand(BaseModel):
    """What the platform sends on ``{prefix}/cmd/test`` (docs/schemas/cmd-test.schema.json):
    the police's linked test. The reply carries the request id back."""

    __test__ = False  # (not a pytest test class, whatever its name)
    model_config = ConfigDict(extra="forbid", strict=True)

    schema_: str = Field(alias="schema", pattern=r"^guardpost/cmd-test@1$")
    request_id: str = Field(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")
    by: StorableText | None = Field(None, max_length=200)


class CommandMessage(BaseModel):
    """The body of every other command, ``cmd/{snapshot,reset,silence,ping}``
    (docs/schemas/cmd.schema.json): a request id the replies carry back, who asked, and
    for some commands what it concerns."""

    model_config = ConfigDict(extra="forbid", strict=True)

    schema_: str = Field(alias="schema",
                         pattern=r"^guardpost/cmd-(snapshot|reset|silence|ping)@1$")
    request_id: str = Field(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")
    by: StorableText | None = Field(None, max_length=200)
    input: str | None = Field(None, min_length=1, max_length=64,
                              pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")   # reset: one input
    camera: str | None = Field(None, min_length=1, max_length=64,
                               pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # snapshot: one camera


@dataclass(frozen=True)
class Command:
    """A platform command other than the test, normalised."""

    name: str
    request_id: str
    by: str | None = None
    input: str | None = None
    camera: str | None = None


@dataclass(frozen=True)
class Acknowledgement:
    """A platform acknowledgement, normalised: ``acknowledged_at`` in UTC (or None)."""

    event_id: str
    acknowledged_at: datetime | None
    by: str | None


@dataclass(frozen=True)
class TestRequest:
    """A platform's request for the end-to-end alarm test."""

    __test__ = False  # (not a pytest test class, whatever its name)
    request_id: str
    by: str | None


def utc_time(text: str) -> datetime:
    """An RFC 3339 date-time with its offset, as a UTC datetime within 1970..9998; raises
    ValueError (saying why) for anything else, including what cannot be represented in
    UTC (``0001-01-01T00:00:00+14:00``)."""
    match = RFC3339.fullmatch(text)
    if match is None:
        raise ValueError("not an RFC 3339 date-time with an offset")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, offset = match.group(7) or "", match.group(8)
    micro = int((fraction[1:] + "000000")[:6]) if fraction else 0
    if offset in ("Z", "z"):
        zone = UTC
    else:
        hours, minutes = int(offset[1:3]), int(offset[4:6])
        if hours > 23 or minutes > 59:
            raise ValueError(f"offset {offset} is out of range")
        sign = -1 if offset[0] == "-" else 1
        zone = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        moment = datetime(year, month, day, hour, minute, second, micro, tzinfo=zone)
        moment = moment.astimezone(UTC)
    except (ValueError, OverflowError) as err:
        raise ValueError(f"not a representable time ({err})") from None
    if not EARLIEST <= moment < LATEST:
        raise ValueError("outside the years 1970 to 9998 in UTC")
    return moment


_Model = TypeVar("_Model", bound=BaseModel)


def _decode(payload: bytes) -> dict:
    try:
        data = json.loads(payload)
    except RecursionError:
        raise RejectedInput("not JSON: nested too deeply") from None
    except ValueError as err:  # also invalid UTF-8, and integers of thousands of digits
        raise RejectedInput(f"not JSON: {err}") from None
    if not isinstance(data, dict):
        raise RejectedInput(f"not a JSON object (a {type(data).__name__})")
    return data


def _known_id(data: dict, key: str, pattern: str) -> str | None:
    value = data.get(key)
    if isinstance(value, str) and re.fullmatch(pattern, value):
        return value
    return None


def _validate(model: type[_Model], data: dict, **known: str | None) -> _Model:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(message)'}: {e['msg']}"
            for e in err.errors())
        raise RejectedInput(problems, **known) from None


def parse_ack(payload: bytes) -> Acknowledgement:
    """Parse an acknowledgement, or raise :class:`RejectedInput` saying what is wrong."""
    return ack_from_body(_decode(payload))


def ack_from_body(data: dict) -> Acknowledgement:
    """The acknowledgement a signed envelope carries (its ``body``)."""
    event_id = _known_id(data, "event_id", UUID_PATTERN)
    message = _validate(AckMessage, data, event_id=event_id)
    at = None
    if message.acknowledged_at is not None:
        try:
            at = utc_time(message.acknowledged_at)
        except ValueError as err:
            raise RejectedInput(f"acknowledged_at: {err}", event_id=event_id) from None
    return Acknowledgement(message.event_id, at, message.by)


def parse_test_command(payload: bytes) -> TestRequest:
    """Parse a ``cmd/test``, or raise :class:`RejectedInput` saying what is wrong."""
    return command_from_body("test", _decode(payload))


def command_from_body(name: str, data: dict) -> TestRequest | Command:
    """The command ``cmd/{name}`` a signed envelope carries (its ``body``), or
    :class:`RejectedInput`; its schema must name the same command as its topic."""
    request_id = _known_id(data, "request_id", r"[\x21-\x7e]{1,64}")
    if name == "test":
        message = _validate(TestCommand, data, request_id=request_id)
        return TestRequest(message.request_id, message.by)
    if name not in COMMANDS:
        raise RejectedInput(f"unknown command {name!r} (commands: {', '.join(COMMANDS)})",
                            request_id=request_id)
    message = _validate(CommandMessage, data, request_id=request_id)
    if message.schema_ != f"guardpost/cmd-{name}@1":
        raise RejectedInput(f"schema {message.schema_} is not the one of cmd/{name}",
                            request_id=request_id)
    if message.input is not None and name != "reset":
        raise RejectedInput("input: only cmd/reset names an input", request_id=request_id)
    if message.camera is not None and name != "snapshot":
        raise RejectedInput("camera: only cmd/snapshot names a camera", request_id=request_id)
    return Command(name, message.request_id, message.by, message.input, message.camera)


def reply_payload(identity: Identity, *, command: str, request_id: str, status: str,
                  test_id: str | None = None, result: dict | None = None,
                  reason: str | None = None, retry_after_s: float | None = None) -> bytes:
    """The answer to a command: ``accepted`` at once, then ``passed``/``failed`` with the
    result, or ``refused`` with the reason, and when a refusal is only for now, how long
    until the request can succeed (docs/schemas/reply.schema.json)."""
    body: dict[str, Any] = {"schema": REPLY_SCHEMA, "at": utc_iso(utc_now()),
                            "site_id": identity.site_id, "device_id": identity.device_id,
                            "command": command, "request_id": request_id, "status": status}
    if test_id is not None:
        body["test_id"] = test_id
    if result is not None:
        body["result"] = result
    if reason is not None:
        body["reason"] = reason
    if retry_after_s is not None:
        body["retry_after_s"] = round(retry_after_s, 1)
    return _dump(body)


def ack_payload(event_id: str, by: str | None = None, at: datetime | None = None) -> bytes:
    """The acknowledgement a platform sends (used by ``guardpost watch --ack``)."""
    body = {"schema": ACK_SCHEMA, "event_id": event_id, "acknowledged_at": utc_iso(at or utc_now())}
    if by:
        body["by"] = by
    return _dump(body)
