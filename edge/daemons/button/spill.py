"""Presses the daemon could not commit before it stopped, kept in a file allocated ahead.

The recorder keeps a press in memory until the outbox takes it. A clean stop (SIGTERM:
an update, a reboot) while the outbox refuses (the disk full beyond the alarm reserve)
would lose it, so the recorder writes what it still holds here, and the next start
commits it first. The file's blocks are allocated when there is room
(``posix_fallocate``), and it is only ever overwritten in place: writing it needs no
free space at all.

    outbox.db.presses    JSON lines, then zeros to the end of the allocation
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SPILL_BYTES = 64 * 1024  # about 400 presses


class PressSpill:
    def __init__(self, database: str | Path):
        self.path = Path(f"{database}.presses")

    def prepare(self) -> None:
        """Allocate the file if it is missing or short (never fatal: at worst a stop on
        a full disk can only log the presses, as before)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o660)
            try:
                if os.fstat(fd).st_blocks * 512 < SPILL_BYTES:
                    os.posix_fallocate(fd, 0, SPILL_BYTES)
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            log.warning("could not allocate %s for presses at a stop: %s", self.path, err)

    def write(self, presses: list[dict]) -> int:
        """Write ``presses`` durably over the file; returns how many fit."""
        lines, size = [], 0
        for press in presses:
            line = json.dumps(press, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
            if size + len(line) > SPILL_BYTES:
                break
            lines.append(line)
            size += len(line)
        body = b"".join(lines)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o660)
        try:
            # Zeros over what an earlier stop left: in place, within the allocation.
            os.pwrite(fd, body.ljust(max(os.fstat(fd).st_size, len(body)), b"\0"), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        return len(lines)

    def take(self) -> list[dict]:
        """The presses written at the last stop (the file is cleared by :meth:`clear`
        once they are committed)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        presses = []
        for line in data.split(b"\0", 1)[0].splitlines():
            with contextlib.suppress(ValueError):
                presses.append(json.loads(line))
        return presses

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            try:
                os.pwrite(fd, bytes(os.fstat(fd).st_size), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
