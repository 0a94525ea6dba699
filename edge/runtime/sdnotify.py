"""systemd's readiness protocol (sd_notify): a datagram to ``$NOTIFY_SOCKET``.

A daemon says ``READY=1`` only when it can really do its job (the button daemon: pins
open and the outbox writable), so ``systemctl start`` and ``guardpost run all`` wait
for that moment. Without ``NOTIFY_SOCKET`` (run by hand) this does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import struct
import time

log = logging.getLogger(__name__)


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) to the service manager, if any."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
        return True
    except OSError as err:
        log.warning("sd_notify to %s failed: %s", address, err)
        return False


class NotifyListener:
    """The receiving end of sd_notify, as systemd has it: for ``run all``, tests, the demo.

    Children get ``NOTIFY_SOCKET`` pointing here; the kernel tells us each sender's pid
    (``SO_PASSCRED``), so readiness is attributed to the right process.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.bind(self.path)
        self.seen: dict[int, list[str]] = {}
        self.history: list[tuple[float, int | None, str]] = []  # (monotonic, pid, field)

    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["NOTIFY_SOCKET"] = self.path
        return env

    def fileno(self) -> int:
        return self._sock.fileno()

    def receive(self) -> list[tuple[int | None, list[str]]]:
        """Drain waiting messages: ``(sender pid, fields)`` each; also kept in ``seen``."""
        messages = []
        while True:
            try:
                data, ancillary, _, _ = self._sock.recvmsg(
                    4096, socket.CMSG_SPACE(12), socket.MSG_DONTWAIT)
            except BlockingIOError:
                return messages
            pid = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            fields = data.decode(errors="replace").split("\n")
            arrived = time.monotonic()
            self.history += [(arrived, pid, field) for field in fields]
            if pid is not None:
                self.seen.setdefault(pid, []).extend(fields)
            messages.append((pid, fields))

    def wait_for(self, pid: int, field: str, timeout: float, *, pidfd: int | None = None,
                 interrupt_fd: int | None = None) -> bool:
        """Wait until ``pid`` sends ``field`` (True), or its ``pidfd`` shows it exited, the
        ``interrupt_fd`` becomes readable or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while field not in self.seen.get(pid, []):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            watched = [self._sock] + [fd for fd in (pidfd, interrupt_fd) if fd is not None]
            readable, _, _ = select.select(watched, [], [], remaining)
            if self._sock in readable:
                self.receive()
                continue
            if readable:
                return False
        return True

    def wait_until(self, condition, timeout: float) -> bool:
        """Receive messages until ``condition(self)`` holds (True) or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not condition(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if select.select([self._sock], [], [], remaining)[0]:
                self.receive()
        return True

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class Watchdog:
    """systemd's watchdog: ``WATCHDOG=1`` from the daemon's own main loop.

    Pinged from the loop that does the work, never from a helper thread, so a loop that
    is stuck (a hung commit, a dead lock) stops the pings and systemd restarts the daemon
    after ``WatchdogSec``. Without ``WATCHDOG_USEC`` in the environment this does nothing.
    """

    def __init__(self, environ: dict | None = None):
        env = os.environ if environ is None else environ
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        enabled = bool(usec) and (not pid or pid == str(os.getpid()))
        # Ping at half the timeout, as sd_watchdog_enabled(3) recommends.
        self.interval = int(usec) / 2_000_000 if enabled else None
        self._next = 0.0

    @property
    def enabled(self) -> bool:
        return self.interval is not None

    def ping(self, *, force: bool = False) -> None:
        """Ping now if half the timeout has passed since the last ping, or if ``force``d:
        work that blocks for long stretches (an SMS part may take a minute) pings after
        each of them, so that no two pings are further apart than one stretch."""
        if self.interval is None:
            return
        now = time.monotonic()
        # 5 % early is on time: a loop that waited exactly one interval must not skip a
        # ping because its wait ended a few microseconds short.
        if force or now >= self._next - self.interval / 20:
            notify("WATCHDOG=1")
            self._next = now + self.interval
