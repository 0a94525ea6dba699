"""docs/asyncapi.yaml: a valid AsyncAPI 3.0.0 document whose references all resolve, with a
channel for every topic the code publishes or subscribes to, and payload schemas that
accept what the code produces and refuse what it refuses. No broker needed."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from jsonschema import Draft7Validator
from referencing.exceptions import Unresolvable

from edge.contract.events import ContactId, EventKind
from edge.contract.messages import COMMANDS, Topics
from edge.platform.presence import PlatformPresence
from tests.support import asyncapi
from tests.support.trust import ADMIN, DUTY_DESK

OFFICIAL_SCHEMA = Path(__file__).parent / "data" / "asyncapi-3.0.0.schema.json"
PREFIX = "guardpost/v1/school-330106-0042/gate-south-1"


def _references(node, where=""):
    """Every ``$ref`` in a JSON-like tree, with where it is."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield where, value
            else:
                yield from _references(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _references(value, f"{where}/{index}")


def test_the_document_is_valid_asyncapi_3():
    schema = json.loads(OFFICIAL_SCHEMA.read_text())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in Draft7Validator(schema).iter_errors(asyncapi.document())]
    assert errors == []
    assert asyncapi.document()["asyncapi"] == "3.0.0"


def test_the_official_schema_refuses_what_asyncapi_3_does_not_allow():
    # So that the test above could fail: an AsyncAPI 2 verb, and a QoS MQTT lacks.
    schema = Draft7Validator(json.loads(OFFICIAL_SCHEMA.read_text()))
    document = json.loads(json.dumps(asyncapi.document()))
    document["operations"]["publishEvent"]["action"] = "publish"
    document["operations"]["publishStatus"]["bindings"]["mqtt"]["qos"] = 3
    assert len(list(schema.iter_errors(document))) == 2


def test_every_reference_of_the_document_resolves():
    broken = []
    for where, ref in _references(asyncapi.document()):
        if ref.startswith("#/"):
            try:
                asyncapi.pointer(ref)
            except (KeyError, TypeError):
                broken.append(f"{where}: {ref}")
        else:
            try:
                asyncapi.registry().resolver(asyncapi.BASE_URI).lookup(ref)
            except Unresolvable:
                broken.append(f"{where}: {ref}")
    assert broken == []


def test_every_reference_inside_the_json_schemas_resolves():
    registry = asyncapi.registry()
    broken = []
    for uri in registry:
        for where, ref in _references(registry.contents(uri)):
            try:
                registry.resolver(uri).lookup(ref)
            except Unresolvable:
                broken.append(f"{uri}{where}: {ref}")
    assert broken == []
    assert len(list(registry)) == len(list((asyncapi.DOCS / "schemas").glob("*.json")))


def test_every_operation_says_qos_1_and_whether_retained():
    retained = {name for name, op in asyncapi.document()["operations"].items()
                if op["bindings"]["mqtt"]["retain"]}
    assert {op["bindings"]["mqtt"]["qos"]
            for op in asyncapi.document()["operations"].values()} == {1}
    assert retained == {"publishStatus", "publishHealth", "receivePresence"}


def _code_topics() -> dict[str, str]:
    """Every topic the code uses below the device prefix -> the channel it must be in."""
    topics = Topics(PREFIX)
    leaf = {name: getattr(topics, name)[len(PREFIX) + 1:]
            for name in ("status", "health", "ack", "rejected", "cmd_test", "reply_test")}
    expected = {leaf["status"]: "status", leaf["health"]: "health", leaf["ack"]: "ack",
                leaf["rejected"]: "rejected", leaf["cmd_test"]: "cmdTest",
                leaf["reply_test"]: "reply", f"snapshot/{uuid.uuid4()}": "snapshot"}
    expected |= {f"event/{kind.value}": "event" for kind in EventKind}
    expected |= {topics.reply(name)[len(PREFIX) + 1:]: "reply" for name in COMMANDS}
    expected |= {f"cmd/{name}": "cmd" for name in COMMANDS if name != "test"}
    return expected


@pytest.mark.parametrize(("leaf", "channel"), sorted(_code_topics().items()))
def test_every_topic_of_the_code_is_a_channel(leaf, channel):
    found = asyncapi.channel_of(leaf)
    assert found is not None and found.name == channel


def test_unknown_topics_are_in_no_channel():
    for leaf in ("cmd/reboot", "event/panic", "status/extra", "snapshot/a/b",
                 "reply/a/b"):
        assert asyncapi.channel_of(leaf) is None, leaf


def test_every_contact_id_code_is_in_the_event_description():
    description = asyncapi.document()["components"]["messages"]["event"]["description"]
    missing = [code for code in ContactId if f"| {code.value} " not in description
               and f" {code.value} |" not in description]
    assert missing == []


def test_signed_messages_are_checked_envelope_and_body():
    event_id = str(uuid.uuid4())
    _, payload = DUTY_DESK.ack(PREFIX, event_id, by="duty officer 3")
    assert asyncapi.payload_problems("ack", json.loads(payload)) == []
    envelope = json.loads(payload)
    del envelope["body"]["event_id"]
    assert any("event_id" in p for p in asyncapi.payload_problems("ack", envelope))
    del envelope["signature"]
    assert any("signature" in p for p in asyncapi.payload_problems("ack", envelope))

    _, test = ADMIN.command(PREFIX, "test", {"schema": "guardpost/cmd-test@1",
                                             "request_id": "r-1"})
    assert asyncapi.payload_problems("cmd/test", json.loads(test)) == []
    _, ping = ADMIN.command(PREFIX, "ping", {"schema": "guardpost/cmd-ping@1",
                                             "request_id": "r-2"})
    assert asyncapi.payload_problems("cmd/ping", json.loads(ping)) == []
    assert asyncapi.payload_problems("cmd/test", json.loads(ping)) != []


def test_platform_presence_is_a_channel_of_its_own():
    presence = PlatformPresence(DUTY_DESK, "guardpost/v1", "console-desk7")
    topic, online, will = presence.connecting()
    leaf = topic[len("guardpost/v1/"):]
    assert asyncapi.channel_of(leaf).name == "presence"
    for payload in (online, will, presence.stopping()[1]):
        assert asyncapi.payload_problems(leaf, json.loads(payload)) == []
    envelope = json.loads(online)
    envelope["body"]["state"] = "away"
    assert any("state" in p for p in asyncapi.payload_problems(leaf, envelope))
    assert asyncapi.payload_problems("ack", json.loads(online)) != []
    for other in ("_platform/a/b/presence", "_platform/+/presence", "x/_platform/a/presence"):
        assert asyncapi.channel_of(other) is None, other


def test_a_payload_of_another_channel_is_refused():
    _, payload = DUTY_DESK.ack(PREFIX, str(uuid.uuid4()))
    assert asyncapi.payload_problems("status", json.loads(payload)) != []
    assert asyncapi.payload_problems("cmd/reboot", {}) == [
        "no channel of asyncapi.yaml matches cmd/reboot"]
