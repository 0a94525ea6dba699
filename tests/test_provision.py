"""``guardpost provision``: identity, broker and keys for mutual TLS; bad input writes
nothing."""

from __future__ import annotations

import hashlib
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import tomlkit
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from edge.config import load_config
from tests.support.pki import sign_request, write_pki

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "guardpost.example.toml"
IDENTITY = ["--site", "school-330106-0042", "--device", "gate-south-1",
            "--location", "南门 South gate", "--broker", "alarm-mqtt.example.gov.cn:8883"]


def provision(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge", "provision", "--config", str(config),
                           *args], capture_output=True, text=True, timeout=60)


def tree(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def etc(tmp_path) -> Path:
    """An /etc/guardpost as the installer leaves it: the example configuration."""
    directory = tmp_path / "etc" / "guardpost"
    directory.mkdir(parents=True)
    (directory / "guardpost.toml").write_text(EXAMPLE.read_text())
    return directory


@pytest.fixture
def pki(tmp_path):
    return write_pki(tmp_path / "platform-pki")


def test_a_new_device_gets_a_private_key_and_a_signing_request(etc, pki):
    result = provision(etc / "guardpost.toml", *IDENTITY, "--ca", str(pki["ca"][0]))
    assert result.returncode == 0, result.stderr
    key = etc / "credentials" / "device.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((etc / "credentials").stat().st_mode) == 0o700
    request = x509.load_pem_x509_csr((etc / "device.csr").read_bytes())
    assert request.is_signature_valid
    [common_name] = request.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert common_name.value == "school-330106-0042/gate-south-1"  # the broker's user name
    assert "send" in result.stdout and "device.csr" in result.stdout
    text = (etc / "guardpost.toml").read_text()
    assert text.startswith("# Guardpost configuration")  # the installer's comments stay
    assert 'site_id = "school-330106-0042"' in text and 'key_file = "credential:device.key"' in text


def test_the_issued_certificate_completes_a_valid_configuration(etc, pki):
    assert provision(etc / "guardpost.toml", *IDENTITY, "--ca", str(pki["ca"][0])).returncode == 0
    key_before = (etc / "credentials" / "device.key").read_bytes()
    issued = etc.parent / "issued.pem"
    issued.write_bytes(sign_request((etc / "device.csr").read_bytes(), *pki["ca"]))
    result = provision(etc / "guardpost.toml", *IDENTITY, "--cert", str(issued))
    assert result.returncode == 0, result.stderr
    assert (etc / "credentials" / "device.key").read_bytes() == key_before  # same key
    config = load_config(etc / "guardpost.toml")
    assert config.device.device_id == "gate-south-1"
    assert (config.broker.host, config.broker.port) == ("alarm-mqtt.example.gov.cn", 8883)
    assert config.broker.tls.key_file == etc / "credentials" / "device.key"
    assert "still holds the example's placeholders" in result.stdout


def test_the_platforms_keys_replace_the_examples_placeholders(etc, pki):
    from tests.support.trust import ADMIN, DUTY_DESK

    keys = etc.parent / "platform-keys.toml"
    keys.write_text(tomlkit.dumps({"trust": {"platform_keys": [
        DUTY_DESK.trust_entry(["ack"]), ADMIN.trust_entry(["ack", "command"])]}}))
    result = provision(etc / "guardpost.toml", *IDENTITY, "--ca", str(pki["ca"][0]),
                       "--platform-keys", str(keys))
    assert result.returncode == 0, result.stderr
    assert "platform keys: test-duty-desk (ack), test-admin (ack+command)" in result.stdout
    text = (etc / "guardpost.toml").read_text()
    assert DUTY_DESK.public_key in text and "placeholder" not in result.stdout
    ring = load_config(etc / "guardpost.toml", check_broker_files=False).trust.keyring()
    assert ring.keys["test-admin"].roles == {"ack", "command"}

    keys.write_text('[[trust.platform_keys]]\nkey_id = "x"\npublic_key = "short"\n'
                    'roles = ["ack"]\n')
    before = tree(etc)
    bad = provision(etc / "guardpost.toml", *IDENTITY, "--platform-keys", str(keys))
    assert bad.returncode == 1 and "public_key" in bad.stderr and tree(etc) == before


def test_a_pkcs12_bundle_from_the_platform(etc, pki):
    key = serialization.load_pem_private_key(pki["device"][1].read_bytes(), None)
    cert = x509.load_pem_x509_certificate(pki["device"][0].read_bytes())
    ca = x509.load_pem_x509_certificate(pki["ca"][0].read_bytes())
    bundle = etc.parent / "device.p12"
    bundle.write_bytes(pkcs12.serialize_key_and_certificates(
        b"device", key, cert, [ca], serialization.NoEncryption()))
    result = provision(etc / "guardpost.toml", *IDENTITY, "--bundle", str(bundle))
    assert result.returncode == 0, result.stderr
    assert load_config(etc / "guardpost.toml").broker.tls is not None
    assert (etc / "tls" / "ca.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE")
    # Its CN is "device": installed, with a word that the shipped broker will refuse it.
    assert "not school-330106-0042/gate-south-1" in result.stdout


@pytest.mark.parametrize(("change", "expected"), [
    (["--site", "school/0042"], "device.site_id: String should match pattern"),
    (["--broker", "broker.example:eighty"], "the port must be a number"),
    (["--cert", "/nonexistent/device.pem"], "cannot read the certificate /nonexistent/device.pem"),
    (["--ca", "/etc/hostname"], "not a PEM certificate"),
])
def test_bad_input_gets_a_clear_error_and_writes_nothing(etc, pki, change, expected):
    before = tree(etc)
    args = [*IDENTITY, "--ca", str(pki["ca"][0])]
    for flag, value in zip(change[::2], change[1::2], strict=True):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    result = provision(etc / "guardpost.toml", *args)
    assert result.returncode == 1
    assert expected in result.stderr and "nothing was written" in result.stderr
    assert tree(etc) == before


def test_a_certificate_for_another_key_is_refused(etc, pki):
    assert provision(etc / "guardpost.toml", *IDENTITY, "--ca", str(pki["ca"][0])).returncode == 0
    before = tree(etc)
    result = provision(etc / "guardpost.toml", *IDENTITY, "--cert", str(pki["broker"][0]))
    assert result.returncode == 1
    assert "does not belong to the device's key" in result.stderr
    assert tree(etc) == before


def test_a_certificate_signed_by_an_impostor_with_the_same_ca_name_is_refused(etc, pki, tmp_path):
    assert provision(etc / "guardpost.toml", *IDENTITY, "--ca", str(pki["ca"][0])).returncode == 0
    impostor = write_pki(tmp_path / "impostor")  # its CA bears the very same name
    forged = etc.parent / "forged.pem"
    forged.write_bytes(sign_request((etc / "device.csr").read_bytes(), *impostor["ca"]))
    before = tree(etc)
    result = provision(etc / "guardpost.toml", *IDENTITY, "--cert", str(forged))
    assert result.returncode == 1 and "not issued by the broker's CA" in result.stderr
    assert tree(etc) == before


def test_a_new_key_waits_for_its_certificate_before_replacing_the_working_one(etc, pki):
    config = etc / "guardpost.toml"
    assert provision(config, *IDENTITY, "--ca", str(pki["ca"][0])).returncode == 0
    first = etc.parent / "first.pem"
    first.write_bytes(sign_request((etc / "device.csr").read_bytes(), *pki["ca"]))
    assert provision(config, *IDENTITY, "--cert", str(first)).returncode == 0
    working = (etc / "credentials" / "device.key").read_bytes()

    assert provision(config, *IDENTITY, "--new-key").returncode == 0
    assert (etc / "credentials" / "device.key").read_bytes() == working  # still in use
    assert (etc / "credentials" / "device.key.pending").exists()
    renewed = etc.parent / "renewed.pem"
    renewed.write_bytes(sign_request((etc / "device.csr").read_bytes(), *pki["ca"]))
    result = provision(config, *IDENTITY, "--cert", str(renewed))
    assert result.returncode == 0, result.stderr
    assert (etc / "credentials" / "device.key").read_bytes() != working
    assert not (etc / "credentials" / "device.key.pending").exists()
    assert load_config(config).broker.tls is not None  # key and certificate match again
