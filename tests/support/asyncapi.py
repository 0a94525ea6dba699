"""The contract's AsyncAPI document (docs/asyncapi.yaml): its channels, and validators of
their payloads built from the JSON Schemas it references (docs/schemas).

The platform stand-in finds the channel of every message a test sees here, so a topic the
device uses that the document lacks, or a payload its channel's schema refuses, fails the
test that produced it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource

DOCS = Path(__file__).resolve().parents[2] / "docs"
DOCUMENT = DOCS / "asyncapi.yaml"
# The JSON Schemas' $ids are https://guardpost.example/schemas/{name}.schema.json: the
# document is given the base beside them, so its relative references ("schemas/x.json")
# mean the same here as on disk.
BASE_URI = "https://guardpost.example/asyncapi.yaml"
JSON_SCHEMA_FORMAT = "application/schema+json;version=2020-12"
DEVICE_PREFIX = "guardpost/v1/{site_id}/{device_id}/"
# Channels outside a device's subtree (platform presence) are matched below the root:
# their "leaf" is ``_platform/{platform_id}/presence``, which no device leaf can be.
ROOT_PREFIX = "guardpost/v1/"


@dataclass(frozen=True)
class Channel:
    name: str
    address: str
    leaf: re.Pattern  # the address below the device prefix, parameters as regexes
    messages: dict[str, dict]  # message id -> the message object, references resolved


@cache
def document() -> dict:
    return yaml.safe_load(DOCUMENT.read_text())


def pointer(ref: str, doc: dict | None = None):
    """What a local reference (``#/a/b``) of the document points at; KeyError if nothing."""
    node = document() if doc is None else doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _deref(node):
    while isinstance(node, dict) and isinstance(node.get("$ref"), str) \
            and node["$ref"].startswith("#/"):
        node = pointer(node["$ref"])
    return node


def _leaf_pattern(address: str, parameters: dict) -> re.Pattern:
    if address.startswith(DEVICE_PREFIX):
        below = address[len(DEVICE_PREFIX):]
    elif address.startswith(ROOT_PREFIX) and not address.startswith(f"{ROOT_PREFIX}{{"):
        below = address[len(ROOT_PREFIX):]
    else:
        raise ValueError(f"{address}: neither below {DEVICE_PREFIX} nor a fixed level of the root")
    pattern = ""
    for part in re.split(r"(\{[^}]+\})", below):
        if part.startswith("{"):
            parameter = _deref(parameters[part[1:-1]])
            values = parameter.get("enum")
            pattern += f"(?:{'|'.join(map(re.escape, values))})" if values else "[^/+#]+"
        else:
            pattern += re.escape(part)
    return re.compile(pattern)


@cache
def channels() -> tuple[Channel, ...]:
    return tuple(
        Channel(name, body["address"], _leaf_pattern(body["address"], body.get("parameters", {})),
                {mid: _deref(m) for mid, m in body.get("messages", {}).items()})
        for name, body in document()["channels"].items())


def channel_of(leaf: str) -> Channel | None:
    """The channel of a topic below the device prefix (``event/alarm``, ``status``...), or
    below the root for the platform's own (``_platform/desk-1/presence``)."""
    found = [c for c in channels() if c.leaf.fullmatch(leaf)]
    if len(found) > 1:
        raise AssertionError(f"{leaf}: in several channels {[c.name for c in found]}")
    return found[0] if found else None


@cache
def registry() -> Registry:
    resources = []
    for path in sorted((DOCS / "schemas").glob("*.schema.json")):
        schema = json.loads(path.read_text())
        resources.append((schema["$id"], Resource.from_contents(schema)))
    return Registry().with_resources(resources)


def _json_schema(multi_format: dict) -> dict:
    """The JSON Schema of a payload or headers object (a Multi Format Schema Object)."""
    if multi_format.get("schemaFormat") != JSON_SCHEMA_FORMAT:
        raise ValueError(f"not {JSON_SCHEMA_FORMAT}: {multi_format}")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": BASE_URI,
            **multi_format["schema"]}


@cache
def _validator(channel: str, message: str, part: str) -> Draft202012Validator:
    chosen = next(c for c in channels() if c.name == channel).messages[message][part]
    schema = _json_schema(chosen)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, registry=registry(), format_checker=FormatChecker())


def json_messages(channel: Channel) -> list[str]:
    """The channel's messages whose payload is JSON described by a JSON Schema."""
    return [mid for mid, m in channel.messages.items()
            if isinstance(m.get("payload"), dict) and "schemaFormat" in m["payload"]]


def _problems(validator: Draft202012Validator, document_) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in validator.iter_errors(document_)]


def payload_problems(leaf: str, body) -> list[str]:
    """Why ``body`` (decoded JSON) is not a payload of the channel of ``leaf``, per
    docs/asyncapi.yaml; empty when it is one of the channel's messages."""
    channel = channel_of(leaf)
    if channel is None:
        return [f"no channel of {DOCUMENT.name} matches {leaf}"]
    messages = json_messages(channel)
    if not messages:
        return [f"channel {channel.name} has no JSON message"]
    found = [_problems(_validator(channel.name, mid, "payload"), body) for mid in messages]
    return [] if any(not p for p in found) else min(found, key=len)


def header_problems(leaf: str, message: str, headers: dict) -> list[str]:
    """Why ``headers`` (MQTT 5 user properties, typed) are not ``message``'s headers."""
    channel = channel_of(leaf)
    if channel is None or message not in channel.messages:
        return [f"no channel of {DOCUMENT.name} with message {message} matches {leaf}"]
    return _problems(_validator(channel.name, message, "headers"), headers)
