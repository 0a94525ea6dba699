"""The installer and the units, checked in a scratch root directory with Debian's systemd
tools: twice (nothing changes the second time), the resulting tree, then uninstall."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "systemd" / "install.py"
UNITS = ("guardpost-button.service", "guardpost-uplink.service", "guardpost-camera.service",
         "guardpost-selftest.service", "guardpost-fallback.service", "guardpost.target")
SERVICES = UNITS[:5]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the installer creates users: root only"),
    pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                       reason="needs Debian's systemd package (.ci/setup installs it)"),
]


def install(root: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(INSTALL), "--root", str(root), *args],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path outside the virtual environment: type, mode, owner, content hash."""
    tree = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if relative.parts[:3] == ("opt", "guardpost", "venv") or relative.parts[:3] == (
                "usr", "lib", "systemd"):
            continue
        info = path.lstat()
        content = (os.readlink(path) if path.is_symlink() else
                   hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None)
        tree[str(relative)] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode),
                               info.st_uid, info.st_gid, content)
    return tree


def ids(root: Path) -> tuple[dict, dict]:
    users = {f[0]: f for f in (line.split(":") for line in
                                (root / "etc/passwd").read_text().splitlines())}
    groups = {f[0]: f for f in (line.split(":") for line in
                                 (root / "etc/group").read_text().splitlines())}
    return users, groups


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A scratch root holding what a Debian system has under /usr/lib/systemd/system, so
    that systemd-analyze can resolve the units' dependencies inside it."""
    scratch = tmp_path_factory.mktemp("root")
    shutil.copytree("/usr/lib/systemd/system", scratch / "usr/lib/systemd/system",
                    symlinks=True)
    return scratch


@pytest.fixture(scope="module")
def installed(root) -> Path:
    first = install(root)
    assert "enabled guardpost.target" in first.stdout
    before = snapshot(root)
    second = install(root)
    assert "nothing to change" in second.stdout
    assert snapshot(root) == before  # idempotent, to the mode and owner
    return root


DAEMONS = ("button", "uplink", "selftest", "fallback", "camera")
HARDWARE = {"button": "gpio", "fallback": "dialout", "camera": "video"}


def test_one_user_per_daemon_in_the_shared_group_with_only_its_own_hardware(installed):
    users, groups = ids(installed)
    shared = groups["guardpost"][2]
    for daemon in DAEMONS:
        user = users[f"guardpost-{daemon}"]
        assert user[3] == shared, daemon  # primary group guardpost
        assert user[5:] == ["/var/lib/guardpost", "/usr/sbin/nologin"]
        member_of = {name for name, entry in groups.items()
                     if f"guardpost-{daemon}" in entry[3].split(",")}
        assert member_of == ({HARDWARE[daemon]} if daemon in HARDWARE else set()), daemon
    assert "guardpost-admin" in groups and groups["guardpost-admin"][3] == ""
    assert "guardpost" not in users  # no shared user any more


def test_each_unit_runs_as_its_daemons_user_with_the_groups_the_sysusers_file_gives():
    for daemon in DAEMONS:
        lines = (REPO / "systemd" / f"guardpost-{daemon}.service").read_text().splitlines()
        assert f"User=guardpost-{daemon}" in lines and "Group=guardpost" in lines
        supplementary = [line for line in lines if line.startswith("SupplementaryGroups=")]
        assert supplementary == ([f"SupplementaryGroups={HARDWARE[daemon]}"]
                                 if daemon in HARDWARE else []), daemon
        # Shared by users that differ: systemd would chown them to each unit in turn.
        assert not [line for line in lines if line.startswith(
            ("StateDirectory", "RuntimeDirectory"))], daemon
        assert "ReadWritePaths=/var/lib/guardpost /run/guardpost" in lines
        assert "UMask=0007" in lines


def test_directories_and_files_have_the_promised_modes_and_owners(installed):
    _, groups = ids(installed)
    gid = int(groups["guardpost"][2])
    expected = {
        "etc/guardpost": (0o750, 0, gid),
        "etc/guardpost/credentials": (0o700, 0, 0),
        # Made by the installer, so that an update's uplink finds it (signed events).
        "etc/guardpost/credentials/event-signing.key": (0o600, 0, 0),
        "etc/guardpost/guardpost.toml": (0o640, 0, gid),
        # Every daemon writes here, each its own user: the group's, setgid.
        "var/lib/guardpost": (0o2770, 0, gid),
        "run/guardpost": (0o2770, 0, gid),
    }
    for relative, (mode, owner, group) in expected.items():
        info = (installed / relative).stat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (mode, owner, group), \
            relative
    assert (installed / "etc/guardpost/guardpost.toml").read_bytes() == \
        (REPO / "config/guardpost.example.toml").read_bytes()


def test_the_units_are_installed_verbatim_and_enabled(installed):
    system = installed / "etc/systemd/system"
    for unit in UNITS:
        assert (system / unit).read_bytes() == (REPO / "systemd" / unit).read_bytes()
    assert os.readlink(system / "multi-user.target.wants/guardpost.target") == \
        "/etc/systemd/system/guardpost.target"
    for unit in SERVICES:
        assert (system / "guardpost.target.wants" / unit).is_symlink()


def test_the_installed_command_runs(installed):
    result = subprocess.run([str(installed / "opt/guardpost/venv/bin/guardpost"), "--version"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("guardpost ")


def test_systemd_accepts_the_units(installed):
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={installed}",
         *(f"/etc/systemd/system/{unit}" for unit in UNITS)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def exposure(unit: Path) -> float:
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                            capture_output=True, text=True, timeout=120)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


@pytest.mark.parametrize("unit", SERVICES)
def test_every_service_is_hardened_to_an_exposure_of_3_or_less(unit):
    assert exposure(REPO / "systemd" / unit) <= 3.0


def test_the_services_restart_but_not_on_a_bad_configuration():
    for unit in SERVICES:
        text = (REPO / "systemd" / unit).read_text()
        for line in ("Type=notify", "Restart=always", "RestartPreventExitStatus=78",
                     "NoNewPrivileges=yes", "ProtectSystem=strict"):
            assert line in text.splitlines(), (unit, line)
        assert re.search(r"^WatchdogSec=\d+$", text, re.M), unit
    button = (REPO / "systemd/guardpost-button.service").read_text()
    unit_section = [line for line in button.split("[Service]")[0].splitlines()
                    if not line.startswith("#")]
    assert not [line for line in unit_section if "network" in line]  # needs no network
    assert "PrivateNetwork=yes" in button
    uplink = (REPO / "systemd/guardpost-uplink.service").read_text()
    assert "After=network-online.target guardpost-button.service" in uplink


def test_uninstall_keeps_only_the_data_then_purge_removes_everything(tmp_path):
    root = tmp_path / "root"
    # Installed first by a version with one shared user, then upgraded.
    (root / "etc").mkdir(parents=True)
    subprocess.run(["systemd-sysusers", f"--root={root}", "--inline", "g gpio -",
                    'u guardpost - "Guardpost" /var/lib/guardpost', "m guardpost gpio"],
                   check=True, capture_output=True)
    old_uid = int(ids(root)[0]["guardpost"][2])
    (root / "var/lib/guardpost/spool").mkdir(parents=True)
    (root / "var/lib/guardpost/spool").chmod(0o750)
    (root / "var/lib/guardpost/outbox.db").write_bytes(b"events")
    (root / "var/lib/guardpost/outbox.db").chmod(0o640)
    os.chown(root / "var/lib/guardpost/outbox.db", old_uid, 0)
    install(root, "--quiet")
    assert "guardpost" in ids(root)[0]  # an upgrade keeps it: it still owns files
    # ... and makes its state the group's, which every daemon's own user is in.
    gid = int(ids(root)[1]["guardpost"][2])
    for relative, mode in (("outbox.db", 0o660), ("spool", 0o2770), ("", 0o2770)):
        info = (root / "var/lib/guardpost" / relative).stat()
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (mode, gid), relative
    shadow_mode = stat.S_IMODE((root / "etc/shadow").stat().st_mode)
    install(root, "--uninstall")
    left = {str(p.relative_to(root)) for p in root.rglob("*")}
    assert "var/lib/guardpost/outbox.db" in left and "etc/guardpost/guardpost.toml" in left
    for gone in ("opt/guardpost", "etc/systemd/system/guardpost.target",
                 "etc/systemd/system/multi-user.target.wants/guardpost.target",
                 "usr/lib/sysusers.d/guardpost.conf", "usr/lib/tmpfiles.d/guardpost.conf",
                 "run/guardpost"):
        assert gone not in left, gone
    install(root, "--uninstall", "--purge")
    left = {str(p.relative_to(root)) for p in root.rglob("*")}
    assert not [p for p in left if "guardpost" in p]
    users, groups = ids(root)
    assert not [name for name in [*users, *groups] if name.startswith("guardpost")]
    assert "guardpost" not in groups["gpio"][3]
    assert stat.S_IMODE((root / "etc/shadow").stat().st_mode) == shadow_mode


def test_the_first_boot_file_calls_the_installer_and_provision_as_they_are():
    from edge.tools.cli import build_parser

    text = (REPO / "config/first-boot.user-data.example").read_text()
    assert "[python3, /opt/guardpost-src/systemd/install.py]" in text
    start = text.index("[/opt/guardpost/venv/bin/guardpost, provision")
    block = text[start + 1:text.index("]", start)]
    argv = [word.strip().strip('"') for word in block.replace("\n", " ").split(",")]
    args = build_parser().parse_args(argv[1:])
    assert args.func.__name__ == "cmd_provision"
    assert args.ca == Path("/root/guardpost-platform-ca.pem")
