"""Guardpost daemons as real processes, the way systemd runs them.

Each is started with ``NOTIFY_SOCKET`` pointing at a listener the test owns, so the
test waits for the daemon's own ``READY=1`` instead of sleeping; its log lines are
collected as they come and can be waited on (the LED and buzzer log every change).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from edge.runtime.sdnotify import NotifyListener


class DaemonProcess:
    def __init__(self, name: str, config_path: Path, listener: NotifyListener,
                 extra_env: dict | None = None, *, log_level: str = "DEBUG",
                 command_prefix: tuple[str, ...] = ()):
        self.name = name
        self.config_path = config_path
        self.listener = listener
        self.extra_env = extra_env or {}
        self.log_level = log_level
        # Runs the daemon through another command (``ip netns exec NAME``), which must
        # exec it: the pid is the daemon's.
        self.command_prefix = tuple(command_prefix)
        self.process: subprocess.Popen | None = None
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self, *, wait_ready: bool = True) -> DaemonProcess:
        env = self.listener.env() | self.extra_env
        self.process = subprocess.Popen(
            [*self.command_prefix, sys.executable, "-m", "edge", "--log-level", self.log_level,
             "run", self.name, "--config", str(self.config_path)],
            env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait_ready:
            pidfd = os.pidfd_open(self.process.pid)
            try:
                ready = self.listener.wait_for(self.process.pid, "READY=1", 30, pidfd=pidfd)
            finally:
                os.close(pidfd)
            if not ready:
                self.stop()
                raise AssertionError(f"{self.name} did not become ready:\n" + self.log())
        return self

    def _read(self) -> None:
        for raw in self.process.stderr:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, text: str, timeout: float = 15.0, after: int = 0) -> int:
        """Index of the first log line at or after ``after`` containing ``text``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for index in range(after, len(self.lines)):
                    if text in self.lines[index]:
                        return index
                remaining = deadline - time.monotonic()
                ended = self.process.poll() is not None and not self._reader.is_alive()
                if remaining <= 0 or ended:
                    raise AssertionError(f"{self.name}: no log line with {text!r}:\n{self.log()}")
                self._cond.wait(remaining)

    def kill(self) -> None:
        """kill -9: no clean-up of any kind."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self._reader.join(5)

    def stop(self, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        return self.process.returncode


def poll_until(predicate, timeout: float = 30.0, interval: float = 0.005, what: str = "state"):
    """For device state that announces itself to no one (a row count in the outbox):
    look again every few milliseconds until ``predicate()`` is truthy."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        pause.wait(interval)
    return result


@contextlib.contextmanager
def in_process(daemon):
    """Run a daemon object (ButtonDaemon, UplinkDaemon) on a thread of this process, for
    tests that must reach inside it (drive its mock pins); stopped as its signal would."""
    stop = threading.Event()
    runner = threading.Thread(target=daemon.run, args=(stop,), name=f"{daemon.name}-daemon")
    runner.start()
    try:
        assert daemon.ready.wait(30), f"{daemon.name} did not become ready"
        yield daemon
    finally:
        stop.set()
        daemon.wake()
        runner.join(30)
