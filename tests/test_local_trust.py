"""Local trust (issue 13, first parts): the certificates the device connects with are watched
(a fault 30 days before one expires, and once it has), and a daemon run by hand creates
nothing other users can read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography import x509

from edge.config import load_config
from edge.daemons.selftest.health import CERT_WARN_DAYS, HealthChecks
from tests.conftest import sim_document, write_toml
from tests.support.pki import write_pki


def test_a_certificate_about_to_expire_is_a_fault_before_the_broker_refuses_it(tmp_path):
    pki = write_pki(tmp_path / "pki")
    tls = {"ca_file": str(pki["ca"][0]), "cert_file": str(pki["device"][0]),
           "key_file": str(pki["device"][1])}
    config = load_config(write_toml(tmp_path / "g.toml",
                                    sim_document(tmp_path, 1883, broker={"tls": tls})))
    checks = HealthChecks(config, outbox=None)
    ends = min(x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc
               for path in (pki["ca"][0], pki["device"][0]))
    assert checks.check_certificates(ends - timedelta(days=CERT_WARN_DAYS + 1)).ok is True
    soon = checks.check_certificates(ends - timedelta(days=CERT_WARN_DAYS - 1))
    assert soon.ok is False and "expires in" in soon.summary
    late = checks.check_certificates(ends + timedelta(days=1))
    assert late.ok is False and "expired" in late.summary


def test_without_tls_the_check_does_not_apply(tmp_path):
    config = load_config(write_toml(tmp_path / "g.toml", sim_document(tmp_path, 1883)))
    assert HealthChecks(config, outbox=None).check_certificates(datetime.now(UTC)).ok is None


def test_a_daemon_run_by_hand_creates_nothing_other_users_can_read(make_config, daemons):
    import os
    import stat

    old = os.umask(0o022)  # a person's usual umask: files would be world-readable
    try:
        path, config = make_config()
        daemons("button", path)
    finally:
        os.umask(old)
    state = config.storage.database.parent
    made = [p for p in [*state.iterdir(), *config.storage.runtime_dir.iterdir()]
            if p.is_file() or p.is_socket()]
    assert made and all(stat.S_IMODE(p.stat().st_mode) & 0o007 == 0 for p in made), \
        {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in made}
