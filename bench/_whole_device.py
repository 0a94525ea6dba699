"""The whole device as it runs in simulation: ``python -m edge run all`` (the supervisor and
every daemon the configuration calls for) on the default configuration, mock GPIO, a
local broker. For bench/table.py: boot times, idle cost, alarms with snapshots.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench._proc import children, command_line
from edge.config import Config, load_config
from edge.runtime.control import request
from edge.runtime.sdnotify import NotifyListener
from tests.support.device_keys import write_event_key
from tests.support.platform import PlatformStandIn
from tests.support.trust import trust_toml

ROOT = Path(__file__).resolve().parents[1]

# Every setting not written here is the default (config/guardpost.example.toml): the
# heartbeat every 30 s, health checks every 300 s, the reconnect backoff up to 30 s.
CONFIG = """\
[device]
site_id = "bench-school"
device_id = "gate-1"
location = "Benchmark gate"
[broker]
host = "127.0.0.1"
port = {port}
{trust}
[storage]
database = "{workdir}/state/outbox.db"
runtime_dir = "{workdir}/run"
spool_dir = "{workdir}/state/spool"
[gpio]
pin_factory = "mock"
[inputs.gate]
pin = 17
{press_filter}
[outputs]
status_led = {{ pin = 22 }}
buzzer = {{ pin = 23 }}
"""

CAMERA = """
[cameras.gate]
source = "{video}"
loop = true
"""

MODEM = """
[modem]
port = "{port}"
[fallback]
duty_numbers = ["+8613800138000"]
"""


def write_config(workdir: Path, port: int, *, video: Path | None = None,
                 modem_port: str | None = None, press_filter: bool = True) -> Path:
    """A simulation configuration; ``press_filter=False`` turns the 10 ms glitch filter
    off (as bench/alarm_path.py and bench/camera.py do, to time the software path)."""
    workdir.mkdir(parents=True, exist_ok=True)
    text = CONFIG.format(port=port, workdir=workdir, trust=trust_toml(),
                         press_filter="" if press_filter else "min_press_ms = 0\nbounce_ms = 0")
    if video is not None:
        text += CAMERA.format(video=video)
    if modem_port is not None:
        text += MODEM.format(port=modem_port)
    path = workdir / "guardpost.toml"
    path.write_text(text)
    write_event_key(workdir / "credentials")  # the uplink signs every event with it
    return path


class LeanPlatform(PlatformStandIn):
    """The platform stand-in of the tests (it acknowledges alarms), keeping no JPEGs: an
    alarm brings 40 snapshots of up to 250 kB each."""

    def _on_snapshot(self, message, leaf: str) -> None:
        pass


class WholeDevice:
    """``python -m edge run all`` for one configuration, started and stopped at will."""

    def __init__(self, config_path: Path):
        self.config_path = config_path
        self.config: Config = load_config(config_path)
        self.listener = NotifyListener(config_path.parent / "bench-notify.sock")
        self.process: subprocess.Popen | None = None
        self.log: list[tuple[float, str]] = []  # (monotonic arrival, line)
        self._log_cond = threading.Condition()

    def boot(self, platform: PlatformStandIn | None = None, timeout: float = 60) -> dict:
        """Start ``run all``; seconds from the exec to the button daemon's READY (the
        supervisor's log line), to every daemon started (the supervisor's own READY=1),
        and to the platform receiving the birth (``online``), if a platform listens."""
        self.log = []
        started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edge", "--log-level", "INFO", "run", "all",
             "--config", str(self.config_path)],
            env=self.listener.env(), cwd=ROOT, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read_log, args=(self.process,), daemon=True).start()
        button = self.wait_for_log("button is ready", timeout) - started
        pidfd = os.pidfd_open(self.process.pid)
        try:
            if not self.listener.wait_for(self.process.pid, "READY=1", timeout, pidfd=pidfd):
                raise TimeoutError("run all never said READY=1")
        finally:
            os.close(pidfd)
        ready = [at for at, pid, field in self.listener.history
                 if pid == self.process.pid and field == "READY=1"][-1] - started
        times = {"button_ready": button, "all_ready": ready}
        if platform is not None:
            def birth(p: PlatformStandIn):
                return next((m.at for m in p.messages if m.leaf == "status"
                             and m.at > started and (m.body or {}).get("state") == "online"),
                            None)
            times["birth"] = platform.wait_for(birth, timeout, what="the birth") - started
        return times

    def _read_log(self, process: subprocess.Popen) -> None:
        for line in process.stderr:
            if "ERROR" in line or "Traceback" in line:
                sys.stderr.write(line)
            with self._log_cond:
                self.log.append((time.monotonic(), line))
                self._log_cond.notify_all()

    def wait_for_log(self, text: str, timeout: float) -> float:
        """When the first line holding ``text`` arrived (monotonic)."""
        def found():
            return next((at for at, line in self.log if text in line), None)

        with self._log_cond:
            at = self._log_cond.wait_for(found, timeout)
        if at is None:
            raise TimeoutError(f"run all never logged {text!r}")
        return at

    def daemon_pids(self) -> dict[str, int]:
        """``supervisor`` and each daemon (``run button`` ...) by name."""
        pids = {"supervisor": self.process.pid}
        for pid in children(self.process.pid):
            argv = command_line(pid)
            if "run" in argv:
                pids[argv[argv.index("run") + 1]] = pid
        return pids

    def start_daemon(self, name: str, timeout: float = 60) -> subprocess.Popen:
        """One daemon alone (``run NAME``), once it has said READY=1; the caller stops it."""
        process = subprocess.Popen(
            [sys.executable, "-m", "edge", "--log-level", "WARNING", "run", name,
             "--config", str(self.config_path)], env=self.listener.env(), cwd=ROOT)
        pidfd = os.pidfd_open(process.pid)
        try:
            if not self.listener.wait_for(process.pid, "READY=1", timeout, pidfd=pidfd):
                process.kill()
                process.wait(10)
                raise TimeoutError(f"{name} never said READY=1")
        finally:
            os.close(pidfd)
        return process

    def press(self, hold: float) -> dict:
        reply = request(self.config.storage.runtime_dir / "button.ctl",
                        {"op": "press", "input": "gate", "hold": hold})
        if not (reply.get("ok") and reply.get("accepted")):
            raise RuntimeError(f"press refused: {reply}")
        return reply

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def close(self) -> None:
        self.stop()
        self.listener.close()
