"""A throw-away certificate authority for tests: a CA, a broker and a device certificate."""

from __future__ import annotations

import datetime as dt
import ipaddress

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
