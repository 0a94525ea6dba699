"""The shipped broker (config/mosquitto/guardpost.conf) on a real Mosquitto, with the ACL
that ``guardpost broker-acl`` writes and certificates made for the test: who may publish
and read what, identities bound to their client id, certificates refused, a revocation,
retained messages on ``ack``, a message over the size limit.

The configuration is used as shipped, only its file paths and its port changed, and is
included from a main file like Debian's /etc/mosquitto/mosquitto.conf (which names the
persistence directory and the user to run as). One broker serves the module; the
revocation, which changes its files, gets one of its own.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge.config import CameraConfig
from edge.tools.localbroker import LocalBroker, free_port
from tests.support.identity_client import (
    ALLOWED,
    NOT_AUTHORIZED,
    IdentityClient,
    broker_answer,
)
from tests.support.pki import BrokerPki, write_broker_pki, write_crl

SHIPPED = Path(__file__).resolve().parents[1] / "config" / "mosquitto" / "guardpost.conf"
ROOT = "guardpost/v1"
# Named the old way ({site}.{device}), both of these devices were "school.north.gate-1".
NAMES = {"north": "school.north/gate-1", "south": "school/north.gate-1",
         "retired": "school/old-gate",       # listed, but its certificate is revoked
         "unlisted": "school/unlisted",      # signed by the CA, in no list
         "desk": "platform:desk", "admin": "platform:admin", "hq": "platform:hq"}
IDENTITIES = """
[[sites]]
id = "school.north"
devices = ["gate-1"]

[[sites]]
id = "school"
devices = ["north.gate-1", "old-gate"]

[[platforms]]
name = "desk"           # a duty desk for one school
roles = ["ack"]
sites = ["school.north"]

[[platforms]]
name = "admin"          # commands, every school, and may not acknowledge
roles = ["command"]

[[platforms]]
name = "hq"
roles = ["ack", "command"]
"""
DEVICES = ("north", "south")
LEAVES = ("status", "health", "event/alarm", "snapshot/e1", "rejected", "reply/test", "ack",
          "cmd/test")
DEVICE_WRITES = {"status", "health", "event/alarm", "snapshot/e1", "rejected", "reply/test"}
UPLINK_RETAIN_HANDLING = SubscribeOptions.RETAIN_DO_NOT_SEND  # as the uplink subscribes


def topic(device: str, leaf: str) -> str:
    return f"{ROOT}/{NAMES[device]}/{leaf}"


def may_write(who: str, device: str, leaf: str) -> bool:
    """The rules of issue 13, written out independently of the tool that writes the ACL."""
    if who in DEVICES:
        return who == device and leaf in DEVICE_WRITES
    if leaf == "ack":
        return who == "hq" or (who == "desk" and device == "north")
    if leaf.startswith("cmd/"):
        return who in ("admin", "hq")
    return False


def may_read(who: str, device: str, leaf: str) -> bool:
    if who in DEVICES:
        return who == device and leaf in ("ack", "cmd/test")
    return who in ("admin", "hq") or (who == "desk" and device == "north")


def shipped_config(port: int, pki: BrokerPki, acl: Path, crl: Path) -> str:
    text = SHIPPED.read_text()
    for directive, here in {"listener 8883": f"listener {port} 127.0.0.1",
                            "acl_file /etc/mosquitto/guardpost/acl": f"acl_file {acl}",
                            "cafile /etc/mosquitto/guardpost/ca.pem": f"cafile {pki.ca.cert}",
                            "certfile /etc/mosquitto/guardpost/broker.pem":
                                f"certfile {pki.broker.cert}",
                            "keyfile /etc/mosquitto/guardpost/broker.key":
                                f"keyfile {pki.broker.key}",
                            "crlfile /etc/mosquitto/guardpost/crl.pem": f"crlfile {crl}"}.items():
        assert text.count(f"\n{directive}\n") == 1, f"the shipped file has no {directive!r}"
        text = text.replace(f"\n{directive}\n", f"\n{here}\n")
    return text


def write_acl(identities: Path, acl: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "edge", "broker-acl", str(identities),
                             "--output", str(acl)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def start_shipped(workdir: Path, pki: BrokerPki, acl: Path, crl: Path) -> LocalBroker:
    """Debian's layout: a main file, and the shipped file in its conf.d."""
    port = free_port()
    (workdir / "conf.d").mkdir(parents=True)
    (workdir / "conf.d" / "guardpost.conf").write_text(shipped_config(port, pki, acl, crl))
    user = "root" if os.geteuid() == 0 else getpass.getuser()
    main = (f"persistence_location {workdir}/\nuser {user}\n"
            f"include_dir {workdir / 'conf.d'}\n")
    broker = LocalBroker(workdir, port=port, config_text=main)
    broker.start()
    return broker


@dataclass
class Site:
    broker: LocalBroker
    pki: BrokerPki
    workdir: Path
    identities: Path
    tool_output: str

    def answer(self, who: str | None) -> str:
        credential = None
        if who == "stranger":
            credential = self.pki.stranger
        elif who is not None:
            credential = self.pki.identities[who]
        return broker_answer(self.broker.host, self.broker.port, self.pki.ca.cert, credential)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("shipped-broker")
    pki = write_broker_pki(workdir / "pki", NAMES, revoked="retired")
    identities = workdir / "identities.toml"
    identities.write_text(IDENTITIES)
    tool_output = write_acl(identities, workdir / "acl")
    broker = start_shipped(workdir / "broker", pki, workdir / "acl", pki.crl)
    try:
        yield Site(broker, pki, workdir, identities, tool_output)
    finally:
        broker.stop()


@pytest.fixture
def connect(site):
    """Connect as an identity; every client is closed at the end of the test."""
    opened: list[IdentityClient] = []

    def open_(who: str, *, client_id: str = "any-client-id",
              broker: LocalBroker | None = None) -> IdentityClient:
        broker = broker or site.broker
        client = IdentityClient(broker.host, broker.port, site.pki.ca.cert,
                                site.pki.identities[who], client_id=client_id)
        opened.append(client)
        return client.connect()

    yield open_
    for client in opened:
        client.close()


# -- the ACL ------------------------------------------------------------------------------

def test_the_tool_names_the_certificate_each_listed_identity_must_have(site):
    for who, name in NAMES.items():
        assert (name in site.tool_output) == (who != "unlisted"), name


def test_each_identity_may_publish_only_what_its_role_and_sites_allow(connect):
    wrong = []
    for who in ("north", "south", "desk", "admin", "hq", "unlisted"):
        client = connect(who)
        for device in DEVICES:
            for leaf in LEAVES:
                code = client.publish(topic(device, leaf))
                assert code in (*ALLOWED, NOT_AUTHORIZED), f"{who} {leaf}: 0x{code:02x}"
                if (code in ALLOWED) != may_write(who, device, leaf):
                    wrong.append(f"{who} {'may' if code in ALLOWED else 'may not'} publish "
                                 f"to {topic(device, leaf)}")
    assert wrong == []


def test_each_identity_reads_only_what_its_role_and_sites_allow(connect):
    # One connection per identity: a second one with the same certificate would have
    # the same client id and replace the first.
    readers = {who: connect(who) for who in ("north", "south", "desk", "admin", "hq")}
    for reader in readers.values():
        # Everything, as far as the subscription goes: the ACL decides each delivery.
        reader.subscribe(f"{ROOT}/#", retain_handling=UPLINK_RETAIN_HANDLING)
    writers = readers
    for device in DEVICES:
        for leaf in LEAVES:
            writer = writers["hq" if leaf in ("ack", "cmd/test") else device]
            assert writer.publish(topic(device, leaf)) in ALLOWED
    # Published after every PUBACK above, so queued behind every probe for each reader:
    # once a reader has it, it has had every probe it was ever going to get.
    sentinels = {device: topic(device, "cmd/sentinel") for device in DEVICES}
    for device in DEVICES:
        assert writers["hq"].publish(sentinels[device]) in ALLOWED
    for who, reader in readers.items():
        for device in DEVICES:
            if may_read(who, device, "cmd/test"):
                reader.wait_for_message(sentinels[device])
        got = sorted(m.topic for m in reader.messages if m.topic not in sentinels.values())
        expected = sorted(topic(device, leaf) for device in DEVICES for leaf in LEAVES
                          if may_read(who, device, leaf))
        assert got == expected, who


# -- identities --------------------------------------------------------------------------

def test_only_a_duty_desk_publishes_presence_its_own_and_every_identity_reads_it(connect):
    presence = f"{ROOT}/_platform/{{}}/presence"
    north, desk, admin = connect("north"), connect("desk"), connect("admin")
    north.subscribe(presence.format("+"))
    assert desk.publish(presence.format("hq")) == NOT_AUTHORIZED     # not its own
    assert north.publish(presence.format("desk")) == NOT_AUTHORIZED  # a device never
    assert admin.publish(presence.format("admin")) == NOT_AUTHORIZED  # no role ack
    # Last, so that anything refused above would have reached the reader before it:
    assert desk.publish(presence.format("desk")) in ALLOWED
    north.wait_for_message(presence.format("desk"))
    assert [m.topic for m in north.messages] == [presence.format("desk")]


def test_a_certificate_cannot_take_another_identitys_client_id(site, connect):
    """Device south is connected; north's certificate, and one signed by the CA but in no
    list, connect asking for south's client id: each gets its own, south stays on."""
    south = connect("south", client_id="gp-school-north.gate-1")
    north = connect("north", client_id=NAMES["south"])
    stranger = connect("unlisted", client_id=NAMES["south"])
    assert north.publish(topic("north", "status")) in ALLOWED  # as itself
    assert stranger.publish(topic("south", "status")) == NOT_AUTHORIZED
    assert south.publish(topic("south", "status")) in ALLOWED  # the same connection
    assert (south.connections, south.disconnected) == (1, None)
    log = site.broker.log_path.read_text()
    assert f"as {NAMES['north']} (" in log and f"as {NAMES['unlisted']} (" in log


@pytest.mark.parametrize(("who", "expected"), [
    ("north", "CONNACK"),                            # the same, with a good certificate
    (None, "refused: SSLV3_ALERT_HANDSHAKE_FAILURE"),  # no client certificate
    ("retired", "refused: SSLV3_ALERT_CERTIFICATE_REVOKED"),  # in the CRL
    ("stranger", "refused: TLSV1_ALERT_DECRYPT_ERROR"),  # a CA of the same name, another key
])
def test_a_connection_without_a_valid_certificate_is_refused(site, who, expected):
    assert site.answer(who) == expected


def test_revoking_a_device_refuses_it_at_once_after_a_reload(site, connect, tmp_path):
    """README's procedure: a new CRL, the device out of the list, the ACL written again,
    `systemctl reload mosquitto`. The open connection survives the CRL (Mosquitto checks
    it at the handshake only) but the new ACL leaves it nothing."""
    crl, acl = tmp_path / "crl.pem", tmp_path / "acl"
    crl.write_bytes(site.pki.crl.read_bytes())
    write_acl(site.identities, acl)
    broker = start_shipped(tmp_path / "broker", site.pki, acl, crl)
    try:
        north = connect("north", broker=broker)
        south = connect("south", broker=broker)
        assert north.publish(topic("north", "event/alarm")) in ALLOWED

        write_crl(crl, site.pki.ca, [site.pki.identities[w].cert for w in ("retired", "north")])
        identities = tmp_path / "identities.toml"
        identities.write_text(IDENTITIES.replace(
            '[[sites]]\nid = "school.north"\ndevices = ["gate-1"]\n', "")
            .replace('sites = ["school.north"]', 'sites = ["school"]'))
        write_acl(identities, acl)
        broker.reload()

        assert north.publish(topic("north", "event/alarm")) == NOT_AUTHORIZED
        assert south.publish(topic("south", "event/alarm")) in ALLOWED
        answer = broker_answer(broker.host, broker.port, site.pki.ca.cert,
                               site.pki.identities["north"])
        assert answer == "refused: SSLV3_ALERT_CERTIFICATE_REVOKED"
    finally:
        broker.stop()


def test_a_crl_past_its_next_update_refuses_every_certificate(site, tmp_path):
    """Why the README says to keep the CRL current: OpenSSL then trusts no certificate."""
    crl = tmp_path / "crl.pem"
    write_crl(crl, site.pki.ca, [], next_update=dt.timedelta(seconds=-1))
    broker = start_shipped(tmp_path / "broker", site.pki, site.workdir / "acl", crl)
    try:
        answer = broker_answer(broker.host, broker.port, site.pki.ca.cert,
                               site.pki.identities["north"])
        assert answer == "refused: SSLV3_ALERT_CERTIFICATE_EXPIRED"
    finally:
        broker.stop()


# -- retained messages and sizes -----------------------------------------------------------

def test_a_retained_ack_is_kept_by_the_broker_but_never_handed_to_a_device(connect):
    """Mosquitto 2.0 cannot refuse a retained message on some topics only (see the shipped
    configuration): what it does do is keep it from a subscriber that asks, as the uplink
    does, for no retained messages (MQTT 5 Retain Handling 2)."""
    hq, north, desk = connect("hq"), connect("north"), connect("desk")
    ack = topic("north", "ack")
    try:
        assert hq.publish(ack, b"stale", retain=True) in ALLOWED
        north.subscribe(ack, retain_handling=UPLINK_RETAIN_HANDLING)
        assert hq.publish(ack, b"fresh") in ALLOWED
        assert north.wait_for_message(ack).payload == b"fresh"
        assert [m.payload for m in north.received(ack)] == [b"fresh"]  # never the stale one

        desk.subscribe(ack, retain_handling=SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE)
        kept = desk.wait_for_message(ack)
        assert (kept.payload, kept.retained) == (b"stale", True)  # the broker kept it
        # Retained messages stay available to the devices' own status and health.
        assert north.publish(topic("north", "status"), b"online", retain=True) in ALLOWED
    finally:
        hq.publish(ack, b"", retain=True)  # cleared, as the configuration tells platforms


def test_a_snapshot_fits_and_a_message_over_the_limit_goes_nowhere(connect):
    north, hq = connect("north"), connect("hq")
    snapshots = topic("north", "snapshot/e1")
    hq.subscribe(topic("north", "#"), retain_handling=UPLINK_RETAIN_HANDLING)
    limit = north.connack[1].MaximumPacketSize  # announced to MQTT 5 clients
    # The uplink sends a snapshot only if it is 1,024 bytes under the limit; the camera's
    # default largest JPEG, its description around it, must pass.
    largest = CameraConfig.model_fields["max_jpeg_bytes"].default + 2048
    assert largest + 1024 <= limit
    assert north.publish(snapshots, b"j" * largest) in ALLOWED

    north.client.publish(snapshots, b"x" * limit, qos=1)  # paho does not stop it
    north.wait_for(lambda: north.disconnected is not None, what="the broker to hang up")
    sentinel = topic("north", "cmd/sentinel")
    assert hq.publish(sentinel) in ALLOWED
    hq.wait_for_message(sentinel)
    assert [len(m.payload) for m in hq.received(snapshots)] == [largest]
