"""``guardpost verify``: did this device publish this event, byte for byte?

    guardpost verify [FILE|-] [--public-key KEY | --device-keys FILE] [--topic T] [--json]

Checks one captured event payload (a file, or standard input; for example
``mosquitto_sub -C 1 -N -t 'guardpost/v1/+/+/event/#' > alarm.json``) against the device's
event-signing public key: given (``--public-key``, base64url as ``guardpost provision``
prints it), looked up by the event's site and device in a registry file
(``--device-keys``, see :mod:`edge.platform.events`), or, on the device itself, its own key
(the configuration's ``trust.event_key``). Prints the event, or why it is not believed;
exit status 0 if it verifies, 1 if not (64: the key or the file could not be read).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import BinaryIO, TextIO

from edge.platform.events import DeviceKeys, EventNotVerified, public_key, verify_event

EX_USAGE = 64


def own_device_keys(config) -> DeviceKeys:
    """This device's own public key, from its configuration (the demo, a check on site)."""
    from edge.contract.event_signature import EventSigner

    registry = DeviceKeys()
    registry.add(config.device.site_id, config.device.device_id,
                 EventSigner.from_file(config.trust.event_key).public_key)
    return registry


def read_capture(source: str | None, stdin: BinaryIO) -> bytes:
    """The captured payload; one line end a capture tool added is not part of it."""
    data = stdin.read() if source in (None, "-") else Path(source).read_bytes()
    for end in (b"\r\n", b"\n"):
        if data.endswith(end):
            return data[:-len(end)]
    return data


def check(payload: bytes, *, key: str | None = None, registry: DeviceKeys | None = None,
          topic: str | None = None) -> dict:
    """``{"verified": True, "event": ...}`` or ``{"verified": False, "reason": ...}``."""
    try:
        if registry is not None:
            event = registry.verify(payload, topic=topic)
        else:
            event = verify_event(payload, public_key(key), topic=topic)
    except EventNotVerified as err:
        return {"verified": False, "reason": str(err)}
    return {"verified": True, "event": event}


def render(result: dict) -> str:
    if not result["verified"]:
        return f"NOT VERIFIED: {result['reason']}"
    event = result["event"]
    return (f"VERIFIED: {event.get('kind')} #{event.get('seq')} of {event.get('site_id')}/"
            f"{event.get('device_id')}, signed with the device's key\n"
            + json.dumps(event, ensure_ascii=False, indent=2))


def run_verify(source: str | None, *, public_key_text: str | None, device_keys: str | None,
               config_path: str | None, topic: str | None, as_json: bool,
               stdin: BinaryIO | None = None, out: TextIO = sys.stdout,
               err: TextIO = sys.stderr) -> int:
    registry = None
    try:
        if public_key_text is not None:
            public_key(public_key_text)  # a bad key is a usage error, not a bad event
        elif device_keys is not None:
            registry = DeviceKeys.load(device_keys)
        else:
            from edge.config import load_config

            registry = own_device_keys(load_config(config_path, check_broker_files=False))
    except (OSError, ValueError) as problem:
        print(f"guardpost verify: {problem}", file=err)
        return EX_USAGE
    try:
        payload = read_capture(source, stdin or sys.stdin.buffer)
    except OSError as problem:
        print(f"guardpost verify: {source}: {problem.strerror}", file=err)
        return EX_USAGE
    result = check(payload, key=public_key_text, registry=registry, topic=topic)
    print(json.dumps(result, ensure_ascii=False) if as_json else render(result), file=out)
    return 0 if result["verified"] else 1
