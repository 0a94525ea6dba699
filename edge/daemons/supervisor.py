"""``guardpost run all``: every daemon as a child process, for the demo and small setups.

On a device, systemd runs one unit per daemon (see ``systemd/``); this supervisor does
the same job in one command: it starts the button daemon first and waits until it
reports ``READY=1`` (the same sd_notify protocol systemd uses), then the uplink,
restarts a daemon that dies (with backoff), never restarts one that exited 78 (bad
configuration), and stops them in reverse order on SIGTERM/SIGINT.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from edge.config import EX_CONFIG
from edge.runtime.sdnotify import NotifyListener, notify

log = logging.getLogger(__name__)

DAEMONS = ("button", "uplink")
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
RESTART_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # a child that ran this long restarts without delay


class _Child:
    def __init__(self, name: str, argv: list[str]):
        self.name = name
        self.argv = argv
        self.process: subprocess.Popen | None = None
        self.pidfd: int | None = None
        self.started = 0.0
        self.failures = 0
        self.restart_at: float | None = None

    def spawn(self, env: dict) -> None:
        self.process = subprocess.Popen(self.argv, env=env)
        self.pidfd = os.pidfd_open(self.process.pid)
        self.started = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.process.pid)

    def reap(self) -> int | None:
        if self.process is None:
            return None
        code = self.process.poll()
        if code is not None and self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        return code


class Supervisor:
    """Runs the daemons as children of this process until told to stop."""

    def __init__(self, config_path: Path, runtime_dir: Path, *, daemons=DAEMONS,
                 log_level: str = "INFO"):
        self.runtime_dir = Path(runtime_dir)
        self.children = [
            _Child(name, [sys.executable, "-m", "edge", "--log-level", log_level, "run", name,
                          "--config", str(config_path)])
            for name in daemons
        ]
        self._listener: NotifyListener | None = None
        self._wakeup_r, self._wakeup_w = os.pipe()

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wakeup_w, b"!")

    def _start_and_wait_ready(self, child: _Child, stop: threading.Event) -> int | None:
        """Spawn ``child``; wait for its READY=1. Returns its exit code if it died first."""
        child.spawn(self._listener.env())
        ready = self._listener.wait_for(child.process.pid, "READY=1", READY_TIMEOUT_S,
                                        pidfd=child.pidfd, interrupt_fd=self._wakeup_r)
        if ready:
            log.info("%s is ready", child.name)
            return None
        if child.process.poll() is not None:
            return child.reap()
        if not stop.is_set():
            log.error("%s did not report ready within %.0f s", child.name, READY_TIMEOUT_S)
        return None

    def run(self, stop: threading.Event) -> int:
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        self._listener = NotifyListener(self.runtime_dir / "supervisor.notify")
        try:
            for child in self.children:
                if stop.is_set():
                    return 0
                code = self._start_and_wait_ready(child, stop)
                if code == EX_CONFIG:
                    log.error("%s refused its configuration (exit 78); stopping", child.name)
                    return EX_CONFIG
                if code is not None:
                    self._schedule_restart(child, code)
            notify("READY=1", "STATUS=all daemons started")
            return self._watch(stop)
        finally:
            self._stop_all()
            self._listener.close()

    def _schedule_restart(self, child: _Child, code: int) -> None:
        ran = time.monotonic() - child.started
        child.failures = 0 if ran > STABLE_AFTER_S else child.failures + 1
        delay = min(RESTART_MAX_S, 0.5 * 2 ** child.failures) if child.failures else 0.0
        log.error("%s exited with code %s after %.1f s; restarting in %.1f s",
                  child.name, code, ran, delay)
        child.restart_at = time.monotonic() + delay

    def _watch(self, stop: threading.Event) -> int:
        while not stop.is_set():
            now = time.monotonic()
            for child in self.children:
                if child.restart_at is not None and now >= child.restart_at:
                    child.restart_at = None
                    code = self._start_and_wait_ready(child, stop)
                    if code == EX_CONFIG:
                        log.error("%s refused its configuration (exit 78); stopping", child.name)
                        return EX_CONFIG
                    if code is not None:
                        self._schedule_restart(child, code)
            pending = [c.restart_at for c in self.children if c.restart_at is not None]
            timeout = max(0.0, min(pending) - time.monotonic()) if pending else None
            fds = [c.pidfd for c in self.children if c.pidfd is not None]
            readable, _, _ = select.select([*fds, self._listener, self._wakeup_r], [], [],
                                           timeout)
            if self._wakeup_r in readable:
                os.read(self._wakeup_r, 64)
            if self._listener in readable:
                self._listener.receive()  # later STATUS= lines: nothing to do with them
            for child in self.children:
                if child.pidfd is not None and child.pidfd in readable:
                    code = child.reap()
                    if code == EX_CONFIG:
                        log.error("%s refused its configuration (exit 78); stopping", child.name)
                        return EX_CONFIG
                    if not stop.is_set():
                        self._schedule_restart(child, code)
        return 0

    def _stop_all(self) -> None:
        # Reverse order: the uplink says "offline" while the button still guards.
        for child in reversed(self.children):
            process = child.process
            if process is None or process.poll() is not None:
                child.reap()
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error("%s did not stop within %.0f s; killing it", child.name, STOP_TIMEOUT_S)
                process.kill()
                process.wait(5)
            child.reap()
            log.info("stopped %s (exit %s)", child.name, process.returncode)
