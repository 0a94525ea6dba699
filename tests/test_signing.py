"""Signed platform messages (issue 13, the envelope): what verifies and what is rejected, and
the test vectors an integrator in another language checks against."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.contract import signing
from edge.contract.signing import Keyring, Rejected, open_envelope, seal

NOW = datetime(2026, 12, 3, 15, 0, tzinfo=UTC)
TOPIC = "guardpost/v1/test-school/gate-1/ack"
DUTY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
ADMIN = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
VECTORS = Path(__file__).parent.parent / "docs" / "vectors" / "signed.json"


def keyring() -> Keyring:
    ring = Keyring()
    ring.add("duty-desk-1", DUTY.public_key(), {"ack"})
    ring.add("admin-1", ADMIN.public_key(), {"ack", "command"})
    return ring


def opened(raw: bytes, *, topic=TOPIC, role="ack", now=NOW, synced=True, newest=None,
           seen=()):
    return open_envelope(raw, topic, keyring(), role, now=now, clock_synced=synced,
                         newest_accepted=newest, seen_nonce=lambda nonce: nonce in seen)


def ack(at=NOW, key=DUTY, key_id="duty-desk-1", topic=TOPIC, nonce=bytes(16)) -> bytes:
    return seal(key, key_id, topic, {"event_id": "01a23c19-d487-73b4-8000-0000009b4fd0",
                                     "by": "110 duty desk"}, at, nonce)


def test_a_signed_acknowledgement_opens_with_its_body():
    message = opened(ack())
    assert message.key_id == "duty-desk-1" and message.body["by"] == "110 duty desk"


@pytest.mark.parametrize("raw, kwargs, reason", [
    (ack(key=ADMIN), {}, "bad signature"),                      # signed by another key
    (ack(key_id="nobody"), {}, "unknown key"),
    (ack(at=NOW - timedelta(seconds=41)), {}, "expired"),
    (ack(at=NOW + timedelta(seconds=21)), {}, "20 s ahead"),
    (ack(), {"seen": {signing.b64url(bytes(16))}}, "replay"),
    (ack(), {"topic": TOPIC.replace("gate-1", "gate-2")}, "another topic"),
    (ack(), {"role": "command"}, "may not command"),
    (ack(at=NOW - timedelta(minutes=5)), {"synced": False, "newest": NOW}, "already accepted"),
    (b"{" * 100, {}, "not JSON"),
    (b"x" * 20000, {}, "larger than"),
    (b'{"schema": "guardpost/signed@1"}', {}, "not a signed envelope"),
])
def test_what_is_not_believed_is_rejected_with_its_reason(raw, kwargs, reason):
    with pytest.raises(Rejected, match=reason):
        opened(raw, **kwargs)


def test_a_changed_body_does_not_verify():
    envelope = json.loads(ack())
    envelope["body"]["by"] = "somebody else"
    with pytest.raises(Rejected, match="bad signature"):
        opened(json.dumps(envelope).encode())


def test_an_unsynchronised_device_takes_any_time_not_older_than_what_it_accepted():
    assert opened(ack(at=NOW - timedelta(days=3)), synced=False).body
    assert opened(ack(at=NOW - timedelta(days=3)), synced=False,
                  newest=NOW - timedelta(days=3, seconds=30)).body


def test_a_command_needs_the_command_role():
    topic = TOPIC.replace("/ack", "/cmd/test")
    raw = seal(ADMIN, "admin-1", topic, {"request_id": "r1"}, NOW)
    assert opened(raw, topic=topic, role="command").body == {"request_id": "r1"}
    raw = seal(DUTY, "duty-desk-1", topic, {"request_id": "r1"}, NOW)
    with pytest.raises(Rejected, match="may not command"):
        opened(raw, topic=topic, role="command")


def test_the_test_vectors_of_the_contract_verify_and_are_reproduced():
    vectors = json.loads(VECTORS.read_text())
    for vector in vectors["vectors"]:
        private = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vector["private_key"]))
        raw = vector["message"].encode()
        envelope = json.loads(raw)
        assert signing.signing_input(envelope).decode() == vector["signing_input"]
        # Ed25519 is deterministic: the same key and input give the same signature.
        rebuilt = seal(private, envelope["key_id"], envelope["topic"], envelope["body"],
                       datetime.fromisoformat(envelope["signed_at"].replace("Z", "+00:00")),
                       signing.unb64url(envelope["nonce"]))
        assert rebuilt == raw
        ring = Keyring()
        ring.add(envelope["key_id"], bytes.fromhex(vector["public_key"]), vector["roles"])
        at = datetime.fromisoformat(envelope["signed_at"].replace("Z", "+00:00"))
        assert open_envelope(raw, envelope["topic"], ring, vector["role"], now=at,
                             clock_synced=True, newest_accepted=None,
                             seen_nonce=lambda n: False).body == envelope["body"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600) | st.text(max_size=300).map(str.encode)
       | st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                      lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=10), inner, max_size=5),
                      max_leaves=30).map(lambda v: json.dumps(v).encode()))
def test_whatever_arrives_the_worst_outcome_is_a_rejection(raw):
    with contextlib.suppress(Rejected):
        opened(raw)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(signing._FIELDS)), st.one_of(
    st.none(), st.integers(), st.text(max_size=30), st.lists(st.integers(), max_size=3)))
def test_any_field_of_a_valid_envelope_changed_is_a_rejection(name, value):
    envelope = json.loads(ack())
    if envelope[name] == value:
        return
    envelope[name] = value
    with pytest.raises(Rejected):
        opened(json.dumps(envelope).encode())
