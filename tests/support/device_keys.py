"""The event-signing key of every test device (signed events, docs/contract.md): one fixed
seed, so every process of a test run (daemons, the platform stand-in, benchmarks) knows
it without generating keys per test."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.contract.event_signature import EventSigner, private_key_pem

EVENT_KEY = Ed25519PrivateKey.from_private_bytes(
    hashlib.sha256(b"guardpost test device event key").digest())
EVENT_SIGNER = EventSigner(EVENT_KEY)
EVENT_PUBLIC_KEY = EVENT_KEY.public_key()
# Signs correctly, but is not the device's key.
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(
    hashlib.sha256(b"guardpost test other event key").digest())

KEY_FILE = "event-signing.key"  # the default trust.event_key: credential:event-signing.key


def write_event_key(directory: Path, name: str = KEY_FILE) -> Path:
    """The test key as ``directory/name``: a configuration finds it by default in the
    ``credentials`` directory beside it (``gp_event-signing.key`` under systemd)."""
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(private_key_pem(EVENT_KEY))
        path.chmod(0o600)
    return path

