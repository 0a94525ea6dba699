"""A throw-away certificate authority for tests: a CA, a broker and a device certificate;
and a platform's whole PKI for the shipped broker configuration (identities, a CRL)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def certificate(subject: str, key, issuer_cert=None, issuer_key=None, *, ca=False):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer_cert.subject if issuer_cert else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def write_pki(directory):
    directory.mkdir()
    files = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("Guardpost test CA", ca_key, ca=True)
    for who in ("ca", "broker", "device"):
        key = ca_key if who == "ca" else ec.generate_private_key(ec.SECP256R1())
        cert = ca if who == "ca" else certificate(who, key, ca, ca_key)
        (directory / f"{who}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{who}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        (directory / f"{who}.key").chmod(0o600)
        files[who] = (directory / f"{who}.pem", directory / f"{who}.key")
    return files


def sign_request(csr_pem: bytes, ca_pem_path, ca_key_path, *, days: int = 365) -> bytes:
    """What the platform does with a device's CSR: a certificate signed by its CA."""
    request = x509.load_pem_x509_csr(csr_pem)
    ca_cert = x509.load_pem_x509_certificate(ca_pem_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    now = dt.datetime.now(dt.UTC)
    issued = (x509.CertificateBuilder().subject_name(request.subject)
              .issuer_name(ca_cert.subject).public_key(request.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(minutes=5))
              .not_valid_after(now + dt.timedelta(days=days))
              .sign(ca_key, hashes.SHA256()))
    return issued.public_bytes(serialization.Encoding.PEM)


# -- a platform's PKI for the shipped broker configuration (issue 13) ----------------------

@dataclass(frozen=True)
class Credential:
    """One certificate and its key on disk, and the name (CN) it carries."""

    name: str
    cert: Path
    key: Path


@dataclass(frozen=True)
class BrokerPki:
    ca: Credential                    # the platform's CA (it signs certificates and CRLs)
    crl: Path                         # its revocation list (PEM)
    broker: Credential                # the broker's server certificate (CN localhost)
    identities: dict[str, Credential]  # by the test's short name
    stranger: Credential              # a device name, signed by another CA

    def revoke(self, *shorts: str) -> None:
        """Write a new CRL revoking these identities (what the platform does to revoke)."""
        write_crl(self.crl, self.ca, [self.identities[short].cert for short in shorts])


def _write_credential(directory: Path, short: str, name: str, key, cert) -> Credential:
    cert_path, key_path = directory / f"{short}.pem", directory / f"{short}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return Credential(name, cert_path, key_path)


def write_crl(path: Path, ca: Credential, revoked: list[Path], *,
              next_update: dt.timedelta = dt.timedelta(days=1)) -> None:
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), None)
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now - dt.timedelta(minutes=5)).next_update(now + next_update))
    for cert_path in revoked:
        serial = x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial)
            .revocation_date(now - dt.timedelta(minutes=1)).build())
    temporary = path.with_name(path.name + ".new")
    temporary.write_bytes(builder.sign(ca_key, hashes.SHA256())
                          .public_bytes(serialization.Encoding.PEM))
    temporary.replace(path)


def write_broker_pki(directory: Path, names: dict[str, str], *,
                     revoked: str | None = None) -> BrokerPki:
    """A CA, the broker's certificate, one client certificate per ``names`` (short name ->
    CN), a CRL revoking the one named ``revoked`` (if any), and a stranger: a certificate with the
    CN of the first identity, issued by another CA that bears the very same name.
    EC P-256 throughout (cheap to make, unlike RSA)."""
    directory.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = certificate("Guardpost test CA", ca_key, ca=True)
    ca = _write_credential(directory, "ca", ca_cert.subject.rfc4514_string(), ca_key, ca_cert)

    def issue(name: str, issuer=ca_cert, issuer_key=ca_key):
        key = ec.generate_private_key(ec.SECP256R1())
        return key, certificate(name, key, issuer, issuer_key)

    broker = _write_credential(directory, "broker", "localhost", *issue("localhost"))
    identities = {short: _write_credential(directory, short, name, *issue(name))
                  for short, name in names.items()}
    crl = directory / "crl.pem"
    write_crl(crl, ca, [identities[revoked].cert] if revoked else [])

    other_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = certificate("Guardpost test CA", other_key, ca=True)
    first = next(iter(names.values()))
    stranger = _write_credential(directory, "stranger", first,
                                 *issue(first, other_ca, other_key))
    return BrokerPki(ca, crl, broker, identities, stranger)
