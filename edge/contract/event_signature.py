"""Signed events: every event the device publishes carries its Ed25519 signature.

The uplink signs each event payload at publish time with the device's event-signing key
(``trust.event_key``, not the TLS key: it outlives certificates and brokers); a platform
verifies it with the device's public key, so an alarm can be traced to its device even
through bridges and stores (docs/contract.md, "Signed events").

The signed payload is the event's JSON (:meth:`edge.contract.events.Event.payload`) with
one last member appended::

    {...,"device_signature":"<86 base64url characters>"}

- **Signing input**: ``b"guardpost/event@1\\n"`` followed by the payload without that
  member: the bytes before its leading comma, then ``}``. The exact bytes, never a
  re-serialisation (event details may hold floating-point numbers, which have no single
  canonical form across languages).
- The member's position and form are fixed: the last 109 bytes of every signed payload
  are ``,"device_signature":"``, 86 base64url characters (64 bytes, no padding, unused
  bits zero) and ``"}``. Verifying needs string operations only, no JSON canonicalisation.
- **Not signed**: the topic (a bridge may map the topic root; the payload names the site,
  the device and the kind, and those are signed) and a key id (the platform knows each
  device's key by its site and device; during a rotation it tries each listed key).
- Ed25519 is deterministic: an event published again is the same bytes, as long as the
  key has not changed.

Camera snapshots are signed too (:meth:`EventSigner.sign_snapshot`): their description
(MQTT 5 user properties, or the JSON line before the JPEG with MQTT 3.1.1) gains
``sha256`` (of the JPEG, hex) and ``device_signature``, Ed25519 over
``b"guardpost/snapshot@1\n"`` followed by the canonical JSON (keys sorted, no spaces) of
the members :data:`SNAPSHOT_SIGNED`, every value as a string (integers in decimal: the
form user properties have). ``offset_s``, a floating-point number, is left out (it follows
from ``captured_at`` and the event's time); the topic is not signed, as for events.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from edge.contract.b64url import b64url, unb64url

DOMAIN = b"guardpost/event@1\n"
MEMBER = "device_signature"
_HEAD = b',"' + MEMBER.encode() + b'":"'
_TAIL = b'"}'
SIGNATURE_CHARS = 86
SUFFIX_BYTES = len(_HEAD) + SIGNATURE_CHARS + len(_TAIL)  # 109


SNAPSHOT_DOMAIN = b"guardpost/snapshot@1\n"
SNAPSHOT_SIGNED = ("schema", "site_id", "device_id", "event_id", "camera", "index", "phase",
                   "captured_at", "width", "height", "sha256")


class SignatureError(ValueError):
    """The payload is not a validly signed event; the message says why."""


def _signature_bytes(text: bytes) -> bytes:
    # Only the one canonical spelling: 86 characters carry 4 bits more than 64 bytes,
    # and a signature whose text could change without failing would be malleable.
    try:
        return unb64url(text, 64)
    except ValueError:
        raise SignatureError("device_signature is not 86 base64url characters of a "
                             "64-byte signature") from None


def split(payload: bytes) -> tuple[bytes, bytes]:
    """``(signing input, signature)`` of a signed payload; :class:`SignatureError` if the
    payload does not end with the signature member."""
    payload = bytes(payload)
    if (len(payload) <= SUFFIX_BYTES + 1 or not payload.startswith(b"{")
            or not payload.endswith(_TAIL)
            or payload[-SUFFIX_BYTES:-SIGNATURE_CHARS - len(_TAIL)] != _HEAD):
        raise SignatureError('not signed: the payload does not end with '
                             '"device_signature":"<86 base64url characters>"}')
    signature = _signature_bytes(payload[-SIGNATURE_CHARS - len(_TAIL):-len(_TAIL)])
    return DOMAIN + payload[:-SUFFIX_BYTES] + b"}", signature


def verify(payload: bytes, public_keys: Ed25519PublicKey | Iterable[Ed25519PublicKey]) -> bytes:
    """The event's JSON as the device recorded it (the payload without its signature), if
    one of ``public_keys`` signed it; else :class:`SignatureError`."""
    signing_input, signature = split(payload)
    keys = [public_keys] if isinstance(public_keys, Ed25519PublicKey) else list(public_keys)
    for key in keys:
        try:
            key.verify(signature, signing_input)
        except InvalidSignature:
            continue
        return signing_input[len(DOMAIN):]
    raise SignatureError("bad signature: not signed by this device's key"
                         + (" (none of its keys)" if len(keys) > 1 else ""))


def snapshot_signing_input(description: Mapping) -> bytes:
    """What a snapshot's signature covers; KeyError if a signed member is missing."""
    fields = {}
    for name in SNAPSHOT_SIGNED:
        value = description[name]
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise SignatureError(f"{name}: must be a string or an integer")
        fields[name] = str(value)
    return SNAPSHOT_DOMAIN + json.dumps(fields, sort_keys=True, separators=(",", ":"),
                                        ensure_ascii=False).encode()


def verify_snapshot(description: Mapping, jpeg: bytes,
                    public_keys: Ed25519PublicKey | Iterable[Ed25519PublicKey]) -> None:
    """:class:`SignatureError` unless one of ``public_keys`` signed this description and
    the JPEG is the one it names."""
    try:
        signing_input = snapshot_signing_input(description)
        text = description[MEMBER]
    except KeyError as err:
        raise SignatureError(f"not signed: no {err.args[0]} in the description") from None
    if not isinstance(text, str) or not text.isascii():
        raise SignatureError("device_signature is not base64url text")
    signature = _signature_bytes(text.encode())
    keys = [public_keys] if isinstance(public_keys, Ed25519PublicKey) else list(public_keys)
    for key in keys:
        try:
            key.verify(signature, signing_input)
            break
        except InvalidSignature:
            continue
    else:
        raise SignatureError("bad signature: not signed by this device's key")
    if hashlib.sha256(jpeg).hexdigest() != description["sha256"]:
        raise SignatureError("the JPEG is not the one the signed description names "
                             "(sha256 differs)")


class EventSigner:
    """The device's event-signing key (held by the uplink alone)."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._key = private_key

    @classmethod
    def from_file(cls, path: str | Path) -> EventSigner:
        return cls(load_private_key(Path(path).read_bytes(), str(path)))

    def sign(self, payload: bytes) -> bytes:
        """``payload`` (a JSON object with at least one member, as
        :meth:`~edge.contract.events.Event.payload` makes) with its signature appended."""
        if len(payload) < 3 or payload[:1] != b"{" or payload[-1:] != b"}":
            raise ValueError("an event payload is a JSON object with at least one member")
        signature = self._key.sign(DOMAIN + payload)
        return b"".join((payload[:-1], _HEAD, b64url(signature).encode(), _TAIL))

    def sign_snapshot(self, description: Mapping, jpeg: bytes) -> dict:
        """``description`` with the JPEG's ``sha256`` and its ``device_signature``."""
        signed = {**description, "sha256": hashlib.sha256(jpeg).hexdigest()}
        signed[MEMBER] = b64url(self._key.sign(snapshot_signing_input(signed)))
        return signed

    @property
    def public_key(self) -> str:
        """What the platform registers for this device: base64url of the 32 raw bytes."""
        return public_key_text(self._key.public_key())


def public_key_text(key: Ed25519PublicKey) -> str:
    return b64url(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def load_private_key(pem: bytes, source: str = "the key") -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM (PKCS #8, unencrypted); ValueError says why not."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{source}: not an unencrypted PEM private key ({err})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{source}: not an Ed25519 private key")
    return key


def private_key_pem(key) -> bytes:
    """Any private key (Ed25519 here; the device's TLS key is EC) as unencrypted PKCS #8 PEM."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_private_key(path: str | Path, key: Ed25519PrivateKey | None = None) -> EventSigner:
    """Write ``key`` (a new one if None) to ``path``, readable by its owner only."""
    key = key or Ed25519PrivateKey.generate()
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.new")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(private_key_pem(key))
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    return EventSigner(key)
