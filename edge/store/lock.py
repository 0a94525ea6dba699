"""The outbox's cross-process write lock, waited on for a bounded time.

Every writer of the outbox takes an exclusive ``flock`` on ``outbox.db.writelock``
before ``BEGIN IMMEDIATE``. SQLite's own wait for its write lock is a sleep-and-retry
loop (1, 2, 5, 10 ... ms): an alarm commit could lose every retry to the uplink's many
short transactions during a backlog drain. A blocking ``flock`` is woken by the kernel
the moment the lock is released.

``flock`` cannot time out, and a path an alarm takes must never wait without a limit.
So :meth:`WriteLock.acquire` first tries ``LOCK_NB``; if the lock is taken, a small
locker thread of this connection makes the blocking call while the caller waits on an
event for at most its timeout. A request abandoned at its timeout is not cancelled in
the kernel (it cannot be): the locker gives the lock back the moment it gets it, unless
the caller has asked again meanwhile, in which case that request gets it.

A lock belongs to the open file description, not to a thread: what the locker thread
takes, the caller holds and releases.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path


class OutboxError(Exception):
    """The outbox cannot do what was asked (for example a newer schema than this code)."""


class LockTimeout(OutboxError, TimeoutError):
    """The write lock was not had within the caller's bound: a failed commit, to retry."""


class _Request:
    __slots__ = ("abandoned", "granted")

    def __init__(self):
        self.granted = threading.Event()
        self.abandoned = False


class WriteLock:
    """An exclusive ``flock`` on one file, acquired with a timeout (see the module)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o660)
        self._cond = threading.Condition()
        self._wanted: _Request | None = None   # the request the locker serves next
        self._blocking = False                  # the locker is inside flock(LOCK_EX)
        self._closed = False
        self._locker: threading.Thread | None = None

    def acquire(self, timeout: float) -> None:
        """Hold the lock, or raise :class:`LockTimeout` after ``timeout`` seconds."""
        with self._cond:
            if self._closed:
                raise OutboxError(f"{self.path}: the outbox is closed")
            # While the locker is inside flock() on this very descriptor, a LOCK_NB call
            # here could succeed; the locker's call would then return at once (the same
            # descriptor holds the lock) and give back a lock this caller believes it has.
            if not self._blocking:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    pass
            request = self._wanted = _Request()
            if self._locker is None:
                self._locker = threading.Thread(target=self._lock_for_waiters,
                                                name=f"writelock:{self.path.name}", daemon=True)
                self._locker.start()
            self._cond.notify_all()
        if request.granted.wait(timeout):
            return
        with self._cond:
            if request.granted.is_set():  # granted between the timeout and here
                return
            request.abandoned = True
            if self._wanted is request:
                self._wanted = None
        raise LockTimeout(f"{self.path}: another writer held the outbox for more than "
                          f"{timeout:g} s")

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _lock_for_waiters(self) -> None:
        while True:
            with self._cond:
                while self._wanted is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                self._blocking = True
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # woken by the kernel when it is free
            with self._cond:
                self._blocking = False
                if self._closed:
                    os.close(self._fd)  # close() left the descriptor to us: we were in flock
                    return
                request, self._wanted = self._wanted, None
                if request is not None:
                    request.granted.set()
                    continue
            fcntl.flock(self._fd, fcntl.LOCK_UN)  # abandoned at its timeout: give it back

    def close(self) -> None:
        """Close the descriptor (releasing the lock). A locker still waiting in the kernel
        closes it itself when its call returns: the number must not be reused under it."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            if self._blocking:
                return
            os.close(self._fd)
        if self._locker is not None:
            self._locker.join(timeout=1.0)
