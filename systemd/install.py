#!/usr/bin/env python3
"""Install Guardpost on a Raspberry Pi (Raspberry Pi OS / Debian), or remove it.

    sudo python3 systemd/install.py                 # install or update; safe to run again
    sudo python3 systemd/install.py --start         # ... and start guardpost.target now
    sudo python3 systemd/install.py --uninstall     # remove; keeps /etc/guardpost and data
    sudo python3 systemd/install.py --uninstall --purge   # ... and the data and the user

Run from a copy of the repository. Only the Python standard library is needed (it runs
before Guardpost exists). What it does, each step only if needed:

- a system user per daemon (``guardpost-button``, ``-uplink``, ``-selftest``,
  ``-fallback``, ``-camera``), all in the group ``guardpost``, each with the hardware
  group it needs, and the group ``guardpost-admin`` for people commissioning the device
  (systemd-sysusers, ``systemd/guardpost.sysusers``);
- ``/etc/guardpost`` (0750 root:guardpost) with the example configuration if there is
  none, ``/etc/guardpost/credentials`` (0700 root), ``/var/lib/guardpost`` and
  ``/run/guardpost`` (2770 root:guardpost) (systemd-tmpfiles, ``systemd/guardpost.tmpfiles``);
- Guardpost in its own virtual environment, ``/opt/guardpost/venv``;
- the units in ``/etc/systemd/system``, enabled (``guardpost.target`` at boot).

``--root DIR`` does all of it inside DIR instead of / (CI checks the resulting tree).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1]
UNITS = ("guardpost-button.service", "guardpost-uplink.service", "guardpost-camera.service",
         "guardpost-selftest.service", "guardpost-fallback.service", "guardpost.target")
ENABLE = ("guardpost.target", "guardpost-button.service", "guardpost-uplink.service",
          "guardpost-camera.service", "guardpost-selftest.service",
          "guardpost-fallback.service")

# Shipped beside this file: the users and groups (systemd-sysusers), the directories
# (systemd-tmpfiles).
SYSUSERS = SOURCE / "systemd" / "guardpost.sysusers"
TMPFILES = SOURCE / "systemd" / "guardpost.tmpfiles"
# The accounts, in the order they can be removed (the group after its members); the
# single `guardpost` user of earlier versions, where an upgrade left it, too.
DAEMON_USERS = ("guardpost-button", "guardpost-uplink", "guardpost-selftest",
                "guardpost-fallback", "guardpost-camera")
OLD_USERS = ("guardpost",)
GROUPS = ("guardpost", "guardpost-admin")


class Installer:
    def __init__(self, root: Path, python: str, quiet: bool = False):
        self.root = root
        self.python = python
        self.quiet = quiet
        self.changed: list[str] = []

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"install: {text}", flush=True)

    def run(self, *argv: str) -> None:
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL if self.quiet else None)

    def write_if_changed(self, absolute: str, content: bytes, mode: int) -> None:
        target = self.path(absolute)
        if (target.exists() and target.read_bytes() == content
                and target.stat().st_mode & 0o7777 == mode):
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.new")
        temporary.write_bytes(content)
        temporary.chmod(mode)
        temporary.replace(target)  # never a half-written file
        self.changed.append(absolute)
        self.say(f"wrote {absolute}")

    def root_args(self) -> list[str]:
        return [f"--root={self.root}"] if self.root != Path("/") else []

    # -- install -------------------------------------------------------------------------

    def install(self, start: bool) -> None:
        self.path("/etc").mkdir(parents=True, exist_ok=True)
        self.write_if_changed("/usr/lib/sysusers.d/guardpost.conf", SYSUSERS.read_bytes(), 0o644)
        self.run("systemd-sysusers", *self.root_args(), "guardpost.conf")
        self.write_if_changed("/usr/lib/tmpfiles.d/guardpost.conf", TMPFILES.read_bytes(), 0o644)
        self.run("systemd-tmpfiles", "--create", *self.root_args(), "guardpost.conf")
        self.share_state()
        self.install_config()
        self.install_venv()
        self.ensure_event_key()
        for unit in UNITS:
            self.write_if_changed(f"/etc/systemd/system/{unit}",
                                  (SOURCE / "systemd" / unit).read_bytes(), 0o644)
        self.enable()
        if self.root == Path("/") and _systemd_running():
            self.run("systemctl", "daemon-reload")
            if self.changed:  # an update: running daemons pick it up now
                self.run("systemctl", "try-restart", *ENABLE[1:])
            if start:
                self.run("systemctl", "start", "guardpost.target")
        self.say("done" + ("" if self.changed else ": nothing to change"))

    def share_state(self) -> None:
        """The state an earlier version left (one user for every daemon, files 0640 or
        0600) is made the group's: each daemon is now its own user, and they share it."""
        state = self.path("/var/lib/guardpost")
        gid = self.gid("guardpost")
        adjusted = 0
        for entry in [state, *state.rglob("*")]:
            info = entry.lstat()
            if stat.S_ISLNK(info.st_mode):
                continue
            wanted = info.st_mode | (0o2070 if stat.S_ISDIR(info.st_mode) else 0o060)
            if info.st_gid != gid:
                os.chown(entry, -1, gid, follow_symlinks=False)
                adjusted += 1
            if stat.S_IMODE(wanted) != stat.S_IMODE(info.st_mode):
                entry.chmod(stat.S_IMODE(wanted))
                adjusted += 1
        if adjusted:
            self.changed.append("/var/lib/guardpost")
            self.say("made /var/lib/guardpost the group guardpost's (files 0660, dirs 2770)")

    def install_config(self) -> None:
        config = self.path("/etc/guardpost/guardpost.toml")
        if config.exists():
            return  # the installer's configuration is never overwritten
        example = (SOURCE / "config" / "guardpost.example.toml").read_bytes()
        self.write_if_changed("/etc/guardpost/guardpost.toml", example, 0o640)
        os.chown(config, 0, self.gid("guardpost"))
        self.say("edit /etc/guardpost/guardpost.toml, or run: guardpost provision")

    def gid(self, group: str) -> int:
        for line in self.path("/etc/group").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == group:
                return int(fields[2])
        raise SystemExit(f"install: no group {group!r} in {self.path('/etc/group')}")

    def source_fingerprint(self) -> str:
        digest = hashlib.sha256()
        for base in ("pyproject.toml", "README.md", "edge", "drivers"):
            for file in sorted((SOURCE / base).rglob("*") if (SOURCE / base).is_dir()
                               else [SOURCE / base]):
                if file.is_file() and "__pycache__" not in file.parts:
                    digest.update(str(file.relative_to(SOURCE)).encode())
                    digest.update(file.read_bytes())
        return digest.hexdigest()

    def install_venv(self) -> None:
        venv = self.path("/opt/guardpost/venv")
        stamp = self.path("/opt/guardpost/installed-from")
        fingerprint = self.source_fingerprint()
        if stamp.exists() and stamp.read_text().strip() == fingerprint and \
                (venv / "bin" / "guardpost").exists():
            return
        if not (venv / "bin" / "python").exists():
            self.say("creating /opt/guardpost/venv")
            # System site packages: Raspberry Pi OS ships lgpio as python3-lgpio.
            self.run(self.python, "-m", "venv", "--system-site-packages", str(venv))
        self.say("installing Guardpost into /opt/guardpost/venv")
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", str(SOURCE)], check=True)
        shutil.copyfile(SOURCE / "README.md", self.path("/opt/guardpost/README.md"))
        stamp.write_text(fingerprint + "\n")
        self.changed.append("/opt/guardpost")

    def ensure_event_key(self) -> None:
        """The device's event-signing key (the uplink signs every event with it): an
        update from a version before signed events has none, and its uplink would not
        start without one. Made with the Guardpost just installed; its public key is
        printed for the platform (``guardpost provision`` prints it again)."""
        key = self.path("/etc/guardpost/credentials/event-signing.key")
        if key.exists():
            return
        python = self.path("/opt/guardpost/venv/bin/python")
        result = subprocess.run([str(python), "-c", MAKE_EVENT_KEY, str(key)],
                                capture_output=True, text=True, check=True)
        self.changed.append("/etc/guardpost/credentials/event-signing.key")
        self.say(f"created the event-signing key; its public key (register it with the "
                 f"platform): {result.stdout.strip()}")

    def enable(self) -> None:
        wants = self.path("/etc/systemd/system/multi-user.target.wants/guardpost.target")
        if wants.is_symlink() and all(self.path(
                f"/etc/systemd/system/guardpost.target.wants/{u}").is_symlink()
                for u in ENABLE[1:]):
            return
        self.run("systemctl", *self.root_args(), "--quiet", "enable", *ENABLE)
        self.changed.append("enabled units")
        self.say("enabled guardpost.target")

    # -- uninstall -----------------------------------------------------------------------

    def uninstall(self, purge: bool) -> None:
        if self.root == Path("/") and _systemd_running():
            subprocess.run(["systemctl", "stop", "guardpost.target", *ENABLE[1:]], check=False)
        if self.path("/etc/systemd/system/guardpost.target").exists():
            self.run("systemctl", *self.root_args(), "--quiet", "disable", *ENABLE)
        for unit in UNITS:
            self.remove(f"/etc/systemd/system/{unit}")
        self.remove("/opt/guardpost")
        self.remove("/run/guardpost")  # sockets and locks only: nothing to keep
        self.remove("/usr/lib/tmpfiles.d/guardpost.conf")
        self.remove("/usr/lib/sysusers.d/guardpost.conf")
        if purge:
            self.remove("/etc/guardpost")
            self.remove("/var/lib/guardpost")
            self.remove_user()
        else:
            self.say("kept /etc/guardpost and /var/lib/guardpost (use --purge to remove them)")
        if self.root == Path("/") and _systemd_running():
            self.run("systemctl", "daemon-reload")

    def remove(self, absolute: str) -> None:
        target = self.path(absolute)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        else:
            return
        self.say(f"removed {absolute}")

    def remove_user(self) -> None:
        """Drop Guardpost's users, then its groups, with the shadow tools, which keep the
        files' owners, modes and locks right (the shared hardware groups stay)."""
        root = ["--root", str(self.root)] if self.root != Path("/") else []
        for tool, database, names in (("userdel", "passwd", DAEMON_USERS + OLD_USERS),
                                      ("groupdel", "group", GROUPS)):
            for name in names:
                # Read again each time: removing the old user may take its group along.
                entries = self.path(f"/etc/{database}").read_text().splitlines() \
                    if self.path(f"/etc/{database}").exists() else []
                if any(line.startswith(f"{name}:") for line in entries):
                    self.run(tool, *root, name)
        self.say("removed the guardpost users and groups")


# Run by the installed venv's Python: this installer itself uses the standard library only.
MAKE_EVENT_KEY = """
import os, sys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from edge.contract.event_signature import EventSigner, private_key_pem
key = Ed25519PrivateKey.generate()
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
with os.fdopen(fd, "wb") as file:
    file.write(private_key_pem(key))
print(EventSigner(key).public_key)
"""


def _systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/"),
                        help="install into this directory instead of / (for CI and images)")
    parser.add_argument("--uninstall", action="store_true")
    parser.add_argument("--purge", action="store_true",
                        help="with --uninstall: also remove configuration, data and user")
    parser.add_argument("--start", action="store_true", help="start guardpost.target now")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for the virtual environment (>= 3.11)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("install: run as root (sudo)", file=sys.stderr)
        return 1
    if args.purge and not args.uninstall:
        parser.error("--purge goes with --uninstall")
    installer = Installer(args.root.resolve(), args.python, args.quiet)
    if args.uninstall:
        installer.uninstall(args.purge)
    else:
        installer.install(args.start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
