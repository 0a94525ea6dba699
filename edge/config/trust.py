"""Whom the device believes: the police platform's signing keys and their roles.

An acknowledgement or a command is believed only when one of these keys signed it
(:mod:`edge.contract.signing`), and only for what that key's roles allow: ``ack`` to
acknowledge an event, ``command`` to command the device (tests, resets, snapshots,
silencing the siren, ping). Several keys may be listed: that is how a key is rotated
(docs/contract.md, "Key rotation").
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from edge.config.base import Strict
from edge.contract.b64url import unb64url

Role = Literal["ack", "command"]


class PlatformKeyConfig(Strict):
    key_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$",
                        description="The name the platform puts in each message it signs")
    public_key: str = Field(
        description="The key's Ed25519 public key: base64url of its 32 raw bytes (43 characters)")
    roles: list[Role] = Field(min_length=1, description="'ack', 'command' or both")

    @field_validator("public_key")
    @classmethod
    def _ed25519_public_key(cls, value: str) -> str:
        try:
            unb64url(value, 32)
        except ValueError:
            raise ValueError("must be base64url of 32 bytes (an Ed25519 public key, "
                             "43 characters)") from None
        return value

    @field_validator("roles")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each role once")
        return value


class TrustConfig(Strict):
    platform_keys: list[PlatformKeyConfig] = Field(
        min_length=1, description="The platform keys whose signatures the device believes")
    # -- signed events (docs/contract.md, "Signed events") ----------------------------
    event_key: Path = Field(
        Path("credential:event-signing.key"),
        description="The device's Ed25519 private key (PEM) that signs every event it "
                    "publishes; only the uplink reads it. 'credential:NAME' is resolved "
                    "like the TLS key; guardpost provision creates it")

    @model_validator(mode="after")
    def _usable(self) -> TrustConfig:
        ids = [key.key_id for key in self.platform_keys]
        if len(set(ids)) != len(ids):
            raise ValueError("platform_keys: each key_id once")
        if not any("ack" in key.roles for key in self.platform_keys):
            # Without it no alarm could ever be acknowledged: every one would go out by
            # SMS and the LED would never say "police received it".
            raise ValueError("platform_keys: no key may acknowledge (role 'ack')")
        return self

    def keyring(self):
        """The keys as :class:`edge.contract.signing.Keyring`."""
        # Imported here: the button daemon reads this section but never loads cryptography.
        from edge.contract.signing import Keyring

        ring = Keyring()
        for key in self.platform_keys:
            ring.add(key.key_id, unb64url(key.public_key), key.roles)
        return ring
