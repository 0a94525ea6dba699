"""What SQLite's errors mean for the device: a full disk, a damaged file, or neither.

SQLite says ``database or disk is full`` (``SQLITE_FULL``) when a write finds no room,
but a full disk met while mapping the shared-memory index or growing the WAL comes out
as a ``disk I/O error`` (``SQLITE_IOERR_SHMSIZE``, ``_WRITE``, ``_FSYNC``...): an I/O error
is read as "full" when the file system has (almost) no space left for us, and as itself
otherwise. A damaged file is ``SQLITE_CORRUPT`` (a page that does not make sense) or
``SQLITE_NOTADB`` (the header is not SQLite's).
"""

from __future__ import annotations

import enum
import os
import sqlite3
from pathlib import Path

from edge.store.lock import OutboxError

# Below this, a disk I/O error is taken for a full disk: a write of a few pages failed.
NEARLY_FULL_BYTES = 256 * 1024


class Trouble(enum.Enum):
    FULL = "disk full"
    DAMAGED = "database damaged"
    IO = "I/O error"


class WriteRefused(OutboxError, TimeoutError):
    """A write that did not happen and may simply be tried again (nothing was written).

    A ``TimeoutError`` so that a daemon's loop treats it as it treats a lock wait that ran
    out: tried again at its next turn (:mod:`edge.runtime.daemon`)."""


class DiskFull(WriteRefused):
    """The file system had no room for the write. ``released`` bytes of the alarm reserve
    were given back for it: a caller that may use the reserve tries again at once."""

    def __init__(self, message: str, released: int = 0):
        super().__init__(message)
        self.released = released


class OutboxDamaged(OutboxError):
    """The outbox file is damaged (``SQLITE_CORRUPT``, ``SQLITE_NOTADB``)."""


class OutboxReplaced(WriteRefused):
    """The damaged outbox was moved aside and a new one opened in its place during this
    write: nothing was written, try again (into the new file)."""


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged process may still write on the file system of ``directory``."""
    info = os.statvfs(directory)
    return info.f_bavail * info.f_frsize


def classify(err: BaseException, directory: Path) -> Trouble | None:
    """What ``err`` (from ``sqlite3``) says about the outbox, None for anything else
    (a locked database, a bug in a statement)."""
    if not isinstance(err, sqlite3.DatabaseError):
        return None
    name = getattr(err, "sqlite_errorname", "") or ""
    text = str(err)
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in text \
            or "not a database" in text:
        return Trouble.DAMAGED
    if name.startswith("SQLITE_FULL") or "disk is full" in text:
        return Trouble.FULL
    if name.startswith(("SQLITE_IOERR", "SQLITE_CANTOPEN")) or "disk I/O error" in text:
        try:
            if free_bytes(directory) < NEARLY_FULL_BYTES:
                return Trouble.FULL
        except OSError:
            pass
        return Trouble.IO
    return None
