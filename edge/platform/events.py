"""Verifying what devices publish: every event carries the device's Ed25519 signature.

:func:`verify_event` checks one payload against one device's public key (or the few keys
listed for it during a rotation), :func:`verify_snapshot` a camera snapshot's signed
description and its JPEG; :class:`DeviceKeys` is the platform's registry of which key
belongs to which device, read from a small TOML or JSON file::

    # guardpost-device-keys.toml: "site_id/device_id" = its event-signing public key
    # (base64url of the 32 raw bytes, as `guardpost provision` prints it), or a list of
    # keys while a device's key is being replaced.
    [devices]
    "school-330106-0042/gate-south-1" = "JUO5L_EJVRFHatyDadtt3JM2ZaEZeN2hQE7hBmypVZ0"

The format and the verification steps are in docs/contract.md ("Signed events").
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge.contract import event_signature
from edge.contract.b64url import unb64url
from edge.contract.events import EVENT_SCHEMA

PublicKeyLike = Ed25519PublicKey | bytes | str


class EventNotVerified(ValueError):
    """The payload is not an event this device signed; the message says why."""


def public_key(value: PublicKeyLike) -> Ed25519PublicKey:
    """An Ed25519 public key from the key itself, its 32 raw bytes, or their base64url."""
    if isinstance(value, Ed25519PublicKey):
        return value
    if isinstance(value, str):
        try:
            value = unb64url(value, 32)
        except ValueError:
            raise ValueError("a public key is base64url of 32 bytes (43 characters)") from None
    if not isinstance(value, bytes) or len(value) != 32:
        raise ValueError("a public key is base64url of 32 bytes (43 characters)")
    return Ed25519PublicKey.from_public_bytes(value)


def _keys(value: PublicKeyLike | Iterable[PublicKeyLike]) -> list[Ed25519PublicKey]:
    if isinstance(value, Ed25519PublicKey | bytes | str):
        return [public_key(value)]
    return [public_key(item) for item in value]


def verify_event(payload: bytes, device_public_key: PublicKeyLike | Iterable[PublicKeyLike],
                 *, topic: str | None = None) -> dict[str, Any]:
    """The event (as the device recorded it: without ``device_signature``) if the device's
    key signed exactly these bytes; else :class:`EventNotVerified`.

    ``topic``, when given, must name the event's own site, device and kind (the topic is
    not signed: a bridge may change its root, not the device it names).
    """
    try:
        unsigned = event_signature.verify(payload, _keys(device_public_key))
    except event_signature.SignatureError as err:
        raise EventNotVerified(str(err)) from None
    try:
        event = json.loads(unsigned)
    except (ValueError, RecursionError) as err:
        raise EventNotVerified(f"signed, but not JSON ({type(err).__name__})") from None
    if not isinstance(event, dict) or event.get("schema") != EVENT_SCHEMA:
        raise EventNotVerified(f"signed, but not an event (schema {EVENT_SCHEMA})")
    if topic is not None:
        expected = f"/{event.get('site_id')}/{event.get('device_id')}/event/{event.get('kind')}"
        if not topic.endswith(expected):
            raise EventNotVerified(f"signed for another topic: the event names {expected[1:]}")
    return event


def verify_snapshot(description: dict, jpeg: bytes,
                    device_public_key: PublicKeyLike | Iterable[PublicKeyLike], *,
                    topic: str | None = None) -> dict[str, Any]:
    """The description of a camera snapshot (MQTT 5 user properties as a dict, or the
    MQTT 3.1.1 JSON line parsed) if the device signed it and ``jpeg`` is the picture it
    names; else :class:`EventNotVerified`."""
    if not isinstance(description, dict):
        raise EventNotVerified("not a snapshot description")
    try:
        event_signature.verify_snapshot(description, jpeg, _keys(device_public_key))
    except event_signature.SignatureError as err:
        raise EventNotVerified(str(err)) from None
    if topic is not None:
        expected = (f"/{description['site_id']}/{description['device_id']}/snapshot/"
                    f"{description['event_id']}")
        if not topic.endswith(expected):
            raise EventNotVerified(f"signed for another topic: it names {expected[1:]}")
    return description


class DeviceKeys:
    """Which event-signing public key(s) each device has, by site and device id."""

    def __init__(self):
        self._keys: dict[tuple[str, str], list[Ed25519PublicKey]] = {}

    def add(self, site_id: str, device_id: str, key: PublicKeyLike) -> None:
        """Another key of this device (more than one while its key is replaced)."""
        self._keys.setdefault((site_id, device_id), []).append(public_key(key))

    def keys_of(self, site_id: str, device_id: str) -> list[Ed25519PublicKey]:
        return list(self._keys.get((site_id, device_id), ()))

    def __len__(self) -> int:
        return len(self._keys)

    @classmethod
    def from_mapping(cls, devices: dict) -> DeviceKeys:
        """``{"site_id/device_id": key or [keys]}``."""
        registry = cls()
        if not isinstance(devices, dict):
            raise ValueError("devices must map 'site_id/device_id' to a public key")
        for name, keys in devices.items():
            site, slash, device = str(name).partition("/")
            if not slash or not site or not device or "/" in device:
                raise ValueError(f"{name!r}: a device is named 'site_id/device_id'")
            for key in [keys] if isinstance(keys, str) else keys:
                try:
                    registry.add(site, device, key)
                except (ValueError, TypeError) as err:
                    raise ValueError(f"{name}: {err}") from None
        return registry

    @classmethod
    def load(cls, path: str | Path) -> DeviceKeys:
        """A registry file: TOML, or JSON when its name ends in ``.json``; its table
        ``devices`` as in this module's description. ValueError or OSError say why not."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        try:
            document = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"{path}: {err}") from None
        if not isinstance(document, dict) or "devices" not in document:
            raise ValueError(f"{path}: no table 'devices'")
        try:
            return cls.from_mapping(document["devices"])
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def verify(self, payload: bytes, *, topic: str | None = None) -> dict[str, Any]:
        """The event, verified with the key(s) of the device it names; else
        :class:`EventNotVerified`."""
        try:
            claimed = json.loads(payload)
        except (ValueError, RecursionError) as err:
            raise EventNotVerified(f"not JSON ({type(err).__name__})") from None
        if not isinstance(claimed, dict):
            raise EventNotVerified("not an event (not a JSON object)")
        site, device = claimed.get("site_id"), claimed.get("device_id")
        keys = self.keys_of(site, device) if isinstance(site, str) and isinstance(
            device, str) else []
        if not keys:
            raise EventNotVerified(f"no key registered for device {site}/{device}")
        event = verify_event(payload, keys, topic=topic)
        if (event.get("site_id"), event.get("device_id")) != (site, device):
            raise EventNotVerified("the signed event names another device")  # duplicate keys
        return event

    def verify_snapshot(self, description: dict, jpeg: bytes, *,
                        topic: str | None = None) -> dict[str, Any]:
        """A snapshot's description, verified with the key(s) of the device it names."""
        site, device = (description.get("site_id"), description.get("device_id")) \
            if isinstance(description, dict) else (None, None)
        keys = self.keys_of(site, device) if isinstance(site, str) and isinstance(
            device, str) else []
        if not keys:
            raise EventNotVerified(f"no key registered for device {site}/{device}")
        return verify_snapshot(description, jpeg, keys, topic=topic)
