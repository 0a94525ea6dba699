"""Home Assistant MQTT discovery configs for a Guardpost device (what ``guardpost
ha-discovery`` publishes; :mod:`edge.platform.ha_publisher` does the MQTT side).

Every config points at the device's *own* topics (docs/contract.md), so nothing is copied
or re-published: Home Assistant reads ``status``, ``health`` and ``event/{kind}`` itself
and turns them into entities with the templates below (Jinja2, ``value_json`` = the parsed
payload). Per device:

- event "Panic button" (``event/alarm``) and "Alarm reset" (``event/reset``);
- binary_sensor "Connectivity" from ``status`` (the birth and the will);
- from ``health``: sensors "Outbox queued", "Sent, unacknowledged", "Uptime", "Police
  platform" and binary_sensors "Alarm latched" and "Fault" (device_class problem), each
  available only while ``status`` says online.

Discovery topics are ``{prefix}/{component}/{node_id}/{object_id}/config``; Home Assistant
allows only ``[a-zA-Z0-9_-]`` in node and object ids, and a site id may hold a '.', so an
id that had to be changed gets a short hash of the original (two sites never share one).
"""

from __future__ import annotations

import hashlib
import re

from edge import __version__

MANUFACTURER = "Guardpost"
MODEL = "Guardpost one-key alarm terminal"
ORIGIN = {"name": "guardpost ha-discovery", "sw_version": __version__}
_NOT_ALLOWED = re.compile(r"[^a-zA-Z0-9_-]")

# Availability of the health-based entities: the device's retained status (birth / will).
STATUS_AVAILABLE_TEMPLATE = "{{ value_json.state }}"
CONNECTIVITY_TEMPLATE = "{{ 'ON' if value_json.state == 'online' else 'OFF' }}"
# An event entity's template must give JSON with "event_type"; the rest become attributes.
EVENT_TEMPLATE = ('{{ {"event_type": value_json.kind, "input": value_json.input, '
                  '"seq": value_json.seq, "code": value_json.code, '
                  '"id": value_json.id, "occurred_at": value_json.occurred_at, '
                  '"repeat": value_json.repeat | default(0)} | tojson }}')
LATCHED_TEMPLATE = "{{ 'ON' if value_json.latched | default([]) | length > 0 else 'OFF' }}"
FAULT_TEMPLATE = ("{{ 'ON' if (value_json.checks | default({})).values() "
                  "| selectattr('fault') | list | length > 0 else 'OFF' }}")
FAULT_ATTRIBUTES_TEMPLATE = (
    "{{ {'faults': (value_json.checks | default({})).items() | selectattr('1.fault') "
    "| map(attribute='0') | list} | tojson }}")
PLATFORM_TEMPLATE = ("{{ value_json.platform.state if value_json.platform is defined "
                     "else 'unknown' }}")


def safe_id(text: str) -> str:
    """``text`` as a Home Assistant node or object id; changed ids keep a hash of the
    original so that ``a.b`` and ``a_b`` stay two devices."""
    safe = _NOT_ALLOWED.sub("_", text)
    if safe != text:
        safe += "_" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return safe


def node_id(site_id: str, device_id: str) -> str:
    return f"guardpost_{safe_id(site_id)}_{safe_id(device_id)}"


def device_block(site_id: str, device_id: str, birth: dict, location: str | None) -> dict:
    block = {"identifiers": [f"guardpost_{site_id}_{device_id}"],
             "name": location or f"{site_id}/{device_id}",
             "manufacturer": MANUFACTURER, "model": MODEL}
    if isinstance(birth.get("version"), str):
        block["sw_version"] = birth["version"]
    return block


def configs(discovery_prefix: str, root: str, site_id: str, device_id: str, birth: dict,
            location: str | None = None) -> dict[str, dict]:
    """Every discovery config of this device: topic -> config (to publish retained)."""
    prefix = f"{root}/{site_id}/{device_id}"
    node = node_id(site_id, device_id)
    device = device_block(site_id, device_id, birth, location)
    availability = [{"topic": f"{prefix}/status", "value_template": STATUS_AVAILABLE_TEMPLATE,
                     "payload_available": "online", "payload_not_available": "offline"}]

    def entity(object_id: str, name: str, **keys) -> dict:
        return {"name": name, "unique_id": f"{node}_{object_id}", "device": device,
                "origin": ORIGIN, "qos": 1, **keys}

    health = f"{prefix}/health"
    entities = {
        ("event", "panic"): entity(
            "panic", "Panic button", state_topic=f"{prefix}/event/alarm",
            event_types=["alarm"], value_template=EVENT_TEMPLATE, icon="mdi:alarm-light"),
        ("event", "reset"): entity(
            "reset", "Alarm reset", state_topic=f"{prefix}/event/reset",
            event_types=["reset"], value_template=EVENT_TEMPLATE),
        ("binary_sensor", "connectivity"): entity(
            "connectivity", "Connectivity", state_topic=f"{prefix}/status",
            device_class="connectivity", value_template=CONNECTIVITY_TEMPLATE),
        ("binary_sensor", "latched"): entity(
            "latched", "Alarm latched", state_topic=health, device_class="problem",
            value_template=LATCHED_TEMPLATE, availability=availability),
        ("binary_sensor", "fault"): entity(
            "fault", "Fault", state_topic=health, device_class="problem",
            value_template=FAULT_TEMPLATE, json_attributes_topic=health,
            json_attributes_template=FAULT_ATTRIBUTES_TEMPLATE, availability=availability,
            entity_category="diagnostic"),
        ("sensor", "outbox_queued"): entity(
            "outbox_queued", "Outbox queued", state_topic=health,
            value_template="{{ value_json.outbox.queued }}", state_class="measurement",
            unit_of_measurement="events", availability=availability,
            entity_category="diagnostic"),
        ("sensor", "sent_unacknowledged"): entity(
            "sent_unacknowledged", "Sent, unacknowledged", state_topic=health,
            value_template="{{ value_json.outbox.sent_unacknowledged }}",
            state_class="measurement", unit_of_measurement="events",
            availability=availability, entity_category="diagnostic"),
        ("sensor", "uptime"): entity(
            "uptime", "Uptime", state_topic=health,
            value_template="{{ value_json.uptime_s | round(0) | int }}",
            device_class="duration", unit_of_measurement="s", state_class="measurement",
            availability=availability, entity_category="diagnostic"),
        ("sensor", "platform"): entity(
            "platform", "Police platform", state_topic=health, value_template=PLATFORM_TEMPLATE,
            device_class="enum", options=["online", "offline", "unknown"],
            availability=availability, entity_category="diagnostic"),
    }
    return {f"{discovery_prefix}/{component}/{node}/{object_id}/config": config
            for (component, object_id), config in entities.items()}


def config_topics(discovery_prefix: str, site_id: str, device_id: str) -> list[str]:
    """The topics :func:`configs` publishes on (``--remove`` empties them)."""
    return list(configs(discovery_prefix, "x", site_id, device_id, {}))
