"""Signed platform messages: the envelope, its signature, its time window and its nonce.

What an acknowledgement or a command must carry for the device to believe it (the
uplink's :mod:`edge.daemons.uplink.inbound` opens every one with :func:`open_envelope`;
the platform side signs with :mod:`edge.platform`). The contract's test vectors
(``docs/vectors/``) are made and checked with this module.

The envelope (JSON, UTF-8), published on the device's ``ack`` or ``cmd/...`` topic::

    {"schema": "guardpost/signed@1", "key_id": "duty-desk-1",
     "signed_at": "2026-12-03T15:00:00.000000Z", "nonce": "<22 base64url chars>",
     "topic": "<the full topic it is meant for>", "body": {...},
     "signature": "<86 base64url chars: Ed25519 over the signing input>"}

- **Signing input**: ``b"guardpost/signed@1\\n"`` followed by the RFC 8785 canonical JSON
  of the envelope without ``signature`` (keys sorted, no spaces, UTF-8). Bodies carry no
  floating-point numbers, so Python's ``json.dumps(sort_keys=True,
  separators=(",", ":"), ensure_ascii=False)`` is exactly that canonical form.
- **The topic is signed**: a message moved to another device's topic does not verify.
- **Time**: ``signed_at`` must lie within 40 s before to 20 s after the device's clock when
  that clock is synchronised (SIA DC-09's window). Whatever the clock, it must not be more
  than 40 s older than the newest ``signed_at`` the device has accepted (kept durably by
  the caller): an unsynchronised device cannot judge absolute time, but a captured
  message never becomes acceptable again once a newer one was.
- **Nonce**: 16 random bytes, never accepted twice within the window.
- **Roles**: each key has roles; ``ack`` to acknowledge, ``command`` to command.
"""

from __future__ import annotations

import binascii
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from edge.contract.b64url import b64url, unb64url
from edge.contract.events import utc_iso
from edge.contract.messages import SIGNED_FUTURE, SIGNED_PAST

SCHEMA = "guardpost/signed@1"
DOMAIN = b"guardpost/signed@1\n"
PAST, FUTURE = SIGNED_PAST, SIGNED_FUTURE
MAX_ENVELOPE_BYTES = 16 * 1024
ROLES = frozenset({"ack", "command"})
_FIELDS = {"schema", "key_id", "signed_at", "nonce", "topic", "body", "signature"}


class Rejected(ValueError):
    """The message is not believed; ``reason`` says why (for the rejection reply) and
    ``kind`` is one of :data:`KINDS` (counted in health)."""

    def __init__(self, reason: str, kind: str = "malformed"):
        super().__init__(reason)
        self.reason, self.kind = reason, kind


# Why a message was not believed, as counted in health (``inbound.untrusted``).
KINDS = ("malformed", "unknown_key", "bad_signature", "wrong_topic", "wrong_role", "stale",
         "future", "replay")


def canonical(value) -> bytes:
    """RFC 8785 canonical JSON for values without floats (refused: they have no single
    canonical form across languages)."""
    _no_floats(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def _no_floats(value, depth: int = 0) -> None:
    if depth > 32:
        raise ValueError("nested too deeply")
    if isinstance(value, float):
        raise ValueError("floating-point numbers are not allowed in a signed body")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError("keys must be strings")
            _no_floats(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _no_floats(item, depth + 1)


def signing_input(envelope: Mapping) -> bytes:
    return DOMAIN + canonical({k: v for k, v in envelope.items() if k != "signature"})


def seal(key: Ed25519PrivateKey, key_id: str, topic: str, body: Mapping, signed_at: datetime,
         nonce: bytes | None = None) -> bytes:
    """The signed envelope of ``body`` for ``topic`` (what the platform-side module sends)."""
    envelope = {"schema": SCHEMA, "key_id": key_id, "signed_at": utc_iso(signed_at),
                "nonce": b64url(nonce if nonce is not None else os.urandom(16)),
                "topic": topic, "body": dict(body)}
    envelope["signature"] = b64url(key.sign(signing_input(envelope)))
    return canonical(envelope)


@dataclass(frozen=True)
class PlatformKey:
    key_id: str
    public_key: Ed25519PublicKey
    roles: frozenset[str]


@dataclass
class Keyring:
    """The platform keys a device believes (several during a rotation)."""

    keys: dict[str, PlatformKey] = field(default_factory=dict)

    def add(self, key_id: str, public_key: Ed25519PublicKey | bytes, roles) -> None:
        roles = frozenset(roles)
        if not roles or not roles <= ROLES:
            raise ValueError(f"roles must be some of {sorted(ROLES)}")
        if isinstance(public_key, bytes):
            public_key = Ed25519PublicKey.from_public_bytes(public_key)
        self.keys[key_id] = PlatformKey(key_id, public_key, roles)


@dataclass(frozen=True)
class Opened:
    key_id: str
    signed_at: datetime
    nonce: str
    body: dict


def open_envelope(raw: bytes, topic: str, keyring: Keyring, role: str, *, now: datetime,
                  clock_synced: bool,
                  newest_accepted: datetime | Callable[[str], datetime | None] | None,
                  seen_nonce) -> Opened:
    """The body of a signed message for ``topic`` that a key with ``role`` signed, or
    :class:`Rejected` with the reason. ``seen_nonce(nonce)`` says whether a nonce was
    accepted before within the window (the caller records it once it acts)."""
    if len(raw) > MAX_ENVELOPE_BYTES:
        raise Rejected(f"larger than {MAX_ENVELOPE_BYTES} bytes")
    try:
        envelope = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise Rejected(f"not JSON: {type(err).__name__}") from None
    if not isinstance(envelope, dict) or set(envelope) != _FIELDS:
        raise Rejected("not a signed envelope (fields: " + ", ".join(sorted(_FIELDS)) + ")")
    if envelope["schema"] != SCHEMA:
        raise Rejected(f"schema must be {SCHEMA}")
    key_id, stamp, nonce = envelope["key_id"], envelope["signed_at"], envelope["nonce"]
    if not all(isinstance(v, str) for v in (key_id, stamp, nonce, envelope["topic"],
                                             envelope["signature"])):
        raise Rejected("key_id, signed_at, nonce, topic and signature must be strings")
    if not isinstance(envelope["body"], dict):
        raise Rejected("body must be an object")
    key = keyring.keys.get(key_id)
    if key is None:
        raise Rejected("unknown key", "unknown_key")
    try:
        signature = unb64url(envelope["signature"])
        key.public_key.verify(signature, signing_input(envelope))
    except (InvalidSignature, ValueError, binascii.Error):
        raise Rejected("bad signature", "bad_signature") from None
    # Only a verified message is looked at further: an attacker learns nothing else.
    if envelope["topic"] != topic:
        raise Rejected("signed for another topic", "wrong_topic")
    if role not in key.roles:
        raise Rejected(f"key {key_id} may not {role}", "wrong_role")
    try:
        signed_at = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        if signed_at.tzinfo is None:
            raise ValueError
        nonce_bytes = unb64url(nonce)
    except (ValueError, OverflowError, binascii.Error):
        raise Rejected("signed_at must be an RFC 3339 time in UTC, nonce base64url") from None
    if len(nonce_bytes) != 16:
        raise Rejected("nonce must be 16 bytes")
    if callable(newest_accepted):
        newest_accepted = newest_accepted(key_id)
    if newest_accepted is not None and signed_at < newest_accepted - PAST:
        raise Rejected("signed more than 40 s before a message already accepted from this "
                       "key (a replay?)", "stale")
    if clock_synced and signed_at < now - PAST:
        raise Rejected(f"signed more than 40 s ago by the device's clock (expired; the "
                       f"device's clock reads {utc_iso(now)})", "stale")
    if clock_synced and signed_at > now + FUTURE:
        raise Rejected(f"signed more than 20 s ahead of the device's clock (it reads "
                       f"{utc_iso(now)})", "future")
    if seen_nonce(nonce):
        raise Rejected("nonce already used (a replay, or the same message delivered again)",
                       "replay")
    return Opened(key_id, signed_at, nonce, envelope["body"])
