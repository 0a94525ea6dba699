"""How the daemons wake each other: one datagram on a Unix socket, nothing while idle.

Each daemon that waits for news binds ``{runtime_dir}/{name}.wake`` and blocks in
``select`` on it. The news itself is always in the outbox; a wake-up only says "look
again". So a lost wake-up (the other daemon restarting) costs nothing but the delay
until the waiter's own periodic look, and many wake-ups coalesce into one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
from pathlib import Path

log = logging.getLogger(__name__)

_SILENT_ERRORS = {errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN, errno.ENOTSOCK}


def wake_path(runtime_dir: Path, name: str) -> Path:
    return Path(runtime_dir) / f"{name}.wake"


def wake(runtime_dir: Path, name: str) -> bool:
    """Nudge the daemon ``name``; True if it was listening. Never blocks, never raises."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        try:
            sock.sendto(b"!", str(wake_path(runtime_dir, name)))
            return True
        except OSError as err:
            # Not running, or its queue is already full of wake-ups: either way fine.
            if err.errno not in _SILENT_ERRORS:
                log.warning("waking %s: %s", name, err)
            return False


class Waker:
    """The receiving end: ``wait()`` returns when woken or when the timeout passes."""

    def __init__(self, runtime_dir: Path, name: str):
        self.path = wake_path(runtime_dir, name)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # left by a process that was killed
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        os.chmod(self.path, 0o660)
        self._sock.setblocking(False)

    def fileno(self) -> int:
        return self._sock.fileno()

    def wake(self) -> None:
        """Wake this waiter from inside the same process (a signal handler, say)."""
        with contextlib.suppress(OSError):
            self._sock.sendto(b"!", str(self.path))

    def drain(self) -> int:
        """Consume pending wake-ups; returns how many there were."""
        count = 0
        while True:
            try:
                self._sock.recv(64)
            except (BlockingIOError, InterruptedError):
                return count
            count += 1

    def wait(self, timeout: float | None) -> bool:
        """Block until woken (True) or ``timeout`` seconds pass (False)."""
        readable, _, _ = select.select([self._sock], [], [], timeout)
        if readable:
            self.drain()
            return True
        return False

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
