"""base64url without padding (RFC 4648 §5), as every key, nonce and signature of the
contract is written. Standard library only: the configuration reads keys with it, and the
button daemon, which reads the configuration, must not load ``cryptography``."""

from __future__ import annotations

import base64
import binascii


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str | bytes, length: int | None = None) -> bytes:
    """The bytes ``text`` spells, or ValueError. Only the one canonical spelling is taken
    (no padding, no other character, unused bits zero): a value whose text could change
    without changing its bytes would let a signed message change and still verify.
    ``length``: the number of bytes it must hold."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError("not base64url") from None
    if not isinstance(text, str) or not text.isascii():
        raise ValueError("not base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None
    if b64url(raw) != text:
        raise ValueError("not base64url in its one canonical spelling")
    if length is not None and len(raw) != length:
        raise ValueError(f"base64url of {len(raw)} bytes, not {length}")
    return raw
