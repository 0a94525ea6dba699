"""Room kept ahead for alarms: a file of allocated blocks, given back when the disk is full.

An SD card fills up (a log gone wild, a camera spool misconfigured, another program).
SQLite then cannot map its shared-memory index, grow its WAL or add a page, and a press
would not be recorded. So the outbox keeps ``outbox.db.reserve``, a file whose blocks are
really allocated (``posix_fallocate``): when a write that an alarm depends on meets a
full disk, the store gives back a step of it (``ftruncate``) and tries again. Only the
alarm path draws on it (the button's recorder, the uplink's delivery steps, opening the
outbox); snapshots, clips and telemetry give way instead (:meth:`SpaceReserve.short`).

The reserve is filled again (by the self-test daemon) once the disk has room for all of
it and a margin besides. How many alarms it holds is stated by
:func:`alarms_per_reserve`, from the worst case of a commit that nobody checkpoints.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

from edge.store.trouble import free_bytes

log = logging.getLogger(__name__)

MIB = 1024 * 1024
STEP_BYTES = 256 * 1024       # given back per full disk met (about a dozen alarms)
# Room a single alarm commit can take when no checkpoint runs: its WAL frames (events
# leaf, counters, latches, index pages: 4 pages of 4 KiB, each with a 24-byte frame
# header) plus its share of new database pages. Measured at about 13.6 kB in
# bench/outbox.py; counted at 20 kB.
WORST_ALARM_BYTES = 20 * 1024


def alarms_per_reserve(size_bytes: int) -> int:
    """Alarms the reserve holds at the least, with no checkpoint and no other room."""
    return size_bytes // WORST_ALARM_BYTES


class SpaceReserve:
    """The reserve file of one outbox (``<database>.reserve``), ``size`` bytes when full."""

    def __init__(self, database: str | Path, size: int):
        self.path = Path(f"{database}.reserve")
        self.size = size

    @classmethod
    def of(cls, storage) -> SpaceReserve:
        """The reserve a configuration's ``[storage]`` asks for."""
        return cls(storage.database, storage.alarm_reserve_mb * MIB)

    def drawn(self) -> bool:
        """Part of it was given back: the disk is (or was) full. A reserve never made yet
        is not drawn: the self-test makes it, and its disk check says if it cannot."""
        return self.path.exists() and self.short() > 0

    def held(self) -> int:
        """Bytes the reserve holds now."""
        try:
            return self.path.stat().st_blocks * 512
        except FileNotFoundError:
            return 0

    def short(self) -> int:
        """Bytes missing from the reserve: while it is not whole, what can wait (pictures,
        telemetry) does not write."""
        return max(0, self.size - self.held())

    @contextlib.contextmanager
    def _locked(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o660)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held for a truncate or an allocation: brief
            yield fd
        finally:
            os.close(fd)

    def release(self, step: int = STEP_BYTES) -> int:
        """Give back up to ``step`` bytes to the file system; returns how many."""
        try:
            with self._locked() as fd:
                size = os.fstat(fd).st_size
                new = max(0, size - step)
                if new == size:
                    return 0
                os.ftruncate(fd, new)
        except OSError as err:
            log.error("could not give back the alarm reserve %s: %s", self.path, err)
            return 0
        log.critical("disk full: %d kB of the alarm reserve given back to record alarms "
                     "(%d kB left)", (size - new) // 1024, new // 1024)
        return size - new

    def fill(self, margin: int = 2 * STEP_BYTES) -> bool:
        """Make the reserve whole if the disk has room for the rest and ``margin`` more;
        True when it is whole."""
        missing = self.short()
        if not missing:
            return True
        try:
            if free_bytes(self.path.parent) < missing + margin:
                return False
            with self._locked() as fd:
                os.posix_fallocate(fd, 0, self.size)
                os.ftruncate(fd, self.size)  # a larger file from before: to the size asked
                os.fsync(fd)
        except OSError as err:
            log.warning("could not fill the alarm reserve %s: %s", self.path, err)
            return False
        log.info("alarm reserve whole again: %d kB in %s", self.size // 1024, self.path)
        return True
