"""One daemon of each kind per device: a lock file in the runtime directory.

Two uplinks (say, the systemd unit and a forgotten ``guardpost run all``) would share one
MQTT client id and take the broker session from each other in a loop, and two button
daemons would both drive the LED. The second one refuses to start instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class AlreadyRunning(RuntimeError):
    """Another process already runs this daemon for this device."""


@contextlib.contextmanager
def only_instance(runtime_dir: Path, name: str) -> Iterator[None]:
    """Hold ``{runtime_dir}/{name}.pid`` locked (with our pid in it) for the block."""
    path = Path(runtime_dir) / f"{name}.pid"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise AlreadyRunning(f"another {name} daemon is running (pid {holder}, "
                                 f"lock {path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race)
