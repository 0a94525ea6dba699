"""``guardpost fleet-sim`` run as a process by the tests; its stdout lines on a queue."""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path


class FleetProcess:
    """The simulator against ``brokers`` ("host:port", or several comma-separated)."""

    def __init__(self, brokers: str, devices: int, report_path: Path, *args: str):
        self.devices = devices
        self.report_path = report_path
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edge.tools.cli", "fleet-sim", "--devices", str(devices),
             "--broker", brokers, "--json", str(report_path), "--snapshot-kb", "8", *args],
            stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line.startswith("READY"):
                assert line == f"READY {self.devices}"
                return

    def wait(self, timeout: float = 60.0) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    def report(self) -> dict:
        return json.loads(self.report_path.read_text())

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait(10)
        self._reader.join(5)
