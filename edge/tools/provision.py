"""``guardpost provision``: give a device its identity and its keys.

    guardpost provision --site S --device D --location "South gate" --broker HOST[:PORT]
        [--ca ca.pem] [--cert device.pem --key device.key | --bundle device.p12]

- The identity and the broker go into the configuration file; its comments and every
  other setting are kept (tomlkit edits the document in place).
- Without a certificate, a new private key (EC P-256) and a certificate signing request
  (CN = ``{site}/{device}``, the name the broker knows the device by: see
  ``guardpost broker-acl``) are created; the installer sends the CSR to the platform and
  runs ``provision --cert`` with what comes back. The key is reused on later runs.
- With a certificate (PEM, or a PKCS#12 bundle the platform issued), it must match the
  key, be valid now, and chain to the CA given.

Layout: ``/etc/guardpost/tls/{ca,device}.pem`` (public, readable by the daemons) and the
private key in ``/etc/guardpost/credentials/device.key`` (0600 root), which systemd hands
to the uplink through ``LoadCredential=``; the configuration names it
``credential:device.key``.

The device's event-signing key (Ed25519, ``credentials/event-signing.key``, 0600: every
event the device publishes is signed with it) is created when missing and kept on later
runs; its public key is printed every time, for the platform to register the device.

Everything is checked before anything is written; files are written under temporary
names and renamed into place, the configuration last. Bad input writes nothing.
"""

from __future__ import annotations

import grp
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomlkit
import tomlkit.exceptions
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge.config import ConfigError, parse_config
from edge.contract.event_signature import EventSigner, load_private_key, private_key_pem
from edge.runtime.clock import wall_now
from edge.runtime.durable import fsync_directory
from edge.tools.broker_acl import device_name

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "guardpost.example.toml"


class ProvisionError(Exception):
    """Provisioning refused; nothing was written."""


@dataclass
class Plan:
    """Every file provisioning will write, decided and checked before any is written."""

    files: list[tuple[Path, bytes, int]] = field(default_factory=list)  # path, data, mode
    notes: list[str] = field(default_factory=list)
    removals: list[Path] = field(default_factory=list)  # after everything is in place

    def add(self, path: Path, data: bytes, mode: int) -> None:
        self.files.append((path, data, mode))


def _load_key(data: bytes, source: str):
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise ProvisionError(f"{source}: not an unencrypted PEM private key ({err})") from None


def _load_certificates(data: bytes, source: str) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as err:
        raise ProvisionError(f"{source}: not a PEM certificate ({err})") from None
    if not certificates:
        raise ProvisionError(f"{source}: no certificate in it")
    return certificates


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ProvisionError(f"cannot read the {what} {path}: {err.strerror}") from None


def _public_bytes(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def _issued_by(cert: x509.Certificate, authority: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(authority)  # the signature, not only the name
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _cert_public_bytes(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def _require_ca(ca: list[x509.Certificate]) -> None:
    if not ca:
        raise ProvisionError("--ca is needed: no CA certificate of the broker installed yet")


def _check_certificate(cert: x509.Certificate, key, ca: list[x509.Certificate],
                       source: str, expected_name: str, notes: list[str]) -> None:
    if _public_bytes(key) != _cert_public_bytes(cert):
        raise ProvisionError(f"{source}: the certificate does not belong to the device's key")
    now = wall_now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ProvisionError(f"{source}: the certificate is not valid now (valid "
                             f"{cert.not_valid_before_utc:%Y-%m-%d} to "
                             f"{cert.not_valid_after_utc:%Y-%m-%d})")
    if not any(_issued_by(cert, authority) for authority in ca):
        raise ProvisionError(f"{source}: the certificate was not issued by the broker's CA "
                             f"(issuer {cert.issuer.rfc4514_string()})")
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        raise ProvisionError(f"{source}: the certificate is not for TLS clients "
                             "(its extended key usage lacks clientAuth)")
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names[:1] != [expected_name]:
        # A broker set up as Guardpost ships it takes the (first) CN as the device's user
        # name and client id, and its ACL grants the device's topics to {site}/{device}
        # only. Another platform may name devices its own way: say it, do not refuse it.
        notes.append(f"note: the certificate names {names or 'no common name'}, not "
                     f"{expected_name}: a broker configured as Guardpost ships it "
                     "(config/mosquitto) will let this device publish nothing")


def make_csr(key, site: str, device: str) -> bytes:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_name(site, device)),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, site)])
    request = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(
        key, hashes.SHA256())
    return request.public_bytes(serialization.Encoding.PEM)


def plan_provision(config_path: Path, *, site: str, device: str, location: str, broker: str,
                   ca: Path | None = None, cert: Path | None = None, key: Path | None = None,
                   bundle: Path | None = None, new_key: bool = False,
                   platform_keys: Path | None = None) -> Plan:
    """Check everything and return what to write; raises :class:`ProvisionError`."""
    config_path = Path(config_path)
    etc = config_path.parent
    tls_dir, credentials = etc / "tls", etc / "credentials"
    key_path = credentials / "device.key"
    pending_path = credentials / "device.key.pending"
    plan = Plan()

    host, _, port_text = broker.rpartition(":") if ":" in broker else (broker, "", "")
    try:
        port = int(port_text) if port_text else 8883
    except ValueError:
        raise ProvisionError(f"--broker {broker!r}: the port must be a number") from None

    # The configuration first: an invalid site id or broker stops everything here.
    try:
        text = config_path.read_text() if config_path.exists() else EXAMPLE.read_text()
        document = tomlkit.parse(text)
    except OSError as err:
        raise ProvisionError(f"cannot read {config_path}: {err.strerror}") from None
    except tomlkit.exceptions.TOMLKitError as err:
        raise ProvisionError(f"{config_path} is not valid TOML ({err}); fix or remove "
                             "it first") from None
    document.setdefault("device", tomlkit.table())
    document["device"]["site_id"] = site
    document["device"]["device_id"] = device
    document["device"]["location"] = location
    document.setdefault("broker", tomlkit.table())
    document["broker"]["host"] = host
    document["broker"]["port"] = port
    tls = tomlkit.table()
    tls["ca_file"] = str(tls_dir / "ca.pem")
    tls["cert_file"] = str(tls_dir / "device.pem")
    tls["key_file"] = "credential:device.key"
    document["broker"]["tls"] = tls
    if platform_keys is not None:
        _take_platform_keys(document, platform_keys, plan)
    elif _placeholder_keys(document):
        plan.notes.append("note: [[trust.platform_keys]] still holds the example's "
                          "placeholders: until the platform's keys are given "
                          "(--platform-keys FILE), no acknowledgement is believed")
    rendered = tomlkit.dumps(document)
    try:
        parse_config(tomllib.loads(rendered), str(config_path))
    except ConfigError as err:
        problems = [p for p in err.problems if "cannot read" not in p]  # written below
        if problems:
            raise ProvisionError("; ".join(problems)) from None

    # The CA: given now, or the one installed by an earlier run.
    ca_certs: list[x509.Certificate] = []
    if ca is not None:
        ca_data = _read(ca, "CA certificate")
        ca_certs = _load_certificates(ca_data, str(ca))
        plan.add(tls_dir / "ca.pem", ca_data, 0o644)
    elif (tls_dir / "ca.pem").exists():
        ca_certs = _load_certificates(_read(tls_dir / "ca.pem", "CA certificate"),
                                      str(tls_dir / "ca.pem"))
    expected_name = device_name(site, device)

    if bundle is not None:
        try:
            device_key, device_cert, extra = pkcs12.load_key_and_certificates(
                _read(bundle, "certificate bundle"), None)
        except ValueError as err:
            raise ProvisionError(f"{bundle}: not a PKCS#12 bundle without password "
                                 f"({err})") from None
        if device_key is None or device_cert is None:
            raise ProvisionError(f"{bundle}: the bundle must hold the key and the certificate")
        if not ca_certs and extra:
            ca_certs = list(extra)
            plan.add(tls_dir / "ca.pem", b"".join(c.public_bytes(serialization.Encoding.PEM)
                                                  for c in extra), 0o644)
        _require_ca(ca_certs)
        _check_certificate(device_cert, device_key, ca_certs, str(bundle), expected_name,
                           plan.notes)
        plan.add(key_path, private_key_pem(device_key), 0o600)
        plan.add(tls_dir / "device.pem", device_cert.public_bytes(serialization.Encoding.PEM),
                 0o644)
    elif cert is not None:
        # The certificate the platform returned for our CSR: it belongs to the pending
        # key (after --new-key) or to the current one.
        _require_ca(ca_certs)
        [device_cert, *_] = _load_certificates(_read(cert, "certificate"), str(cert))
        candidates = [(path, _load_key(_read(path, "private key"), str(path)))
                      for path in (pending_path, key_path) if path.exists()]
        if key is not None:
            candidates = [(key_path, _load_key(_read(key, "private key"), str(key)))]
        if not candidates:
            raise ProvisionError(f"no private key to go with {cert} (run provision without "
                                 "--cert first, or give --key)")
        owner = next(((path, k) for path, k in candidates
                      if _public_bytes(k) == _cert_public_bytes(device_cert)), candidates[-1])
        _check_certificate(device_cert, owner[1], ca_certs, str(cert), expected_name,
                           plan.notes)
        if owner[0] == pending_path or key is not None:
            plan.add(key_path, private_key_pem(owner[1]), 0o600)  # the new key takes over now
            if pending_path.exists():
                plan.removals.append(pending_path)
        plan.add(tls_dir / "device.pem", _read(cert, "certificate"), 0o644)
    else:
        _require_ca(ca_certs)
        if key is not None:
            device_key = _load_key(_read(key, "private key"), str(key))
            plan.add(key_path, private_key_pem(device_key), 0o600)
        elif key_path.exists() and not new_key:
            device_key = _load_key(_read(key_path, "private key"), str(key_path))
        else:
            device_key = ec.generate_private_key(ec.SECP256R1())
            # A replacement waits beside the working key until its certificate comes:
            # the device keeps reaching the platform meanwhile.
            target = pending_path if key_path.exists() else key_path
            plan.add(target, private_key_pem(device_key), 0o600)
            plan.notes.append(f"created a new private key {target}")
        if not isinstance(device_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ProvisionError("the device key must be an EC or RSA key")
        plan.add(etc / "device.csr", make_csr(device_key, site, device), 0o644)
        plan.notes.append(f"send {etc / 'device.csr'} to the platform, then run "
                          "guardpost provision ... --cert <the certificate it returns>, "
                          "then: systemctl restart guardpost.target")
    _plan_event_key(plan, credentials / "event-signing.key", document, site, device)
    plan.add(config_path, rendered.encode(), 0o640)
    return plan


def _take_platform_keys(document, source: Path, plan: Plan) -> None:
    """The platform's public keys, as it hands them out: a TOML file of
    ``[[trust.platform_keys]]`` (or ``[[platform_keys]]``) entries, checked here."""
    from pydantic import ValidationError

    from edge.config.trust import PlatformKeyConfig

    try:
        given = tomllib.loads(_read(source, "platform keys").decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ProvisionError(f"{source}: not TOML ({err})") from None
    entries = given.get("trust", given).get("platform_keys")
    if not isinstance(entries, list) or not entries:
        raise ProvisionError(f"{source}: no [[trust.platform_keys]] in it")
    try:
        keys = [PlatformKeyConfig.model_validate(entry) for entry in entries]
    except ValidationError as err:
        raise ProvisionError(f"{source}: {err.errors()[0]['loc']}: "
                             f"{err.errors()[0]['msg']}") from None
    trust = document.setdefault("trust", tomlkit.table())
    array = tomlkit.aot()
    for key in keys:
        table = tomlkit.table()
        table.update({"key_id": key.key_id, "public_key": key.public_key,
                      "roles": list(key.roles)})
        array.append(table)
    trust["platform_keys"] = array
    plan.notes.append("platform keys: " + ", ".join(
        f"{k.key_id} ({'+'.join(k.roles)})" for k in keys))


def _placeholder_keys(document) -> bool:
    """Whether the configuration still lists the example's keys (nobody holds them)."""
    example = tomllib.loads(EXAMPLE.read_text())["trust"]["platform_keys"]
    placeholders = {entry["public_key"] for entry in example}
    listed = document.get("trust", {}).get("platform_keys", [])
    return any(entry.get("public_key") in placeholders for entry in listed)


def _plan_event_key(plan: Plan, default_path: Path, document, site: str, device: str) -> None:
    """The event-signing key: kept if there is one, else a new one (signed events)."""
    named = str(document.get("trust", {}).get("event_key", "credential:event-signing.key"))
    if named != "credential:event-signing.key":
        plan.notes.append(f"note: trust.event_key names {named}: provision leaves it alone")
        return
    if default_path.exists():
        try:
            signer = EventSigner(load_private_key(_read(default_path, "event-signing key"),
                                                  str(default_path)))
        except ValueError as err:
            raise ProvisionError(f"{err}; remove it to have a new one made") from None
    else:
        key = Ed25519PrivateKey.generate()
        signer = EventSigner(key)
        plan.add(default_path, private_key_pem(key), 0o600)
        plan.notes.append(f"created the event-signing key {default_path}")
    plan.notes.append(f"event-signing public key of {site}/{device} (register it with the "
                      f"platform): {signer.public_key}")


def apply(plan: Plan) -> None:
    """Write the plan: each file under a temporary name, then renamed; config last."""
    group = _guardpost_gid()
    staged = []
    try:
        for path, data, mode in plan.files:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.parent.name == "credentials":
                path.parent.chmod(0o700)
            temporary = path.with_name(f".{path.name}.new")
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(descriptor, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temporary, mode)  # the umask must not loosen (or tighten) it
            if mode == 0o640 and group is not None and os.geteuid() == 0:
                os.chown(temporary, 0, group)
            staged.append((temporary, path))
    except OSError:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        raise
    for temporary, path in staged:
        temporary.replace(path)
    for path in plan.removals:
        path.unlink(missing_ok=True)
    for directory in {path.parent for _, path in staged}:
        fsync_directory(directory)  # the renames themselves survive a power cut


def _guardpost_gid() -> int | None:
    try:
        return grp.getgrnam("guardpost").gr_gid
    except KeyError:
        return None
