"""Signing what the platform sends a device: acknowledgements and commands.

The envelope, its signature and the rules a device applies are in
:mod:`edge.contract.signing` and docs/contract.md ("Signed acknowledgements and
commands"). A signer holds one Ed25519 private key and the ``key_id`` the devices know it
by (their ``[[trust.platform_keys]]``); what it may do is decided by the roles the devices
give that key, not here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.contract.b64url import b64url
from edge.contract.event_signature import private_key_pem
from edge.contract.events import utc_iso, utc_now
from edge.contract.messages import ACK_SCHEMA
from edge.contract.signing import seal


@dataclass(frozen=True)
class PlatformSigner:
    """One platform key: ``key_id`` is how the devices' configuration names it."""

    key_id: str
    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls, key_id: str) -> PlatformSigner:
        return cls(key_id, Ed25519PrivateKey.generate())

    @classmethod
    def from_file(cls, key_id: str, path: str | Path) -> PlatformSigner:
        """A PEM (PKCS #8) Ed25519 private key, as :meth:`save` writes it."""
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        return cls(key_id, key)

    def save(self, path: str | Path) -> None:
        """The private key as PEM, readable by its owner only."""
        pem = private_key_pem(self.private_key)
        path = Path(path)
        temporary = path.with_name(path.name + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(pem)
        os.replace(temporary, path)

    @property
    def public_key(self) -> str:
        """What a device's configuration lists: base64url of the 32 raw bytes."""
        raw = self.private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                         serialization.PublicFormat.Raw)
        return b64url(raw)

    def trust_entry(self, roles) -> dict[str, Any]:
        """This key as one ``[[trust.platform_keys]]`` entry of a device's configuration."""
        return {"key_id": self.key_id, "public_key": self.public_key, "roles": list(roles)}

    # -- what the platform sends ---------------------------------------------------------

    def sign(self, topic: str, body: Mapping[str, Any], *, at: datetime | None = None,
             nonce: bytes | None = None) -> bytes:
        """The signed envelope of ``body`` for exactly ``topic`` (a device's full topic)."""
        return seal(self.private_key, self.key_id, topic, body, at or utc_now(), nonce)

    def ack(self, prefix: str, event_id: str, *, by: str | None = None,
            acknowledged_at: datetime | None = None,
            signed_at: datetime | None = None) -> tuple[str, bytes]:
        """``(topic, payload)`` acknowledging ``event_id`` to the device at ``prefix``
        (``{root}/{site_id}/{device_id}``)."""
        body: dict[str, Any] = {"schema": ACK_SCHEMA, "event_id": event_id,
                                "acknowledged_at": utc_iso(acknowledged_at or utc_now())}
        if by:
            body["by"] = by
        topic = f"{prefix}/ack"
        return topic, self.sign(topic, body, at=signed_at)

    def command(self, prefix: str, name: str, body: Mapping[str, Any], *,
                signed_at: datetime | None = None) -> tuple[str, bytes]:
        """``(topic, payload)`` of the command ``name`` (``test``, ``snapshot``, ``reset``,
        ``silence``, ``ping``) to the device at ``prefix``."""
        topic = f"{prefix}/cmd/{name}"
        return topic, self.sign(topic, body, at=signed_at)
