"""The whole device as production runs it, for the proof scenarios.

``python -m edge run all --config ...``: the supervisor and every daemon it starts
(button, uplink, fallback with a simulated modem, selftest), on gpiozero's mock pins,
as real processes. The caller says where the state lives (the outbox and the spool), so
that a scenario can put it on a small filesystem of its own, copy it, or start a second
device on a copy. The runtime directory (sockets, pid locks) stays beside the
configuration: it is not state.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

from edge.config import Config, load_config
from edge.runtime.control import ControlUnavailable, request
from edge.runtime.sdnotify import NotifyListener
from tests.conftest import sim_document, write_toml
from tests.support.daemons import DaemonProcess, poll_until

# What `run all` starts on a device with a modem and no camera (edge/tools/cli.py).
DAEMONS = ("button", "uplink", "fallback", "selftest")
DUTY_NUMBER = "+8613800138000"
ARMED_TIMEOUT_S = 60.0  # Python start-ups on a busy 2-core machine: generous, not judged


@dataclass
class DeviceSettings:
    """Where the device finds its broker, and anything a scenario changes in its file."""

    broker_host: str
    broker_port: int
    modem_port: str | None = None             # a ModemSimulator's pty: fallback runs
    sections: dict = field(default_factory=dict)  # merged into the configuration
    command_prefix: tuple[str, ...] = ()      # e.g. ("ip", "netns", "exec", name)
    env: dict = field(default_factory=dict)   # e.g. the simulated clock's variable


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first, then theirs)."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop(0)
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for task in os.listdir(f"/proc/{parent}/task"):
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    text = Path(f"/proc/{parent}/task/{task}/children").read_text()
                    for child in map(int, text.split()):
                        found.append(child)
                        queue.append(child)
    return found


def alive(pid: int) -> bool:
    """Running or stopped; a zombie is dead."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def daemon_name(pid: int) -> str | None:
    """``button`` for ``python -m edge ... run button ...``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (FileNotFoundError, ProcessLookupError):
        return None
    return argv[argv.index("run") + 1] if "run" in argv[:-1] else None


class ProofDevice:
    """One device: start, wait until armed, kill -9 a daemon or all of it, freeze it,
    stop it cleanly, and start again on the same or another state directory."""

    def __init__(self, workdir: Path, state_dir: Path, settings: DeviceSettings):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.listener = NotifyListener(self.workdir / "notify.sock")
        self.runs: list[DaemonProcess] = []  # every `run all` started, the current one last
        self.state_dir = Path(state_dir)
        self.config_path, self.config = self._write_config()

    # -- configuration ---------------------------------------------------------------

    def _write_config(self) -> tuple[Path, Config]:
        s = self.settings
        doc = sim_document(self.workdir, s.broker_port, **{
            "broker": {"host": s.broker_host},
            "storage": {"database": str(self.state_dir / "outbox.db"),
                        "spool_dir": str(self.state_dir / "spool"),
                        "runtime_dir": str(self.workdir / "run")},
            "inputs": {"gate": {"pin": 17, "min_press_ms": 10}},
        })
        if s.modem_port is not None:
            doc["modem"] = {"port": s.modem_port, "status_interval_s": 60}
            doc["fallback"] = {"duty_numbers": [DUTY_NUMBER]}
        for name, values in s.sections.items():
            doc.setdefault(name, {}).update(values)
        path = write_toml(self.workdir / "guardpost.toml", doc)
        return path, load_config(path)

    @property
    def control(self) -> Path:
        return self.config.storage.runtime_dir / "button.ctl"

    @property
    def run(self) -> DaemonProcess:
        return self.runs[-1]

    # -- life ------------------------------------------------------------------------

    def start(self, state_dir: Path | None = None) -> ProofDevice:
        """Start `run all` (on ``state_dir`` from now on, if given) and wait until every
        daemon said READY=1 (the supervisor says it then)."""
        if self.runs and self.running:
            raise RuntimeError("the device is already running")
        if state_dir is not None and Path(state_dir) != self.state_dir:
            self.state_dir = Path(state_dir)
            self.config_path, self.config = self._write_config()
        run = DaemonProcess("all", self.config_path, self.listener, log_level="INFO",
                            command_prefix=self.settings.command_prefix,
                            extra_env=self.settings.env)
        self.runs.append(run)
        run.start()
        return self

    @property
    def running(self) -> bool:
        return bool(self.runs) and self.run.process.poll() is None

    def wait_armed(self, timeout: float = ARMED_TIMEOUT_S) -> None:
        """Until the button daemon answers on its control socket: a press is read."""
        def answers() -> bool:
            try:
                return bool(request(self.control, {"op": "status"}, timeout=5).get("ok"))
            except (ControlUnavailable, OSError, ValueError):
                return False

        poll_until(answers, timeout=timeout, interval=0.05, what="the button to be armed")

    def children(self) -> dict[str, int]:
        """The running daemons of the current `run all`: name -> pid."""
        if not self.running:
            return {}
        return {name: pid for pid in descendants(self.run.pid)
                if (name := daemon_name(pid)) is not None and alive(pid)}

    def kill_daemon(self, name: str) -> int:
        """kill -9 of one daemon; returns the supervisor's log position, to wait from it
        for the restart (:meth:`wait_restarted`)."""
        pid = poll_until(lambda: self.children().get(name), timeout=ARMED_TIMEOUT_S,
                         what=f"a running {name} daemon")
        mark = len(self.run.lines)
        os.kill(pid, signal.SIGKILL)
        poll_until(lambda: not alive(pid), what=f"{name} (pid {pid}) to die")
        return mark

    def wait_restarted(self, name: str, after: int, timeout: float = ARMED_TIMEOUT_S) -> None:
        """Until the supervisor has started ``name`` again and it said READY=1."""
        self.run.wait_for_line(f"{name} is ready", timeout=timeout, after=after)

    def kill_supervisor(self) -> None:
        """kill -9 of `run all` itself: its children stop with it (PR_SET_PDEATHSIG sends
        them SIGTERM); waits until every one is gone."""
        everything = [self.run.pid, *descendants(self.run.pid)]
        self.run.kill()
        for pid in everything:
            poll_until(lambda pid=pid: not alive(pid), timeout=30,
                       what=f"process {pid} of the killed `run all` to stop")

    def freeze(self) -> list[int]:
        """SIGSTOP the whole tree, the supervisor first (a stopped supervisor restarts
        nothing); returns the pids, in the order they were stopped."""
        pids = [self.run.pid]
        os.kill(self.run.pid, signal.SIGSTOP)
        for pid in descendants(self.run.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
            pids.append(pid)
        return pids

    def thaw(self) -> None:
        for pid in [*descendants(self.run.pid), self.run.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def kill_everything(self) -> None:
        """Every process stopped at once, then SIGKILLed: nothing runs a clean-up, not even
        the children's death signal (a power cut, as far as processes can tell)."""
        pids = self.freeze()
        for pid in reversed(pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.run.process.wait(10)
        for pid in pids:
            poll_until(lambda pid=pid: not alive(pid), timeout=30,
                       what=f"process {pid} to die")

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM to `run all`: its daemons stop in order; its exit code."""
        if not self.runs:
            return None
        with contextlib.suppress(ProcessLookupError):
            self.thaw()  # a frozen tree would not hear SIGTERM
        return self.run.stop(timeout)

    def copy_state(self, destination: Path) -> Path:
        """A copy of the state directory as it is now (stop or freeze the device first
        for a consistent one; as it is, it is what a crash would leave)."""
        shutil.copytree(self.state_dir, destination, symlinks=True)
        return Path(destination)

    def close(self) -> None:
        """Stop whatever still runs (a frozen or half-killed tree too) and let go."""
        for run in self.runs:
            if run.process.poll() is not None:
                continue
            tree = [run.pid, *descendants(run.pid)]
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            with contextlib.suppress(Exception):
                run.stop(30)
            for pid in tree:  # whatever did not stop with it (and is still ours)
                if alive(pid) and self._ours(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        self.listener.close()

    def _ours(self, pid: int) -> bool:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            return str(self.config_path).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
        return False

    def log(self) -> str:
        return "\n".join(f"---- run all #{n} (pid {run.pid}) ----\n{run.log()}"
                         for n, run in enumerate(self.runs, 1))
