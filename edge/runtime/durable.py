"""Files that survive a power cut: what a rename needs besides the file's own fsync."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Put the directory's entries on disk: a file renamed into it is there after a power
    cut only once its directory has been synced too."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
