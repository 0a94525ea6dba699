"""The platform keys every test device believes: a duty desk (may acknowledge) and an
administrator (may acknowledge and command). Fixed seeds: the same keys in every process
of a test run, with no key generation per test."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.platform import PlatformSigner


def _signer(key_id: str) -> PlatformSigner:
    seed = hashlib.sha256(f"guardpost test key {key_id}".encode()).digest()
    return PlatformSigner(key_id, Ed25519PrivateKey.from_private_bytes(seed))


DUTY_DESK = _signer("test-duty-desk")
ADMIN = _signer("test-admin")
STRANGER = _signer("test-stranger")  # signs correctly, but no device knows its key


def trust_section() -> dict:
    return {"platform_keys": [DUTY_DESK.trust_entry(["ack"]),
                              ADMIN.trust_entry(["ack", "command"])]}


def trust_toml() -> str:
    """The same, as TOML text for configuration templates (the benchmarks')."""
    import tomlkit

    return tomlkit.dumps({"trust": trust_section()})
