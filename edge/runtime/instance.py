"""One daemon of each kind per device: a lock file in the runtime directory.

Two uplinks (say, the systemd unit and a forgotten ``guardpost run all``) would share one
MQTT client id and take the broker session from each other in a loop, and two button
daemons would both drive the LED. The second one refuses to start instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

# Set by `run all` in its children's environment: the supervisor's pid.
PARENT_ENV = "GUARDPOST_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1


def die_with_parent(environ: dict | None = None) -> None:
    """Under ``run all``: be sent SIGTERM (a clean stop) when the supervisor dies, even by
    ``kill -9``, so that no orphan keeps the pins, the MQTT session or the lock files."""
    env = os.environ if environ is None else environ
    parent = env.get(PARENT_ENV)
    if not parent:
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as err:
        log.warning("cannot ask to be stopped with the supervisor (%s)", err)
        return
    if os.getppid() != int(parent):
        # It died before we asked: the signal will never come.
        os.kill(os.getpid(), signal.SIGTERM)


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
