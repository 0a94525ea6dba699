"""Local trust (issue 13, first parts): the certificates the device connects with are watched
(a fault 30 days before one expires, and once it has), and a daemon run by hand creates
nothing other users can read."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
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


def created(*directories: Path) -> dict[str, int]:
    """Every file, socket and directory below these, with its mode."""
    return {str(path): stat.S_IMODE(path.lstat().st_mode)
            for directory in directories for path in [directory, *directory.rglob("*")]}


def test_a_daemon_run_by_hand_creates_nothing_other_users_can_read(make_config, daemons):
    """Whatever the person's umask, the daemons create what the units would (UMask=0007):
    nothing for other users, and the files the daemons share (each its own user, all in
    the group guardpost) writable by the group. A umask of 0077 used to leave the outbox
    0600: the uplink, another user, could not have opened it."""
    old = os.umask(0o077)  # a careful person's umask: the other daemons would be locked out
    try:
        path, config = make_config()
        daemons("button", path)
        daemons("uplink", path)
    finally:
        os.umask(old)
    state, run = config.storage.database.parent, config.storage.runtime_dir
    modes = created(state, run)
    assert all(mode & 0o007 == 0 for mode in modes.values()), modes
    shared = [p for p in modes if Path(p).name.startswith("outbox.db")
              or Path(p).suffix in (".ctl", ".wake") or Path(p).is_dir()]
    assert len(shared) >= 5, modes
    assert all(modes[p] & 0o060 == 0o060 for p in shared), modes


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_commands_run_by_hand_create_files_with_the_units_modes(tmp_path, umask):
    """`guardpost reset`, `test-alarm`, `report -o` on a device whose outbox does not
    exist yet (the installer's first commands): the outbox, its lock and mark, the test's
    lock, the report: 0660, their directories 0770."""
    config = write_toml(tmp_path / "g.toml", sim_document(tmp_path, 9))  # no broker
    commands = (["reset"], ["test-alarm", "--ack-timeout", "0.1"],
                ["report", "--month", "2026-01", "-o", str(tmp_path / "state" / "r.md")])
    for command in commands:
        subprocess.run([sys.executable, "-m", "edge", *command, "--config", str(config)],
                       umask=umask, capture_output=True, timeout=120, check=False)
    modes = created(tmp_path / "state", tmp_path / "run")
    assert {"outbox.db", "outbox.db-wal", "outbox.db.writelock", "alarm-test.lock",
            "r.md"} <= {Path(p).name for p in modes}, modes
    assert {mode for p, mode in modes.items() if Path(p).is_dir()} == {0o770}, modes
    assert {mode for p, mode in modes.items() if not Path(p).is_dir()} == {0o660}, modes
