"""A network namespace of the test's own for the device, joined to the host by a veth pair.

The device runs in the namespace (``ip netns exec``) and reaches the broker on the
host-side address of the veth pair, in a private /30 used by nothing else; its link can
then be taken down and up as a cable or a modem would. Needs root (or CAP_NET_ADMIN) and
iproute2: :func:`unavailable` says why not, for a skip that names the reason.

Names carry this process's pid (``gpproof-<pid>-<n>``), so that what a killed test run
left behind can be told from another run's and removed (:func:`remove_leftovers`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess

PREFIX = "gpproof-"
_numbers = itertools.count(1)


class NetnsError(RuntimeError):
    pass


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def unavailable() -> str | None:
    """Why this machine cannot make a namespace for the test, or None if it can."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (.ci/setup installs it)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    done = ip("netns", "add", probe, check=False)
    if done.returncode != 0:
        return f"`ip netns add` is not permitted here: {done.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def remove_leftovers() -> None:
    """Namespaces and veths of test runs whose process is gone (killed mid-test)."""
    listing = ip("netns", "list", check=False).stdout.split()
    for name in (n for n in listing if n.startswith(PREFIX)):
        with contextlib.suppress(ValueError):
            if not os.path.exists(f"/proc/{int(name[len(PREFIX):].split('-')[0])}"):
                ip("netns", "del", name, check=False)


def _free_subnet() -> int:
    """A third octet for 10.213.X.0/30 that no interface of the host uses."""
    used = ip("-4", "-o", "addr", "show").stdout
    for candidate in itertools.chain(range(os.getpid() % 200 + 20, 250), range(20, 250)):
        if f"10.213.{candidate}." not in used:
            return candidate
    raise NetnsError("no free 10.213.X.0/30 subnet")


class NetworkNamespace:
    """``with NetworkNamespace() as ns:`` the device runs under ``ns.command_prefix``
    and reaches the host at ``ns.host_address``."""

    def __init__(self):
        number = next(_numbers)
        self.name = f"{PREFIX}{os.getpid()}-{number}"
        tag = f"{os.getpid() % 100000}{number}"
        self.host_link, self.device_link = f"gpp{tag}h"[:15], f"gpp{tag}d"[:15]
        octet = _free_subnet()
        self.host_address, self.device_address = f"10.213.{octet}.1", f"10.213.{octet}.2"
        self._made = False

    @property
    def command_prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name)

    def __enter__(self) -> NetworkNamespace:
        self._made = True
        try:
            ip("netns", "add", self.name)
            ip("link", "add", self.host_link, "type", "veth", "peer", "name", self.device_link)
            ip("link", "set", self.device_link, "netns", self.name)
            ip("addr", "add", f"{self.host_address}/30", "dev", self.host_link)
            ip("link", "set", self.host_link, "up")
            ip("-n", self.name, "addr", "add", f"{self.device_address}/30", "dev",
               self.device_link)
            ip("-n", self.name, "link", "set", self.device_link, "up")
            ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def far_end(self, up: bool) -> None:
        """The host's end of the cable: down, the device keeps its address and route and
        its packets vanish (it learns only from its own timeouts)."""
        ip("link", "set", self.host_link, "up" if up else "down")

    def device_link_state(self, up: bool) -> None:
        """The device's own interface: down, its route goes and sends fail at once."""
        ip("-n", self.name, "link", "set", self.device_link, "up" if up else "down")

    def close(self) -> None:
        if not self._made:
            return
        self._made = False
        # Deleting the namespace deletes its end of the pair, and with it the host's.
        ip("netns", "del", self.name, check=False)
        if ip("link", "show", self.host_link, check=False).returncode == 0:
            ip("link", "del", self.host_link, check=False)
