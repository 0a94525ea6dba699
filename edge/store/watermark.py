"""The sequence's high-water mark, kept where the database's loss cannot take it.

The contract promises that ``seq`` never repeats or goes backwards. The outbox's own
counter cannot keep that promise alone: a lost WAL file takes the last commits (and their
numbers) with it, a database cut to nothing starts again at 1. So every commit that takes
sequence numbers (or a new MQTT session number) also writes them here, in a small file
beside the database, after its ``COMMIT`` and before it gives up the write lock:

    outbox.db.mark   two 64-byte slots, written in turn, each
                     "GPMARK1 <seq> <session> <epoch> <crc32>\\n"

A slot is written with ``pwrite``: a torn write spoils one slot, and the other still holds
the value before it (which the database, committed first, still has). On open the outbox
takes the larger of its counter and the mark: numbers never go back.

The ``fdatasync`` that puts the mark on the card is not on the alarm's path: it doubled
the cost of a single alarm commit (a second flush after the WAL's). A thread of the
connection makes it within about 20 ms of the write (:data:`SYNC_DELAY_S`, more
under load); a new epoch is synced at once. What that leaves open: the mark's last
milliseconds lost in a power cut that also takes the database's last synced commits
(hardware that lies about its flushes) — where the mark's own flush would not have been
trustworthy either. A crash of the process loses nothing: the write is in the kernel.

The **epoch** names one unbroken history of the outbox (a UUIDv7). When the outbox finds
less than the mark says it had, or a new file in its place, history was lost: a new
epoch begins, the sequence goes on above the mark, and every event carries the epoch, so
the platform can tell a gap that will never fill from one that will.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SLOT = 64
SYNC_DELAY_S = 0.02  # a burst of commits shares one flush of the mark
_MAGIC = b"GPMARK1"


@dataclass(frozen=True)
class Mark:
    seq: int
    session: int
    epoch: str


def _encode(mark: Mark) -> bytes:
    body = b"%s %d %d %s" % (_MAGIC, mark.seq, mark.session, mark.epoch.encode())
    line = b"%s %08x\n" % (body, zlib.crc32(body))
    if len(line) > SLOT:
        raise ValueError(f"mark too long: {line!r}")
    return line.ljust(SLOT, b"\0")


def _decode(slot: bytes) -> Mark | None:
    line = slot.rstrip(b"\0")
    try:
        body, crc = line.rstrip(b"\n").rsplit(b" ", 1)
        if int(crc, 16) != zlib.crc32(body):
            return None
        magic, seq, session, epoch = body.split(b" ")
        if magic != _MAGIC:
            return None
        return Mark(int(seq), int(session), epoch.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return None


class SequenceMark:
    """The mark file of one outbox: read at open, advanced after commits (always under
    the outbox's write lock, so that reading the slots and writing one is not raced)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None
        self._dirty = threading.Event()
        self._closing = False
        self._syncer: threading.Thread | None = None

    def _slots(self) -> list[Mark | None]:
        if self._fd is not None:
            data = os.pread(self._fd, 2 * SLOT, 0)
        else:
            try:
                with open(self.path, "rb") as f:
                    data = f.read(2 * SLOT)
            except FileNotFoundError:
                return [None, None]
        return [_decode(data[:SLOT]), _decode(data[SLOT:2 * SLOT])]

    def read(self) -> Mark | None:
        """The mark (the larger valid slot), None if there is no valid one."""
        marks = [m for m in self._slots() if m is not None]
        return max(marks, key=lambda m: (m.seq, m.session)) if marks else None

    def write(self, mark: Mark, *, sync: bool = False) -> None:
        """Record ``mark``, never below what is there: into the slot that does not hold
        the larger value, so a torn write leaves the larger one whole. On the card at
        once with ``sync``, else within milliseconds (see the module)."""
        if self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o660)
            if os.fstat(fd).st_size < 2 * SLOT:
                os.pwrite(fd, bytes(2 * SLOT - os.fstat(fd).st_size), os.fstat(fd).st_size)
            self._fd = fd
        slots = self._slots()
        valid = [(i, m) for i, m in enumerate(slots) if m is not None]
        if valid:
            best_index, best = max(valid, key=lambda im: (im[1].seq, im[1].session))
            if best.epoch == mark.epoch:
                mark = Mark(max(mark.seq, best.seq), max(mark.session, best.session), mark.epoch)
            if mark == best:
                return
            target = 1 - best_index
        else:
            target = 0
        os.pwrite(self._fd, _encode(mark), target * SLOT)
        if sync:
            os.fdatasync(self._fd)
            return
        if self._syncer is None:
            self._syncer = threading.Thread(target=self._sync_soon, name="mark-sync",
                                            daemon=True)
            self._syncer.start()
        self._dirty.set()

    def _sync_soon(self) -> None:
        while True:
            self._dirty.wait()
            if self._closing:
                return
            threading.Event().wait(SYNC_DELAY_S)
            self._dirty.clear()
            try:
                os.fdatasync(self._fd)
            except OSError as err:  # the next commit tries again; close() syncs too
                self._dirty.set()
                threading.Event().wait(1.0)
                if self._closing:
                    return
                log.error("cannot sync %s: %s", self.path, err)

    def close(self) -> None:
        if self._syncer is not None:
            self._closing = True
            self._dirty.set()
            self._syncer.join(2.0)
            if self._syncer.is_alive():
                return  # stuck in the kernel with our descriptor: leave it to it
            self._syncer = None
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.fdatasync(self._fd)
            os.close(self._fd)
            self._fd = None
