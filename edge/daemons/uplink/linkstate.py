"""Is the uplink connected right now? A small file in the runtime directory says so.

The fallback daemon sends an SMS at once while the uplink is not connected. It used to
read the uplink's record in the database, refreshed with each heartbeat, and took a dead
uplink for connected for up to 90 s. Now the uplink keeps ``{runtime_dir}/uplink.link``
(tmpfs under systemd: no SD card wear): replaced atomically on every change of the link
and at least every :data:`REFRESH_S` from the loop, with the process id, the boot id and
a monotonic stamp (CLOCK_MONOTONIC is one clock for every process of a boot), and it
wakes the fallback on every change.

The file also carries what the uplink knows of the platform's presence (``platform``:
online, offline or unknown; :mod:`edge.contract.presence`): connected to a broker with
the platform known to be offline is, for the fallback, as good as down.

A reader takes the link for down when the file is missing or unreadable, written in
another boot, not refreshed for :data:`STALE_S` (a loop that is stuck, or a process that
was killed or is a zombie), or its writer's process is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from edge.runtime.clock import boot_id
from edge.runtime.wake import wake

REFRESH_S = 0.5   # the loop rewrites the file at least this often
STALE_S = 5.0     # a file not rewritten for this long is no news


def link_path(runtime_dir: Path) -> Path:
    return Path(runtime_dir) / "uplink.link"


class LinkStateFile:
    """The uplink's side: :meth:`update` from its loop, every round."""

    def __init__(self, runtime_dir: Path):
        self.runtime_dir = Path(runtime_dir)
        self.path = link_path(runtime_dir)
        self._temp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        self._boot = boot_id()
        self._connected: bool | None = None
        self._platform: str | None = None
        self._written = 0.0

    def update(self, connected: bool, now: float | None = None, *,
               platform: str = "unknown") -> None:
        """Rewrite the file if the link or the platform's presence changed or the last
        write is getting old; a change also wakes the fallback daemon."""
        now = time.monotonic() if now is None else now
        changed = (connected, platform) != (self._connected, self._platform)
        if not changed and now - self._written < REFRESH_S:
            return
        body = json.dumps({"connected": connected, "platform": platform, "pid": os.getpid(),
                           "boot_id": self._boot, "monotonic": now})
        self._temp.write_text(body)
        os.replace(self._temp, self.path)
        self._connected, self._platform, self._written = connected, platform, now
        if changed:
            wake(self.runtime_dir, "fallback")

    def close(self) -> None:
        """A clean stop: the link is down, and says so (the file stays, for its reader)."""
        with contextlib.suppress(OSError):
            self.update(False)
        with contextlib.suppress(FileNotFoundError):
            self._temp.unlink()


@dataclass(frozen=True)
class LinkReading:
    connected: bool
    why: str   # for a person: why it counts as down, or "connected"
    platform: str = "unknown"   # the platform's presence, as the uplink last heard it

    @property
    def can_deliver(self) -> bool:
        """Connected, and the platform not known to be offline."""
        return self.connected and self.platform != "offline"


def read_link_state(runtime_dir: Path, now: float | None = None) -> LinkReading:
    """What the uplink last said about its link, and whether that can still be believed."""
    now = time.monotonic() if now is None else now
    try:
        state = json.loads(link_path(runtime_dir).read_text())
        connected, pid = bool(state["connected"]), int(state["pid"])
        stamp, boot = float(state["monotonic"]), state["boot_id"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return LinkReading(False, f"no link state from the uplink ({err})")
    if boot != boot_id():
        return LinkReading(False, "the link state is from another boot")
    if now - stamp > STALE_S:
        return LinkReading(False, f"the uplink has not refreshed its link state for "
                                  f"{now - stamp:.0f} s")
    if not _alive(pid):
        return LinkReading(False, f"the uplink (pid {pid}) is not running")
    platform = state.get("platform", "unknown")
    if connected and platform == "offline":
        return LinkReading(True, "the platform is offline (its presence)", "offline")
    return LinkReading(connected, "connected" if connected else "the uplink is not connected",
                       platform if platform in ("online", "offline") else "unknown")


def _alive(pid: int) -> bool:
    """A running process (not a zombie waiting to be reaped: it has stopped working)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: it exists
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc to look in: existing is all we know
    return stat.rpartition(")")[2].split()[0] != "Z"
