"""The platform contract: topic names and the payloads that are not events.

Documented in ``docs/contract.md`` with JSON Schemas in ``docs/schemas/``; the tests
validate every payload the code emits against those schemas.

    {root}/{site_id}/{device_id}/status          retained birth / will / offline
    {root}/{site_id}/{device_id}/event/{kind}    alarm, reset, test, fault, restore (QoS 1)
    {root}/{site_id}/{device_id}/snapshot/{id}   camera JPEGs of alarm/test {id} (QoS 1)
    {root}/{site_id}/{device_id}/health          retained heartbeat (link supervision)
    {root}/{site_id}/{device_id}/ack             platform -> device: event acknowledged
    {root}/{site_id}/{device_id}/cmd/test        platform -> device: run the alarm test
    {root}/{site_id}/{device_id}/reply/test      device -> platform: its acceptance, result
    {root}/{site_id}/{device_id}/rejected        device -> platform: input it refused
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge.contract.events import Identity, utc_iso, utc_now

STATUS_SCHEMA = "guardpost/status@1"
HEALTH_SCHEMA = "guardpost/health@1"
ACK_SCHEMA = "guardpost/ack@1"
REJECTED_SCHEMA = "guardpost/rejected@1"
SNAPSHOT_SCHEMA = "guardpost/snapshot@1"
TEST_COMMAND_SCHEMA = "guardpost/cmd-test@1"
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

    def below(self, suffix: str) -> str:
        return f"{self.prefix}/{suffix}"


def _dump(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def status_payload(identity: Identity, *, state: str, session: int, **fields: Any) -> bytes:
    """Birth (``online``), will and clean shutdown (``offline``): same session counter.

    As in Sparkplug B, a platform that has seen the birth of session N ignores an
    ``offline`` that carries an older session: a late will cannot mark a live device dead.
    """
    body = {"schema": STATUS_SCHEMA, "state": state, "session": session,
            "site_id": identity.site_id, "device_id": identity.device_id, **fields}
    return _dump(body)


def health_payload(identity: Identity, *, session: int, uptime_s: float, outbox: dict,
                   clock_synced: bool, latched: list[str], selftest: dict | None = None
                   ) -> bytes:
    """The heartbeat; ``selftest`` is the self-test daemon's latest checks and last alarm
    test (absent while that daemon has not run)."""
    body = {
        "schema": HEALTH_SCHEMA, "at": utc_iso(utc_now()), "session": session,
        "site_id": identity.site_id, "device_id": identity.device_id,
        "uptime_s": round(uptime_s, 3), "clock_synced": clock_synced,
        "latched": latched, "outbox": outbox,
    }
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


def rejection_payload(topic: str, reason: str, payload: bytes) -> bytes:
    return _dump({
        "schema": REJECTED_SCHEMA, "at": utc_iso(utc_now()), "topic": topic,
        "reason": reason, "payload_excerpt": payload[:200].decode("utf-8", "replace"),
    })


class AckMessage(BaseModel):
    """What the platform sends on ``{prefix}/ack`` (docs/schemas/ack.schema.json)."""

    model_config = ConfigDict(extra="forbid")

    schema_: str = Field(ACK_SCHEMA, alias="schema", pattern=r"^guardpost/ack@1$")
    event_id: str = Field(pattern=UUID_PATTERN)
    acknowledged_at: datetime | None = None
    by: str | None = Field(None, max_length=200)


class TestCommand(BaseModel):
    """What the platform sends on ``{prefix}/cmd/test`` (docs/schemas/cmd-test.schema.json):
    the police's linked test. The reply carries the request id back."""

    model_config = ConfigDict(extra="forbid")

    schema_: str = Field(TEST_COMMAND_SCHEMA, alias="schema", pattern=r"^guardpost/cmd-test@1$")
    request_id: str = Field(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")
    by: str | None = Field(None, max_length=200)


_Model = TypeVar("_Model", bound=BaseModel)


class RejectedInput(ValueError):
    """A platform message that does not follow the contract."""


def _parse(model: type[_Model], payload: bytes) -> _Model:
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RejectedInput(f"not JSON: {err}") from None
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(message)'}: {e['msg']}"
            for e in err.errors())
        raise RejectedInput(problems) from None


def parse_ack(payload: bytes) -> AckMessage:
    """Parse an acknowledgement, or raise :class:`RejectedInput` saying what is wrong."""
    return _parse(AckMessage, payload)


def parse_test_command(payload: bytes) -> TestCommand:
    return _parse(TestCommand, payload)


def reply_payload(identity: Identity, *, command: str, request_id: str, status: str,
                  test_id: str | None = None, result: dict | None = None,
                  reason: str | None = None) -> bytes:
    """The answer to a command: ``accepted`` at once, then ``passed``/``failed`` with the
    result, or ``refused`` with the reason (docs/schemas/reply.schema.json)."""
    body: dict[str, Any] = {"schema": REPLY_SCHEMA, "at": utc_iso(utc_now()),
                            "site_id": identity.site_id, "device_id": identity.device_id,
                            "command": command, "request_id": request_id, "status": status}
    if test_id is not None:
        body["test_id"] = test_id
    if result is not None:
        body["result"] = result
    if reason is not None:
        body["reason"] = reason
    return _dump(body)


def ack_payload(event_id: str, by: str | None = None, at: datetime | None = None) -> bytes:
    """The acknowledgement a platform sends (used by ``guardpost watch --ack``)."""
    body = {"schema": ACK_SCHEMA, "event_id": event_id, "acknowledged_at": utc_iso(at or utc_now())}
    if by:
        body["by"] = by
    return _dump(body)
