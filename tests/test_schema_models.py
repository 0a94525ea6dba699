"""One source of truth: the published JSON Schemas of what the platform sends (docs/schemas
ack, cmd-test, cmd) say what the code's pydantic models (edge/contract/messages.py) accept.

Two ways: the schema pydantic generates from each model is compared with the published one
field by field (required, type, pattern, lengths, additionalProperties); and the same
documents are given to both, which must agree on every one."""

from __future__ import annotations

import re

import pytest
from pydantic import BaseModel, ValidationError

from edge.contract.messages import COMMANDS, AckMessage, CommandMessage, TestCommand
from edge.contract.presence import PresenceBody, presence_body
from tests.support.contract import validator

PAIRS = [(AckMessage, "ack"), (TestCommand, "cmd-test"), (CommandMessage, "cmd"),
         (PresenceBody, "presence")]
EVENT_ID = "01a2096d-0b4c-7fef-8f6b-3cf8b11cdc8f"
# Values a "schema" field could be given: every name the contract uses, and near misses.
SCHEMA_NAMES = ["guardpost/ack@1", "guardpost/ack@2", "guardpost/cmd-test@1", "guardpost/cmd@1",
                *(f"guardpost/cmd-{name}@1" for name in [*COMMANDS, "reboot"])]


def _non_null(field: dict) -> tuple[dict, bool]:
    """A model field's schema without pydantic's ``anyOf [..., null]`` for an optional, and
    whether null was allowed."""
    options = [o for o in field.get("anyOf", [field]) if o.get("type") != "null"]
    assert len(options) == 1, field
    return options[0], len(options) < len(field.get("anyOf", [field]))


def _published_non_null(field: dict) -> tuple[dict, bool]:
    """The same for a published field: ``"type": [t, "null"]`` or an enum holding null."""
    field = dict(field)
    nullable = False
    if isinstance(field.get("type"), list):
        nullable = "null" in field["type"]
        (field["type"],) = [t for t in field["type"] if t != "null"]
    if "enum" in field and None in field["enum"]:
        nullable = True
        field["enum"] = [v for v in field["enum"] if v is not None]
    return field, nullable


def _allowed_names(field: dict) -> set[str]:
    if "const" in field:
        return {field["const"]}
    if "enum" in field:
        return set(field["enum"])
    return {n for n in SCHEMA_NAMES if re.fullmatch(field["pattern"], n)}


@pytest.mark.parametrize(("model", "name"), PAIRS, ids=[n for _, n in PAIRS])
def test_the_models_generated_schema_is_the_published_one(model: type[BaseModel], name):
    generated = model.model_json_schema(by_alias=True)
    published = validator(name).schema
    assert generated["additionalProperties"] is published["additionalProperties"] is False
    assert set(generated["required"]) == set(published["required"])
    assert set(generated["properties"]) == set(published["properties"])
    for key, ours in generated["properties"].items():
        (ours, ours_nullable), (theirs, theirs_nullable) = (
            _non_null(ours), _published_non_null(published["properties"][key]))
        # an optional field takes an explicit null in both (Jackson and Go write them)
        assert ours_nullable == theirs_nullable == (key not in published["required"]), key
        if key == "schema":  # a pattern in the model, a const or an enum in the schema
            assert _allowed_names(ours) == _allowed_names(theirs), key
            continue
        for keyword in ("type", "pattern", "minLength", "maxLength"):
            assert ours.get(keyword) == theirs.get(keyword), (key, keyword)


def _accepts_model(model: type[BaseModel], document: dict) -> bool:
    try:
        model.model_validate(document)
    except ValidationError:
        return False
    return True


ACK = {"schema": "guardpost/ack@1", "event_id": EVENT_ID,
       "acknowledged_at": "2026-11-23T07:41:10.002Z", "by": "duty officer 3"}
TEST = {"schema": "guardpost/cmd-test@1", "request_id": "r-1", "by": "duty officer 3"}
RESET = {"schema": "guardpost/cmd-reset@1", "request_id": "r-2", "by": "x", "input": "gate"}
PRESENCE = presence_body("desk-1", "online", 1796284800000)
CASES = {
    "ack": [ACK, {"event_id": EVENT_ID}, {**ACK, "extra": 1}, {**ACK, "event_id": 7},
            {**ACK, "event_id": EVENT_ID.upper()}, {**ACK, "by": "x" * 201},
            {**ACK, "by": "x" * 200}, {**ACK, "schema": "guardpost/ack@2"}, {"by": "x"}],
    "cmd-test": [TEST, {**TEST, "request_id": ""}, {**TEST, "request_id": "a b"},
                 {**TEST, "request_id": "x" * 65}, {**TEST, "request_id": 5},
                 {k: v for k, v in TEST.items() if k != "schema"}, {**TEST, "camera": "c"}],
    "cmd": [RESET, {**RESET, "schema": "guardpost/cmd-test@1"},
            {**RESET, "input": "-gate"}, {**RESET, "input": "g" * 65},
            {**RESET, "camera": "cam.1"}, {**RESET, "input": True},
            *({"schema": f"guardpost/cmd-{n}@1", "request_id": "r"} for n in COMMANDS)],
    "presence": [PRESENCE, {**PRESENCE, "reason": "shutdown"}, {**PRESENCE, "reason": None},
                 {**PRESENCE, "state": "away"}, {**PRESENCE, "session": -1},
                 {**PRESENCE, "session": 2 ** 53}, {**PRESENCE, "session": 1.5},
                 {**PRESENCE, "platform_id": "_x"}, {**PRESENCE, "reason": "r" * 201},
                 {k: v for k, v in PRESENCE.items() if k != "session"},
                 {**PRESENCE, "schema": "guardpost/presence@2"}, {**PRESENCE, "extra": 1}],
}


@pytest.mark.parametrize(("model", "name"), PAIRS, ids=[n for _, n in PAIRS])
def test_model_and_schema_accept_the_same_documents(model: type[BaseModel], name):
    disagree = [doc for doc in CASES[name]
                if _accepts_model(model, doc) != validator(name).is_valid(doc)]
    assert disagree == []
    # (the cases include both outcomes, so this cannot pass by accepting everything)
    assert {validator(name).is_valid(doc) for doc in CASES[name]} == {True, False}


@pytest.mark.parametrize(("model", "name", "document"), [
    (AckMessage, "ack", {"event_id": EVENT_ID, "by": None}),
    (AckMessage, "ack", {"event_id": EVENT_ID, "acknowledged_at": None}),
    (TestCommand, "cmd-test", {**TEST, "by": None}),
    (CommandMessage, "cmd", {**RESET, "input": None}),
], ids=["ack-by", "ack-acknowledged_at", "cmd-test-by", "cmd-input"])
def test_an_explicit_null_is_an_absent_field_in_both(model, name, document):
    assert _accepts_model(model, document)
    assert validator(name).is_valid(document)
