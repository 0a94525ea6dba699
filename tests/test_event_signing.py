"""Signed events: the signature every published event carries, its verification on the
platform's side (edge.platform), the test vector of the contract, the device's key in the
configuration and in provisioning."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.config import ConfigError, parse_config
from edge.config.loading import credential_store
from edge.contract import event_signature
from edge.contract.event_signature import EventSigner, private_key_pem
from edge.contract.events import ContactId, Event, EventDraft, EventKind, Identity, Qualifier
from edge.platform import DeviceKeys, EventNotVerified, verify_event, verify_snapshot
from edge.tools.provision import apply, plan_provision
from tests.conftest import sim_document
from tests.support.device_keys import EVENT_PUBLIC_KEY, EVENT_SIGNER, OTHER_KEY, write_event_key

VECTORS = Path(__file__).parent.parent / "docs" / "vectors" / "event.json"
IDENTITY = Identity("test-school", "gate-1", "测试 South gate")
TOPIC = "guardpost/v1/test-school/gate-1/event/alarm"


def _event(kind=EventKind.ALARM, detail=None, location=None, **draft) -> bytes:
    draft = {"code": ContactId.PANIC, "occurred_at": datetime(2026, 12, 3, 15, tzinfo=UTC),
             "clock_synced": True, "boot_id": "b", "input": "gate", **draft}
    event = Event("01a23c19-d487-73b4-8000-0000009b4fd0", 7,
                  EventDraft(kind=kind, detail=detail or {}, **draft))
    identity = IDENTITY if location is None else Identity("test-school", "gate-1", location)
    return event.payload(identity, "01a23c19-d97e-7975-adad-1a758a87120b")


SIGNED = EVENT_SIGNER.sign(_event(detail={"mode": "panic", "held_ms": 210.4}))


def test_the_test_vector_of_the_contract_verifies_and_is_reproduced():
    for vector in json.loads(VECTORS.read_text())["vectors"]:
        key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vector["private_key"]))
        message = vector["message"].encode()
        assert EventSigner(key).sign(vector["payload"].encode()) == message
        assert EventSigner(key).public_key == vector["public_key_base64url"]
        signing_input, signature = event_signature.split(message)
        assert signing_input.decode() == vector["signing_input"]
        assert signature.hex() == vector["signature"]
        event = verify_event(message, vector["public_key_base64url"], topic=vector["topic"])
        assert event == json.loads(vector["payload"])
        # The steps of the contract, with string operations and a JSON parser only.
        tail = vector["message"][-109:]
        assert tail.startswith(',"device_signature":"') and tail.endswith('"}')
        assert vector["signing_input"] == ("guardpost/event@1\n" + vector["message"][:-109]
                                           + "}")
        assert list(json.loads(vector["message"]))[-1] == "device_signature"
    for vector in json.loads(VECTORS.read_text())["snapshots"]:
        key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vector["private_key"]))
        jpeg, signed = bytes.fromhex(vector["jpeg"]), vector["description"]
        unsigned = {k: v for k, v in signed.items() if k not in ("sha256", "device_signature")}
        assert EventSigner(key).sign_snapshot(unsigned, jpeg) == signed
        assert event_signature.snapshot_signing_input(signed).decode() == vector["signing_input"]
        properties = {name: str(value) for name, value in signed.items()}  # as MQTT 5 has it
        assert verify_snapshot(properties, jpeg, vector["public_key_base64url"],
                               topic=vector["topic"])


def test_a_signed_event_verifies_with_its_devices_key_only():
    event = verify_event(SIGNED, EVENT_PUBLIC_KEY, topic=TOPIC)
    assert event["kind"] == "alarm" and "device_signature" not in event
    assert json.loads(SIGNED)["device_signature"]  # the published form: the member last
    with pytest.raises(EventNotVerified, match="bad signature"):
        verify_event(SIGNED, OTHER_KEY.public_key())
    # A rotation: either of the device's keys will do.
    assert verify_event(SIGNED, [OTHER_KEY.public_key(), EVENT_PUBLIC_KEY])["seq"] == 7


def test_an_event_moved_to_another_devices_topic_or_kind_is_not_believed():
    with pytest.raises(EventNotVerified, match="another topic"):
        verify_event(SIGNED, EVENT_PUBLIC_KEY, topic="guardpost/v1/test-school/gate-2/event/alarm")
    with pytest.raises(EventNotVerified, match="another topic"):
        verify_event(SIGNED, EVENT_PUBLIC_KEY, topic="guardpost/v1/test-school/gate-1/event/test")
    # A bridge that maps the root keeps the device's name: still the device's event.
    verify_event(SIGNED, EVENT_PUBLIC_KEY, topic="city/bridge/guardpost/v1/test-school/gate-1/"
                                                "event/alarm")


@pytest.mark.parametrize(("payload", "reason"), [
    (_event(), "not signed"),                                   # the unsigned event
    (SIGNED[:-2] + b'" }', "not signed"),                      # re-serialised by someone
    (SIGNED + b"\n", "not signed"),
    (SIGNED.replace(b'"device_signature"', b'"device_Signature"'), "not signed"),
    (SIGNED[:-3] + b'!"}', "86 base64url"),
    (b"", "not signed"),
    (b'{"device_signature":"' + b"A" * 86 + b'"}', "not signed"),  # no event at all
])
def test_what_is_not_a_signed_event_says_why(payload, reason):
    with pytest.raises(EventNotVerified, match=reason):
        verify_event(payload, EVENT_PUBLIC_KEY)


def test_the_signatures_text_has_one_spelling_only():
    """86 characters hold 4 bits more than 64 bytes: another last character that decodes
    to the same signature is refused (a signed message could otherwise change unnoticed)."""
    last = SIGNED[-3:-2].decode()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twins = [c for c in alphabet
             if c != last and alphabet.index(c) >> 4 == alphabet.index(last) >> 4]
    assert twins
    for twin in twins:
        with pytest.raises(EventNotVerified):
            verify_event(SIGNED[:-3] + twin.encode() + b'"}', EVENT_PUBLIC_KEY)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_flipped_byte_anywhere_fails(data):
    index = data.draw(st.integers(0, len(SIGNED) - 1), label="index")
    flip = data.draw(st.integers(1, 255), label="xor")
    damaged = bytearray(SIGNED)
    damaged[index] ^= flip
    with pytest.raises(EventNotVerified):
        verify_event(bytes(damaged), EVENT_PUBLIC_KEY)


_text = st.text(max_size=40)
_details = st.dictionaries(
    st.text(min_size=1, max_size=12),
    st.one_of(_text, st.integers(-2**53, 2**53), st.booleans(), st.none(),
              st.floats(allow_nan=False, allow_infinity=False),
              st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=3)),
    max_size=5)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(list(EventKind)), detail=_details,
       location=st.text(min_size=1, max_size=60),
       qualifier=st.sampled_from(list(Qualifier)),
       moment=st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9998, 1, 1),
                           timezones=st.just(UTC)),
       repeat=st.integers(0, 1000))
def test_any_event_payload_round_trips(kind, detail, location, qualifier, moment, repeat):
    payload = _event(kind, detail, location, qualifier=qualifier, occurred_at=moment,
                     repeat_of="01a23c19-0000-7000-8000-000000000000" if repeat else None,
                     repeat=repeat)
    signed = EVENT_SIGNER.sign(payload)
    assert signed.startswith(payload[:-1]) and len(signed) == len(payload) - 1 + 109
    assert EVENT_SIGNER.sign(payload) == signed  # deterministic: published again, same bytes
    assert verify_event(signed, EVENT_PUBLIC_KEY) == json.loads(payload)
    published = json.loads(signed)
    assert published.pop("device_signature") and published == json.loads(payload)


def test_the_device_key_registry_reads_toml_and_json_and_finds_a_device_by_its_names(tmp_path):
    toml = tmp_path / "keys.toml"
    toml.write_text(f'[devices]\n"test-school/gate-1" = "{EVENT_SIGNER.public_key}"\n'
                    f'"test-school/gate-2" = ["{EventSigner(OTHER_KEY).public_key}"]\n')
    registry = DeviceKeys.load(toml)
    assert registry.verify(SIGNED, topic=TOPIC)["device_id"] == "gate-1"
    as_json = tmp_path / "keys.json"
    as_json.write_text(json.dumps({"devices": {"test-school/gate-1": [
        EventSigner(OTHER_KEY).public_key, EVENT_SIGNER.public_key]}}))
    assert DeviceKeys.load(as_json).verify(SIGNED)["seq"] == 7
    # An event signed with gate-2's key but naming gate-1 is not gate-1's.
    forged = EventSigner(OTHER_KEY).sign(_event())
    with pytest.raises(EventNotVerified, match="bad signature"):
        registry.verify(forged)
    stranger = EVENT_SIGNER.sign(_event().replace(b'"gate-1"', b'"gate-9"'))
    with pytest.raises(EventNotVerified, match="no key registered for device test-school/gate-9"):
        registry.verify(stranger)
    for bad, reason in (('[devices]\n"gate-1" = "x"\n', "site_id/device_id"),
                        ('[devices]\n"s/d" = "too-short"\n', "32 bytes"),
                        ("[elsewhere]\n", "no table 'devices'")):
        toml.write_text(bad)
        with pytest.raises(ValueError, match=reason):
            DeviceKeys.load(toml)


# -- the device's key: configuration and provisioning ------------------------------------

def test_only_what_talks_to_the_broker_needs_the_event_key(tmp_path):
    document = sim_document(tmp_path, 1883)
    store = credential_store(tmp_path / "guardpost.toml", environ={})
    # The button daemon (check_broker_files=False) runs without it ...
    assert parse_config(document, credentials=store, check_broker_files=False)
    # ... the uplink does not: named by its key, with what to do.
    with pytest.raises(ConfigError, match=r"trust\.event_key: cannot read .*event-signing\.key"
                                          r".*provision creates it"):
        parse_config(document, credentials=store)
    (tmp_path / "credentials").mkdir()
    not_ed25519 = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "credentials" / "event-signing.key").write_bytes(private_key_pem(not_ed25519))
    with pytest.raises(ConfigError, match=r"trust\.event_key: .*not an Ed25519 private key"):
        parse_config(document, credentials=store)
    (tmp_path / "credentials" / "event-signing.key").unlink()
    write_event_key(tmp_path / "credentials")
    config = parse_config(document, credentials=store)
    assert config.trust.event_key == tmp_path / "credentials" / "event-signing.key"


def test_provisioning_creates_the_event_key_once_and_prints_its_public_key(tmp_path):
    from tests.support.pki import write_pki

    pki = write_pki(tmp_path / "pki")
    config = tmp_path / "etc" / "guardpost.toml"
    plan = plan_provision(config, site="s1", device="d1", location="Gate",
                          broker="broker.example:8883", ca=pki["ca"][0])
    apply(plan)
    key_path = tmp_path / "etc" / "credentials" / "event-signing.key"
    assert os.stat(key_path).st_mode & 0o777 == 0o600
    signer = EventSigner.from_file(key_path)
    assert f"event-signing public key of s1/d1 (register it with the platform): " \
           f"{signer.public_key}" in plan.notes
    again = plan_provision(config, site="s1", device="d1", location="Gate",
                           broker="broker.example:8883")
    assert key_path not in [path for path, _, _ in again.files]  # kept, never replaced
    assert any(signer.public_key in note for note in again.notes)



# -- camera snapshots ----------------------------------------------------------------------

DESCRIPTION = {"schema": "guardpost/snapshot@1", "site_id": "test-school", "device_id": "gate-1",
               "event_id": "01a23c19-d487-73b4-8000-0000009b4fd0", "camera": "gate-outside",
               "index": 3, "phase": "pre", "captured_at": "2026-12-03T14:59:58.000000Z",
               "offset_s": -2.0, "width": 640, "height": 480}
JPEG = b"\xff\xd8\xff\xe0 a picture \xff\xd9"
SNAPSHOT_TOPIC = "guardpost/v1/test-school/gate-1/snapshot/01a23c19-d487-73b4-8000-0000009b4fd0"


def test_a_snapshot_description_is_signed_with_its_jpegs_digest_over_either_transport():
    signed = EVENT_SIGNER.sign_snapshot(DESCRIPTION, JPEG)
    assert set(signed) == set(DESCRIPTION) | {"sha256", "device_signature"}
    as_json_line = json.loads(json.dumps(signed))                        # MQTT 3.1.1
    as_properties = {key: str(value) for key, value in signed.items()}   # MQTT 5
    for description in (as_json_line, as_properties):
        assert verify_snapshot(description, JPEG, EVENT_PUBLIC_KEY, topic=SNAPSHOT_TOPIC)
    with pytest.raises(EventNotVerified, match="sha256 differs"):
        verify_snapshot(as_properties, JPEG + b"\x00", EVENT_PUBLIC_KEY)
    with pytest.raises(EventNotVerified, match="bad signature"):
        verify_snapshot(as_properties, JPEG, OTHER_KEY.public_key())
    for member, value in (("index", "4"), ("event_id", "01a23c19-0000-7000-8000-00000000000"),
                          ("phase", "post"), ("sha256", "0" * 64)):
        with pytest.raises(EventNotVerified, match="bad signature"):
            verify_snapshot({**as_properties, member: value}, JPEG, EVENT_PUBLIC_KEY)
    with pytest.raises(EventNotVerified, match="not signed: no device_signature"):
        verify_snapshot({k: v for k, v in signed.items() if k != "device_signature"}, JPEG,
                        EVENT_PUBLIC_KEY)
    with pytest.raises(EventNotVerified, match="another topic"):
        verify_snapshot(as_properties, JPEG, EVENT_PUBLIC_KEY,
                        topic=SNAPSHOT_TOPIC.replace("/gate-1/", "/gate-2/"))
    registry = DeviceKeys.from_mapping({"test-school/gate-1": EVENT_SIGNER.public_key})
    assert registry.verify_snapshot(as_json_line, JPEG)["index"] == 3
