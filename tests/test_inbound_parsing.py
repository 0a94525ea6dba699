"""Every inbound parser, driven with extreme values: the only outcomes are a normalised
command or a rejection. Nothing else may come out of them, because they run inside the
MQTT callback, where an exception used to stop the uplink for as long as the broker kept
handing the same message back."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

from hypothesis import example, given, settings
from hypothesis import strategies as st

from edge.contract.events import utc_iso
from edge.contract.messages import (
    COMMANDS,
    EARLIEST,
    LATEST,
    Acknowledgement,
    RejectedInput,
    TestRequest,
    command_from_body,
    parse_ack,
    parse_test_command,
    rejection_payload,
)
from tests.support.contract import problems

EVENT_ID = "01234567-89ab-7def-8123-456789abcdef"

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
           | st.text(st.characters(codec=None, exclude_categories=())))
json_values = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=10), children, max_size=4),
                           max_leaves=20)


@st.composite
def rfc3339_like(draw) -> str:
    """Date-times at and beyond the edges: years 0000-9999, months and days out of range,
    offsets up to +-99:99, fractions of any length, leap seconds."""
    year = draw(st.integers(0, 9999))
    month, day = draw(st.integers(0, 13)), draw(st.integers(0, 32))
    hour, minute, second = draw(st.integers(0, 25)), draw(st.integers(0, 61)), \
        draw(st.integers(0, 61))
    fraction = draw(st.sampled_from(["", ".5", ".123456", ".1234567891234"]))
    offset = draw(st.sampled_from(["Z", "z"]) | st.builds(
        lambda sign, h, m: f"{sign}{h:02d}:{m:02d}", st.sampled_from("+-"),
        st.integers(0, 99), st.integers(0, 99)))
    return f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}" \
        f"{fraction}{offset}"


def nested(depth: int) -> bytes:
    return b'{"event_id": ' + b"[" * depth + b"]" * depth + b"}"


acknowledgements = st.fixed_dictionaries(
    {"event_id": st.just(EVENT_ID) | st.text() | st.integers()},
    optional={"schema": st.just("guardpost/ack@1") | json_values,
              "acknowledged_at": rfc3339_like() | json_values,
              "by": st.text(st.characters(codec=None, exclude_categories=()),
                            max_size=250) | json_values,
              "extra": json_values})

commands = st.fixed_dictionaries(
    {"request_id": st.text(max_size=70) | json_values},
    optional={"schema": st.just("guardpost/cmd-test@1") | json_values,
              "by": st.text(st.characters(codec=None, exclude_categories=()),
                            max_size=250) | json_values})


def as_payload(value) -> bytes:
    return json.dumps(value).encode()


payloads = (st.binary(max_size=300)
            | json_values.map(as_payload)
            | st.integers(1, 6000).map(lambda digits: b'{"event_id": ' + b"9" * digits + b"}")
            | st.integers(1, 30_000).map(nested))


def command_or_rejection(parse, payload: bytes):
    """The command, or None for a rejection (which must say why); any other outcome, an
    exception above all, fails the test."""
    try:
        return parse(payload)
    except RejectedInput as rejected:
        assert str(rejected)
        return None


def _check_acknowledgement(ack: Acknowledgement) -> None:
    assert ack.event_id == EVENT_ID
    if ack.acknowledged_at is not None:
        at = ack.acknowledged_at
        assert at.tzinfo is UTC and EARLIEST <= at < LATEST
        # Stored and read back as every part of the device does it.
        assert datetime.fromisoformat(utc_iso(at)) == at
    if ack.by is not None:
        ack.by.encode("utf-8")


@settings(max_examples=400, deadline=None)
@given(acknowledgements.map(as_payload) | payloads)
@example(json.dumps({"event_id": EVENT_ID, "acknowledged_at": "0001-01-01T00:00:00+14:00"})
         .encode())
@example(json.dumps({"event_id": EVENT_ID, "acknowledged_at": "9999-12-31T23:59:59-14:00"})
         .encode())
@example(json.dumps({"event_id": EVENT_ID, "by": "\ud800"}).encode())
@example(nested(100_000))
def test_every_acknowledgement_parses_to_a_normalised_command_or_a_rejection(payload):
    if (ack := command_or_rejection(parse_ack, payload)) is not None:
        _check_acknowledgement(ack)


@settings(max_examples=400, deadline=None)
@given(commands.map(as_payload) | payloads)
@example(json.dumps({"request_id": "no-schema"}).encode())
def test_every_test_command_parses_to_a_normalised_request_or_a_rejection(payload):
    request = command_or_rejection(parse_test_command, payload)
    if request is None:
        return
    assert isinstance(request, TestRequest)
    assert 1 <= len(request.request_id) <= 64 and request.request_id.isascii()
    if request.by is not None:
        request.by.encode("utf-8")  # storable
    assert json.loads(payload).get("schema") == "guardpost/cmd-test@1"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.text(min_size=1, max_size=700),
       st.integers(0, 10_000))
def test_a_rejection_quotes_any_payload_verbatim_and_follows_its_schema(payload, reason,
                                                                        suppressed):
    body = json.loads(rejection_payload("guardpost/v1/s/d/ack", reason, payload,
                                        suppressed=suppressed))
    assert problems("rejected", body) == []
    assert body["payload_size"] == len(payload)
    if body["payload_encoding"] == "base64":
        assert base64.b64decode(body["payload_excerpt"]) == payload[:200]
    else:
        quoted = body["payload_excerpt"].encode()
        assert payload.startswith(quoted) and len(payload[:200]) - len(quoted) <= 3


other_commands = st.fixed_dictionaries(
    {"request_id": st.text(max_size=70) | json_values},
    optional={"schema": st.sampled_from([f"guardpost/cmd-{c}@1" for c in COMMANDS])
              | json_values,
              "by": st.text(st.characters(codec=None, exclude_categories=()),
                            max_size=250) | json_values,
              "input": st.text(max_size=70) | json_values,
              "camera": st.text(max_size=70) | json_values})


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([*COMMANDS, "reboot", ""]), other_commands | json_values)
def test_every_command_body_becomes_a_normalised_command_or_a_rejection(name, body):
    """What a signed envelope carries (its signature says nothing about its content)."""
    try:
        command = command_from_body(name, body) if isinstance(body, dict) else None
    except RejectedInput as rejected:
        assert str(rejected)
        return
    if command is None:
        return
    assert name in COMMANDS and 1 <= len(command.request_id) <= 64
    assert body["schema"] == f"guardpost/cmd-{name}@1"
    if command.by is not None:
        command.by.encode("utf-8")  # storable
    if name not in ("test", "reset"):
        assert getattr(command, "input", None) is None
