"""The device's wall clock, moved by the test (``GUARDPOST_SIM_CLOCK``, edge/runtime/clock.py).

Daemon processes started with :meth:`TestClock.env` read every wall-clock time and the
``clock_synced`` flag through the file this writes; the monotonic clock is the real one.
The file is replaced whole (rename), so a process never reads half of it and sees each
change at its very next reading.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from edge.runtime.clock import SIM_CLOCK_ENV

DAY = 86_400.0


class TestClock:
    __test__ = False  # not a pytest test class

    def __init__(self, path: Path, *, offset_s: float = 0.0, synced: bool = False):
        self.path = path
        self.offset_s = offset_s
        self.synced = synced
        self.set(offset_s, synced=synced)

    def env(self) -> dict[str, str]:
        return {SIM_CLOCK_ENV: str(self.path)}

    def set(self, offset_s: float, *, synced: bool) -> None:
        """From now on the device's clock reads the real time plus ``offset_s``."""
        self.offset_s, self.synced = offset_s, synced
        scratch = self.path.with_suffix(".new")
        scratch.write_text(json.dumps({"offset_s": offset_s, "synced": synced}))
        os.replace(scratch, self.path)

    def step(self, by_s: float, *, synced: bool | None = None) -> None:
        """Step the clock by ``by_s`` (negative: back), as NTP or a person would."""
        self.set(self.offset_s + by_s, synced=self.synced if synced is None else synced)
