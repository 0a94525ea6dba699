"""``guardpost run all``: every daemon as a child process, for the demo and small setups.

On a device, systemd runs one unit per daemon (see ``systemd/``); this supervisor does
the same job in one command, with the same sd_notify protocol systemd uses:

- The button daemon starts first; the others start once it has said ``READY=1`` (or
  after ``READY_TIMEOUT_S``), each after the one before it.
- One event loop watches every child at once (its pidfd, its notifications, its restart
  timer): a daemon that dies is noticed at once, whatever the others are doing, and the
  button daemon is started again at once (its restarts are never more than
  ``BUTTON_RESTART_MAX_S`` apart: while it is down, no press is read). The others back
  off up to ``RESTART_MAX_S``. A daemon that exited 78 (bad configuration) is never
  restarted: everything stops with 78.
- The children die with the supervisor, even killed with -9 (``PR_SET_PDEATHSIG``): no
  orphan keeps the pins, the MQTT session or the lock files from the next ``run all``.
  A second ``run all`` on the same device refuses to start.
- On SIGTERM/SIGINT the children stop in reverse order: the uplink says "offline" while
  the button still guards.
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
from edge.runtime.instance import PARENT_ENV, only_instance
from edge.runtime.sdnotify import NotifyListener, notify

log = logging.getLogger(__name__)

DAEMONS = ("button", "uplink")
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
RESTART_MAX_S = 5.0
BUTTON_RESTART_MAX_S = 1.0
FIRST_RESTART_S = 0.1
STABLE_AFTER_S = 60.0  # a child that ran this long restarts without delay


class _Child:
    def __init__(self, name: str, argv: list[str]):
        self.name = name
        self.argv = argv
        self.process: subprocess.Popen | None = None
        self.pidfd: int | None = None
        self.started = 0.0
        self.ready = False
        self.ready_by: float | None = None  # monotonic; READY=1 expected by then
        self.failures = 0
        self.restart_at: float | None = None

    @property
    def running(self) -> bool:
        return self.pidfd is not None

    def spawn(self, env: dict) -> None:
        self.process = subprocess.Popen(self.argv, env=env)
        self.pidfd = os.pidfd_open(self.process.pid)
        self.started = time.monotonic()
        self.ready, self.ready_by = False, self.started + READY_TIMEOUT_S
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
        self._announced = False

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wakeup_w, b"!")

    def run(self, stop: threading.Event) -> int:
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        with only_instance(self.runtime_dir, "supervisor"):
            self._listener = NotifyListener(self.runtime_dir / "supervisor.notify")
            try:
                return self._loop(stop)
            finally:
                self._stop_all()
                self._listener.close()

    # -- the loop ----------------------------------------------------------------------

    def _loop(self, stop: threading.Event) -> int:
        self._spawn(self.children[0])
        while not stop.is_set():
            now = time.monotonic()
            for child in self.children:
                if child.restart_at is not None and now >= child.restart_at:
                    child.restart_at = None
                    self._spawn(child)
                elif child.running and not child.ready and child.ready_by is not None \
                        and now >= child.ready_by:
                    log.error("%s did not report ready within %.0f s", child.name,
                              READY_TIMEOUT_S)
                    child.ready_by = None
            self._start_next()
            readable = select.select(
                [*(c.pidfd for c in self.children if c.running), self._listener,
                 self._wakeup_r], [], [], self._timeout())[0]
            if self._wakeup_r in readable:
                os.read(self._wakeup_r, 64)
            if self._listener in readable:
                self._notifications()
            for child in self.children:
                if child.pidfd is not None and child.pidfd in readable:
                    code = child.reap()
                    if code == EX_CONFIG:
                        log.error("%s refused its configuration (exit 78); stopping",
                                  child.name)
                        return EX_CONFIG
                    if not stop.is_set():
                        self._schedule_restart(child, code)
        return 0

    def _timeout(self) -> float | None:
        due = [t for c in self.children for t in (c.restart_at, c.ready_by if c.running
                                                   and not c.ready else None) if t is not None]
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _notifications(self) -> None:
        for pid, fields in self._listener.receive():
            for child in self.children:
                if child.process is not None and child.process.pid == pid \
                        and "READY=1" in fields and not child.ready:
                    child.ready, child.ready_by = True, None
                    log.info("%s is ready", child.name)

    def _start_next(self) -> None:
        """Start the first child never started, once every one before it is ready (or
        overdue, or dead and waiting for its restart); say READY=1 ourselves once every
        child has been so."""
        settled = [c.ready or c.ready_by is None or not c.running for c in self.children]
        for index, child in enumerate(self.children):
            if child.process is None:
                if all(settled[:index]):
                    self._spawn(child)
                return
        if not self._announced and all(settled):
            self._announced = True
            notify("READY=1", "STATUS=all daemons started")

    def _spawn(self, child: _Child) -> None:
        env = self._listener.env()
        env[PARENT_ENV] = str(os.getpid())  # the child dies with us (PR_SET_PDEATHSIG)
        child.spawn(env)

    def _schedule_restart(self, child: _Child, code: int | None) -> None:
        ran = time.monotonic() - child.started
        child.failures = 0 if ran > STABLE_AFTER_S else child.failures + 1
        cap = BUTTON_RESTART_MAX_S if child.name == "button" else RESTART_MAX_S
        if child.name == "button" and child.failures <= 1:
            delay = 0.0  # the button is the alarm path: at once
        else:
            delay = min(cap, FIRST_RESTART_S * 2 ** max(0, child.failures - 1))
        log.error("%s exited with code %s after %.1f s; restarting in %.1f s",
                  child.name, code, ran, delay)
        child.restart_at = time.monotonic() + delay

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
